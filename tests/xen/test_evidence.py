"""A Xen dom0's evidence: what ``xl info``, ``xl dmesg`` and ``xl pci-assignable-list``
say in the wording of several Xen versions, and the audit of a dom0 built on it (a fake
dom0 tree: no IOMMU groups, no DMAR, as a PV dom0 sees its sysfs)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import CORPUS, audit_reading, bdf, example
from fakexen import FakeXl, dom0, text
from pciguard.model import Bdf, Feature
from pciguard.model.kernel import XenQuarantine
from pciguard.platforms.linux.sysfs import Fs
from pciguard.platforms.xen.dom0 import is_dom0, read
from pciguard.platforms.xen.evidence import (
    default_quarantine,
    iommu_options,
    parse_assignable,
    parse_xl_dmesg,
    parse_xl_info,
    xen_facts,
)

XEN = CORPUS / "xen"
NIC = "0000:03:00.0"
ON, OFF, UNKNOWN = Feature.ENABLED, Feature.DISABLED, Feature.UNKNOWN


def test_the_lab_xens_own_xl_info() -> None:
    facts = xen_facts(text("lab-4.17-xl-info.txt"), text("lab-4.17-xl-dmesg.txt"))
    assert facts.version == "4.17.5" and facts.quarantine is XenQuarantine.BASIC
    assert facts.directio == frozenset({"hvm_directio", "pv_directio"})
    assert (facts.dma_remapping, facts.interrupt_remapping) == (ON, ON)


def test_xl_info_keys_and_a_command_line_that_goes_on_to_the_next_line() -> None:
    info = parse_xl_info(text("xl-info-4.17.txt"))
    assert info["xen_version"] == "4.17.5"
    assert info["virt_caps"].split() == ["pv", "hvm", "hvm_directio", "pv_directio"]
    assert info["xen_commandline"].endswith("dom0_max_vcpus=1 iommu=verbose,debug")
    assert info["xen_changeset"] == ""


@pytest.mark.parametrize(
    ("name", "vendor", "dma", "intremap", "mode", "complete"),
    [
        ("xl-dmesg-4.17-vtd.txt", "Intel VT-d", ON, ON, "Relaxed", True),
        ("lab-4.17-xl-dmesg.txt", "Intel VT-d", ON, ON, "Relaxed", True),  # the real one
        # Before Xen 4.3 only VT-d's own line said whether interrupts were remapped.
        ("xl-dmesg-4.2-vtd-no-intremap.txt", "Intel VT-d", ON, OFF, "Relaxed", True),
        ("xl-dmesg-4.14-amd.txt", "AMD-Vi", ON, ON, "Relaxed", True),
        ("xl-dmesg-iommu-off.txt", None, OFF, OFF, None, True),
        # The console ring wrapped: the boot lines are gone, and nothing is known.
        ("xl-dmesg-wrapped.txt", None, UNKNOWN, UNKNOWN, None, False),
    ],
)
def test_boot_messages_of_each_version(
    name: str, vendor: str | None, dma: Feature, intremap: Feature, mode: str | None, complete: bool
) -> None:
    boot = parse_xl_dmesg(text(name))
    assert (boot.iommu_vendor, boot.dma_remapping, boot.interrupt_remapping) == (vendor, dma, intremap)
    assert (boot.dom0_mode, boot.complete) == (mode, complete)


def test_a_boot_log_that_never_says_interrupt_remapping_was_enabled_means_it_was_not() -> None:
    lines = "(XEN) Xen version 4.17.0 (x)\n(XEN) I/O virtualisation enabled\n"
    assert parse_xl_dmesg(lines).interrupt_remapping is Feature.DISABLED
    # ... but a log that lost its start cannot say so.
    assert parse_xl_dmesg("(XEN) I/O virtualisation enabled\n").interrupt_remapping is Feature.UNKNOWN


@pytest.mark.parametrize(
    ("commandline", "enabled", "intremap", "quarantine", "passthrough"),
    [
        ("iommu=verbose,debug", None, None, None, False),
        ("iommu=0", False, None, None, False),
        ("iommu=force,no-intremap", True, False, None, False),
        ("iommu=no-quarantine", None, None, XenQuarantine.NONE, False),
        ("iommu=quarantine=scratch-page,verbose", None, None, XenQuarantine.SCRATCH_PAGE, False),
        ("iommu=quarantine=0 iommu=quarantine", None, None, XenQuarantine.BASIC, False),  # the last wins
        ("iommu=dom0-passthrough", None, None, None, True),
        ("no-intremap dom0_mem=1G", None, False, None, False),
    ],
)
def test_iommu_options_as_xen_reads_them(
    commandline: str,
    enabled: bool | None,
    intremap: bool | None,
    quarantine: XenQuarantine | None,
    passthrough: bool,
) -> None:
    options = iommu_options(commandline)
    assert (options.enabled, options.interrupt_remapping) == (enabled, intremap)
    assert (options.quarantine, options.dom0_passthrough) == (quarantine, passthrough)


def test_quarantine_by_default_only_from_the_xsa_302_fix_on() -> None:
    assert default_quarantine("4.17.5") is XenQuarantine.BASIC
    assert default_quarantine("4.13.0") is XenQuarantine.BASIC
    assert default_quarantine("4.11.4") is None  # not known to quarantine: judged as not
    assert default_quarantine(None) is None


def test_assignable_devices_with_and_without_names() -> None:
    assert parse_assignable(text("xl-pci-assignable-list-4.17.txt")) == (bdf("01:00.0"), bdf("02:00.0"))
    assert parse_assignable(text("xl-pci-assignable-list-named.txt")) == (bdf("01:00.0"), bdf("01:00.1"))
    assert parse_assignable("garbage\n\x00\x01 nothing here\n") == ()


def test_the_command_line_overrules_the_boot_log_toward_off() -> None:
    facts = xen_facts(text("xl-info-4.17-no-quarantine-permissive.txt"), text("xl-dmesg-4.17-vtd.txt"))
    assert facts.quarantine is XenQuarantine.NONE and facts.dom0_mode == "Passthrough"
    old = xen_facts(text("xl-info-4.11-no-quarantine.txt"), text("xl-dmesg-4.2-vtd-no-intremap.txt"))
    assert old.quarantine is None and old.interrupt_remapping is Feature.DISABLED
    assert old.directio == frozenset({"hvm_directio"})


def test_nothing_from_xl_is_nothing_known() -> None:
    facts = xen_facts(None, None)
    assert facts.dma_remapping is Feature.UNKNOWN and facts.interrupt_remapping is Feature.UNKNOWN
    assert facts.version is None and facts.quarantine is None


# -- the audit of a dom0 -------------------------------------------------------------
def test_a_dom0_is_audited_from_xens_evidence_with_groups_pciguard_derives(tree: Callable[..., Path]) -> None:
    root = dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")
    assert is_dom0(Fs(str(root)))
    report = audit_reading(read(Fs(str(root))))
    codes = {f.code for f in report.findings}
    assert "xen-dom0" in codes and "xen-quarantine" in codes
    # None of what a Linux kernel's missing IOMMU would mean: Xen owns it.
    assert not codes & {"no-groups", "no-firmware-iommu", "interrupt-remapping-unknown"}, codes
    (unit,) = report.iommus
    assert (unit.dma_remapping, unit.interrupt_remapping) == ("enabled", "enabled")
    gpu = next(g for g in report.groups if any(m.bdf == "0000:01:00.0" for m in g.members))
    assert gpu.number is not None and {m.bdf for m in gpu.members} >= {"0000:01:00.0", "0000:01:00.1"}
    assert gpu.verdict.value != "not-assignable", [r.message for r in gpu.reasons]
    # The firmware's 1:1 regions are read from Xen's renamed copy of the DMAR table.
    usb = next(g for g in report.groups if any(m.bdf == "0000:00:14.0" for m in g.members))
    assert "reserved-region" in {r.code for r in usb.reasons}


@pytest.mark.parametrize(
    ("info", "dmesg", "code"),
    [
        ("xl-info-4.17.txt", "xl-dmesg-iommu-off.txt", "xen-iommu-off"),
        ("xl-info-4.11-no-quarantine.txt", "xl-dmesg-4.2-vtd-no-intremap.txt", "xen-no-interrupt-remapping"),
        ("xl-info-4.17-no-quarantine-permissive.txt", "xl-dmesg-4.17-vtd.txt", "xen-no-quarantine"),
        ("xl-info-4.17-no-quarantine-permissive.txt", "xl-dmesg-4.17-vtd.txt", "xen-dom0-passthrough"),
        ("xl-info-4.17.txt", "xl-dmesg-wrapped.txt", "xen-boot-log-lost"),
    ],
)
def test_each_xen_finding_appears_when_its_evidence_does(
    tree: Callable[..., Path], info: str, dmesg: str, code: str
) -> None:
    report = audit_reading(read(Fs(str(dom0(tree, info, dmesg)))))
    found = {f.code: f for f in report.findings}
    assert code in found
    assert report.critical or found[code].severity.value != "critical"
    clean = audit_reading(read(Fs(str(dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")))))
    assert code not in {f.code for f in clean.findings}


def test_pciback_permissive_is_reported_as_unsafe(tree: Callable[..., Path]) -> None:
    root = dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")
    folder = root / "sys/module/xen_pciback/parameters"
    folder.mkdir(parents=True)
    (folder / "permissive").write_text("Y\n")
    report = audit_reading(read(Fs(str(root))))
    assert any(f.code == "unsafe-override" and "permissive" in f.message for f in report.findings)


def test_a_linux_host_is_not_taken_for_a_dom0(tree: Callable[..., Path]) -> None:
    root = tree("workstation")
    assert not is_dom0(Fs(str(root)))
    (root / "sys/hypervisor").mkdir(parents=True, exist_ok=True)
    (root / "sys/hypervisor/type").write_text("xen\n")  # a Xen guest (domU): not the control domain
    assert not is_dom0(Fs(str(root)))
    assert read(Fs(str(root))).facts.xen is None


@pytest.mark.parametrize(
    ("info", "made_assignable", "state"),
    [
        ("xl-info-4.17.txt", frozenset({bdf(NIC)}), "quarantined"),
        ("xl-info-4.17.txt", frozenset(), "host"),  # pciback seized it: still in dom0's context
        ("xl-info-4.17.txt", None, "host"),  # the journal was not read: unknown
        ("xl-info-4.17-no-quarantine-permissive.txt", frozenset({bdf(NIC)}), "host"),
    ],
)
def test_a_device_with_pciback_is_quarantined_only_when_pciguard_made_it_assignable_and_xen_quarantines(
    tree: Callable[..., Path], info: str, made_assignable: frozenset[Bdf] | None, state: str
) -> None:
    root = dom0(tree, info, "xl-dmesg-4.17-vtd.txt")
    FakeXl(root)._bind(NIC, "pciback")
    reading = read(Fs(str(root)))
    assert reading.facts.xen is not None
    xen = replace(reading.facts.xen, made_assignable=made_assignable)
    report = audit_reading(replace(reading, facts=replace(reading.facts, xen=xen)))
    (nic,) = [m for g in report.groups for m in g.members if m.bdf == NIC]
    assert nic.state == state
    seized = [f.message for f in report.findings if f.code == "xen-pciback-not-assignable"]
    assert bool(seized) == ((made_assignable is not None and not made_assignable) or made_assignable is None)
    assert all(NIC in m and "`pciguard quarantine` it" in m for m in seized)
    assert all(("journal was not read" in m) == (made_assignable is None) for m in seized)


def test_the_audit_in_a_dom0_reads_from_the_journal_what_pciguard_made_assignable(
    tree: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fakekernel import installed, prepare
    from pciguard.cli.main import app
    from pciguard.platforms.linux.enforce import Enforcer
    from pciguard.platforms.xen import platform
    from xen.test_crashes import fake_xl

    root = dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")
    prepare(root, example("workstation"))
    FakeXl(root).save()
    monkeypatch.setattr(platform, "run_xl", fake_xl(root))
    where = ["--root", str(root), "--state-dir", str(root / "state")]

    def state_of_nic() -> tuple[str, list[str]]:
        shown = CliRunner().invoke(app, ["audit", "--json", *where])
        report = json.loads(shown.stdout)
        (nic,) = [m for g in report["groups"] for m in g["members"] if m["bdf"] == NIC]
        return nic["state"], [f["code"] for f in report["findings"]]

    with installed(root):
        FakeXl(root)._bind(NIC, "pciback")  # seized by pciback, as xen-pciback.hide= does
        state, codes = state_of_nic()
        assert state == "host" and "xen-pciback-not-assignable" in codes
        done = Enforcer(str(root), root / "state").quarantine(bdf(NIC))
        assert [str(w) for w in done.writes] == [
            f"xl pci-assignable-add {NIC}",  # pciback held it, Xen had not quarantined it
            f"echo 1 > /sys/bus/pci/devices/{NIC}/reset",
        ]
        state, codes = state_of_nic()
        assert state == "quarantined" and "xen-pciback-not-assignable" not in codes


def test_a_snapshot_of_a_dom0_keeps_what_xen_said_without_the_host_name(
    tree: Callable[..., Path], tmp_path: Path
) -> None:
    from pciguard.platforms.linux.snapshot import read_snapshot, take_snapshot

    root = dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")
    take_snapshot(str(root), tmp_path / "dom0.tar.gz")
    again = read_snapshot(tmp_path / "dom0.tar.gz").facts.xen
    assert again is not None and again.commandline == "iommu=verbose,debug"
    assert replace(again, commandline="") == replace(read(Fs(str(root))).facts.xen, commandline="")  # type: ignore[arg-type]
    with tarfile.open(tmp_path / "dom0.tar.gz") as tar:
        info = tar.extractfile("xen/xl-info").read().decode()  # type: ignore[union-attr]
    assert "dom0-lab" not in info and "console=com1" not in info and "iommu=verbose,debug" in info


def test_the_hide_line_holds_every_assignable_device_and_its_group_from_boot(
    tree: Callable[..., Path],
) -> None:
    from typer.testing import CliRunner

    from pciguard.cli.main import app

    root = dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")
    (root / "xen/xl-pci-assignable-list").write_text("0000:01:00.0\n")  # the GPU; its audio goes too
    shown = CliRunner().invoke(app, ["guard", "xen-hide", "--root", str(root)])
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[0] == "xen-pciback.hide=(0000:01:00.0)(0000:01:00.1)"
    linux = CliRunner().invoke(app, ["guard", "xen-hide", "--root", str(tree("workstation"))])
    assert linux.exit_code == 2 and "not a Xen dom0" in " ".join(linux.output.split())
