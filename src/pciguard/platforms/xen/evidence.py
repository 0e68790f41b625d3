"""Xen's own evidence about DMA and interrupt isolation, read from the text of ``xl info``,
``xl dmesg`` and ``xl pci-assignable-list``. Pure functions: no I/O.

In a PV dom0 the kernel sees no IOMMU (no groups, no ``/sys/class/iommu``, the DMAR
table renamed), because Xen owns it. The hypervisor says what it set up in its boot
messages, in words that have been stable since Xen 4.2 (``xen/drivers/passthrough``):

    I/O virtualisation enabled            (or disabled)
     - Dom0 mode: Relaxed                  (Strict, Passthrough)
    Interrupt remapping enabled           (Xen 4.3 and later; or disabled)
    Intel VT-d Interrupt Remapping enabled.   (or "not enabled."; AMD: "AMD-Vi: ...")

A line may carry ``(XEN)``, a ``(d0)`` tag and a ``[timestamp]``. The console ring
keeps the newest messages: on a long-running host the boot lines may be gone, and
then what they would have said is unknown (judged as not isolated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pciguard.model import Bdf, Feature
from pciguard.model.kernel import XenFacts, XenQuarantine

_PREFIX = re.compile(r"^(?:\(XEN\)\s*)?(?:\[[^\]]*\]\s*)?(?:\(d\d+\)\s*)?")
_IO_VIRT = re.compile(r"^I/O virtualisation (en|dis)abled")
_DOM0_MODE = re.compile(r"^- Dom0 mode: (\w+)")
_INTREMAP = re.compile(r"^Interrupt remapping (en|dis)abled")
_VTD_INTREMAP = re.compile(r"^Intel VT-d Interrupt Remapping (not )?enabled")
_AMD_INTREMAP = re.compile(r"^AMD-Vi: (?:IO-APIC |)Interrupt remapping (en|dis)abled", re.IGNORECASE)
_BOOT_BANNER = re.compile(r"^Xen version \d+\.\d+")
_VERSION = re.compile(r"^(\d+)\.(\d+)")
_ANY_BDF = re.compile(r"\b[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\b")
_BDF = re.compile(r"^((?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\b")


@dataclass(frozen=True)
class IommuOptions:
    """What Xen's ``iommu=`` options (a comma-separated list, repeatable) ask for."""

    enabled: bool | None = None  # iommu=0/off/no/false: False; iommu=1/on/force: True
    interrupt_remapping: bool | None = None  # intremap / no-intremap
    quarantine: XenQuarantine | None = None
    dom0_passthrough: bool = False


def parse_xl_info(text: str) -> dict[str, str]:
    """``key : value`` lines; a value that goes on past the first line (a long command
    line) is continued by lines without a colon."""
    out: dict[str, str] = {}
    last = None
    for line in text.replace("\r", "").splitlines():
        key, sep, value = line.partition(":")
        if sep and re.fullmatch(r"[a-z_0-9]+", key.strip()):
            last = key.strip()
            out[last] = value.strip()
        elif last is not None and line.strip():
            out[last] = f"{out[last]} {line.strip()}"
    return out


def iommu_options(commandline: str) -> IommuOptions:
    """Xen's reading of ``iommu=`` (xen/drivers/passthrough/iommu.c, parse_iommu_param):
    later options win, as they do in Xen."""
    enabled: bool | None = None
    intremap: bool | None = None
    quarantine: XenQuarantine | None = None
    passthrough = False
    for word in commandline.split():
        name, _, value = word.partition("=")
        if name != "iommu":
            if name in ("no-intremap", "intremap"):  # x86's own switch (iommu=no-intremap too)
                intremap = name == "intremap"
            continue
        for option in value.split(","):
            option = option.strip().lower()
            negated = option.startswith("no-")
            bare = option[3:] if negated else option
            key, _, arg = bare.partition("=")
            if option in ("0", "off", "no", "false", "disable"):
                enabled = False
            elif option in ("1", "on", "yes", "true", "enable", "force", "required"):
                enabled = True
            elif key == "intremap":
                intremap = not negated
            elif key == "quarantine" and negated:
                quarantine = XenQuarantine.NONE
            elif key == "quarantine":
                quarantine = {
                    "": XenQuarantine.BASIC,
                    "1": XenQuarantine.BASIC,
                    "true": XenQuarantine.BASIC,
                    "on": XenQuarantine.BASIC,
                    "basic": XenQuarantine.BASIC,
                    "0": XenQuarantine.NONE,
                    "false": XenQuarantine.NONE,
                    "off": XenQuarantine.NONE,
                    "scratch-page": XenQuarantine.SCRATCH_PAGE,
                }.get(arg, quarantine)
            elif key in ("dom0-passthrough", "passthrough"):
                passthrough = not negated
    return IommuOptions(enabled, intremap, quarantine, passthrough)


def default_quarantine(version: str | None) -> XenQuarantine | None:
    """Where a Xen of ``version`` puts an assignable device when ``iommu=`` says nothing:
    dom0 before the XSA-302 fix (4.12.2, 4.13), DOMID_IO after; None: not known."""
    found = _VERSION.match(version or "")
    if found is None:
        return None
    major, minor = int(found.group(1)), int(found.group(2))
    return XenQuarantine.BASIC if (major, minor) >= (4, 13) else None


@dataclass(frozen=True)
class BootMessages:
    iommu_vendor: str | None
    dma_remapping: Feature
    interrupt_remapping: Feature
    dom0_mode: str | None
    complete: bool  # the log starts at boot: what it lacks was never said


def parse_xl_dmesg(text: str) -> BootMessages:
    vendor = None
    dma = intremap = Feature.UNKNOWN
    mode = None
    complete = False
    for raw in text.replace("\r", "").splitlines():
        line = _PREFIX.sub("", raw.strip()).strip()
        if _BOOT_BANNER.match(line) or line.startswith(" __  __"):
            complete = True
        if line.startswith("Intel VT-d"):
            vendor = "Intel VT-d"
        elif line.startswith("AMD-Vi"):
            vendor = "AMD-Vi"
        if found := _IO_VIRT.match(line):
            dma = Feature.ENABLED if found.group(1) == "en" else Feature.DISABLED
        elif found := _DOM0_MODE.match(line):
            mode = found.group(1)
        elif found := _INTREMAP.match(line):
            intremap = Feature.ENABLED if found.group(1) == "en" else Feature.DISABLED
        elif (found := _VTD_INTREMAP.match(line)) and intremap is Feature.UNKNOWN:
            intremap = Feature.DISABLED if found.group(1) else Feature.ENABLED
        elif (found := _AMD_INTREMAP.match(line)) and intremap is Feature.UNKNOWN:
            intremap = Feature.ENABLED if found.group(1).lower() == "en" else Feature.DISABLED
    if dma is Feature.DISABLED:
        intremap = Feature.DISABLED  # Xen turns interrupt remapping off with the IOMMU
    elif dma is Feature.ENABLED and intremap is Feature.UNKNOWN and complete:
        intremap = Feature.DISABLED  # a whole boot log that never says it was enabled
    return BootMessages(vendor, dma, intremap, mode, complete)


def parse_assignable(text: str) -> tuple[Bdf, ...]:
    """``xl pci-assignable-list``: a BDF at the start of each line (newer versions
    follow it with a name)."""
    out = []
    for line in text.replace("\r", "").splitlines():
        if found := _BDF.match(line.strip()):
            out.append(Bdf.parse(found.group(1)))
    return tuple(out)


def parse_pci_list(text: str) -> tuple[Bdf, ...]:
    """``xl pci-list DOMAIN``: a header, then the guest's virtual slot and the device."""
    return tuple(Bdf.parse(found) for found in _ANY_BDF.findall(text.replace("\r", "")))


def hide_parameter(devices: list[Bdf]) -> str:
    """The dom0 kernel's parameter that has xen-pciback take ``devices`` at boot, before
    any dom0 driver (``xen-pciback.hide=(DDDD:BB:DD.F)...``)."""
    return "xen-pciback.hide=" + "".join(f"({d})" for d in sorted(set(devices)))


def xen_facts(
    xl_info: str | None,
    xl_dmesg: str | None,
    assignable: str | None = None,
    permissive: tuple[str, ...] = (),
) -> XenFacts:
    """Everything the dom0 was told, judged fail closed: what no evidence says is unknown."""
    info = parse_xl_info(xl_info or "")
    boot = parse_xl_dmesg(xl_dmesg or "")
    commandline = info.get("xen_commandline", "")
    options = iommu_options(commandline)
    dma, intremap = boot.dma_remapping, boot.interrupt_remapping
    if options.enabled is False:
        dma = intremap = Feature.DISABLED
    if options.interrupt_remapping is False:
        intremap = Feature.DISABLED
    caps = frozenset(info.get("virt_caps", "").split())
    version = info.get("xen_version") or None
    quarantine = options.quarantine or default_quarantine(version)
    return XenFacts(
        version=version,
        commandline=commandline,
        iommu_vendor=boot.iommu_vendor,
        dma_remapping=dma,
        interrupt_remapping=intremap,
        dom0_mode="Passthrough" if options.dom0_passthrough else boot.dom0_mode,
        quarantine=quarantine if dma is not Feature.DISABLED else XenQuarantine.NONE,
        directio=caps & {"hvm_directio", "pv_directio"},
        assignable=parse_assignable(assignable or ""),
        permissive=permissive,
        boot_log_complete=boot.complete,
    )
