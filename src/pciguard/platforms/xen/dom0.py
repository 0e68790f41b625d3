"""A Xen dom0, as pciguard reads it: the Linux reading of its sysfs (topology, drivers,
config space) with the IOMMU evidence taken from the hypervisor instead.

On the live host the evidence comes from ``xl`` (run, as every ``xl`` is, by
``platform.run_xl``); a tree standing for a dom0 (a snapshot, a test's fake tree) carries what
``xl`` printed as files under ``xen/`` at its root, which is where ``pciguard
snapshot`` records them.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from pciguard.model import Bdf, Host, IommuUnit
from pciguard.model.kernel import XenFacts
from pciguard.platforms.linux.journal import Journal, JournalError
from pciguard.platforms.linux.sysfs import Fs, Reading, Tree, read_host
from pciguard.platforms.xen.evidence import xen_facts
from pciguard.platforms.xen.platform import run_xl

HYPERVISOR_TYPE = "sys/hypervisor/type"
CAPABILITIES = "proc/xen/capabilities"  # "control_d" in the control domain
PCIBACK_PERMISSIVE = "sys/bus/pci/drivers/pciback/permissive"
PCIBACK_MODULE_PERMISSIVE = "sys/module/xen_pciback/parameters/permissive"
MADE_ASSIGNABLE = ("quarantined", "assigned")  # journal states: pciguard ran pci-assignable-add
RECORDED = "xen"  # a tree's recorded xl outputs: xen/xl-info, xen/xl-dmesg, ...
XL_COMMANDS = {
    "xl-info": ("xl", "info"),
    "xl-dmesg": ("xl", "dmesg"),
    "xl-pci-assignable-list": ("xl", "pci-assignable-list"),
}


def is_dom0(fs: Tree) -> bool:
    """Xen's control domain: the hypervisor is Xen and this domain controls it."""
    kind = fs.read_bytes(HYPERVISOR_TYPE)
    caps = fs.read_bytes(CAPABILITIES)
    return bool(kind and kind.strip() == b"xen" and caps and b"control_d" in caps)


def read(fs: Tree) -> Reading:
    """Any Linux host under ``fs``, a Xen dom0 judged by the hypervisor's evidence."""
    reading = read_host(fs=fs)
    return with_xen(reading, read_facts(fs)) if is_dom0(fs) else reading


def xl_outputs(fs: Tree) -> dict[str, str | None]:
    """What ``xl`` says (None where it could not be run or read)."""
    out: dict[str, str | None] = {}
    for name, argv in XL_COMMANDS.items():
        rel = f"{RECORDED}/{name}"
        if fs.live and isinstance(fs, Fs):
            ran = run_xl(argv)
            out[name] = ran.stdout if ran.returncode == 0 else None
            if ran.returncode == 0:
                fs.keep(rel, ran.stdout.encode())
        else:
            data = fs.read_bytes(rel)
            out[name] = data.decode("utf-8", "replace") if data is not None else None
    return out


def read_facts(fs: Tree) -> XenFacts:
    outputs = xl_outputs(fs)
    return xen_facts(
        outputs["xl-info"], outputs["xl-dmesg"], outputs["xl-pci-assignable-list"], _permissive(fs)
    )


def _permissive(fs: Tree) -> tuple[str, ...]:
    """Devices pciback lets guests write the whole config space of ("*": all of them)."""
    module = fs.read_bytes(PCIBACK_MODULE_PERMISSIVE)
    if module is not None and module.strip() in (b"Y", b"1"):
        return ("*",)
    listed = fs.read_bytes(PCIBACK_PERMISSIVE)
    return tuple(listed.decode("ascii", "replace").split()) if listed else ()


def with_journal(reading: Reading, state_dir: Path) -> Reading:
    """A dom0's reading with what pciguard's journal in ``state_dir`` says it made
    assignable (``XenFacts.made_assignable``; unknown when it cannot be read)."""
    xen = reading.facts.xen
    if xen is None or os.geteuid() != 0:
        return reading
    made: frozenset[Bdf] | None = frozenset()
    if (state_dir / "journal.sqlite").exists():
        try:
            journal = Journal(state_dir, readonly=True)
            rows = journal.devices()
            journal.close()
            made = frozenset(Bdf.parse(b) for b, row in rows.items() if row.state in MADE_ASSIGNABLE)
        except (JournalError, ValueError):
            made = None
    return replace(reading, facts=replace(reading.facts, xen=replace(xen, made_assignable=made)))


def with_xen(reading: Reading, facts: XenFacts) -> Reading:
    """The Linux reading of a dom0, judged by what Xen says: one IOMMU as Xen reports
    it, covering every device, and no kernel groups (Xen forms none: pciguard derives
    them from topology and ACS)."""
    unit = IommuUnit(
        f"xen ({facts.iommu_vendor or 'IOMMU'})",
        dma_remapping=facts.dma_remapping,
        interrupt_remapping=facts.interrupt_remapping,
    )
    host: Host = replace(reading.host, iommus=(unit,), kernel_groups=None)
    return replace(reading, host=host, facts=replace(reading.facts, xen=facts))
