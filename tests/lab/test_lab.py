"""pciguard on a real Linux kernel with an emulated Intel IOMMU (QEMU, TCG).

Four guests boot once per session (see machines.py): ``topologies`` (root ports with
ACS, a switch below a root port without ACS, a PCIe-to-PCI bridge with two conventional
devices, an e1000e NIC), ``iommu-pt`` (booted with iommu=pt), ``intremap-off``
(booted with intremap=off) and ``hotplug`` (three empty root ports, filled through the
QEMU monitor while ``pciguard guard`` runs). In each, pciguard audits the guest's real sysfs, and the
edu DMA probe shows what the IOMMU really does with a device's DMA.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from typer.testing import CliRunner

from lab.edu_probe import dmar_fault_interrupts
from lab.machines import CHECKOUT, Outcome
from pciguard.cli.main import app
from pciguard.formats.platform_file import load_platform
from pciguard.model import Host
from pciguard.platforms.linux.snapshot import read_snapshot

pytestmark = pytest.mark.lab


def report(outcome: Outcome, step: str = "audit") -> dict[str, Any]:
    ran = outcome.step(step)
    assert "json" in ran, f"{outcome.machine.name}: pciguard printed no JSON:\n{ran}"
    return dict(ran["json"])


def reported_groups(rep: dict[str, Any]) -> dict[int, set[str]]:
    return {g["number"]: {m["bdf"] for m in g["members"]} for g in rep["groups"] if g["number"] is not None}


def kernel_groups(outcome: Outcome, step: str = "truth") -> dict[int, set[str]]:
    return {int(n): set(g["devices"]) for n, g in outcome.step(step)["groups"].items()}


def group_of(rep: dict[str, Any], bdf: str) -> dict[str, Any]:
    (found,) = [g for g in rep["groups"] if bdf in {m["bdf"] for m in g["members"]}]
    return dict(found)


def codes(entries: list[dict[str, Any]]) -> set[str]:
    return {e["code"] for e in entries}


def snapshot_host(outcome: Outcome) -> Host:
    return read_snapshot(outcome.out / "snapshot.tar.gz").host


# Groups: pciguard reports the kernel's, and its own derivation agrees ------------------
@pytest.mark.parametrize("machine", ["topologies", "passthrough", "no_intremap"])
def test_every_group_pciguard_reports_is_the_kernels(machine: str, request: pytest.FixtureRequest) -> None:
    outcome: Outcome = request.getfixturevalue(machine)
    rep, truth = report(outcome), outcome.step("truth")
    assert reported_groups(rep) == kernel_groups(outcome)
    domains = {int(n): g["type"] for n, g in truth["groups"].items()}
    assert {g["number"]: g["domain"] for g in rep["groups"]} == domains
    drivers = {m["bdf"]: m["driver"] for g in rep["groups"] for m in g["members"]}
    assert drivers == truth["drivers"]


def test_pciguards_derivation_agrees_with_the_kernel_on_every_lab_topology(topologies: Outcome) -> None:
    host = snapshot_host(topologies)
    derived = {frozenset(str(b) for b in g.members) for g in host.derived_groups}
    assert derived == {frozenset(members) for members in kernel_groups(topologies).values()}
    assert host.groups_differing == {}
    assert "groups-differ" not in codes(report(topologies)["findings"])


def test_each_lab_topology_forms_the_groups_linux_documents(topologies: Outcome) -> None:
    bdf = topologies.bdf
    groups = {frozenset(members) for members in kernel_groups(topologies).values()}
    assert {bdf("edu1")} in groups and {bdf("edu2")} in groups  # root ports with ACS
    switch = {bdf("ioh3420"), bdf("switch-up"), bdf("edu3"), bdf("edu4")}
    (switch_group,) = [g for g in groups if switch <= g]  # no ACS at the root port: one group
    assert len(switch_group) == 6  # with the switch's two downstream ports
    assert {bdf("pci-bridge"), bdf("edu5"), bdf("edu6")} in groups  # one requester ID behind the bridge
    rep = report(topologies)
    assert "no-acs" in codes(group_of(rep, bdf("edu3"))["notes"])
    assert {"0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"} in groups  # ICH9 functions without ACS


def test_the_simulated_lab_platforms_predict_the_real_groups(topologies: Outcome) -> None:
    """examples/lab/*.yaml describe the lab machines for the simulator: each of their
    groups, by the kinds of its members, is one the real kernel formed."""

    def shapes(host: Host, groups: Any) -> Counter[tuple[str, ...]]:
        return Counter(tuple(sorted(host.topology[b].kind.value for b in g.members)) for g in groups)

    real_host = snapshot_host(topologies)
    real = shapes(real_host, real_host.groups)
    for path in sorted((CHECKOUT / "examples" / "lab").glob("*.yaml")):
        predicted = load_platform(path)
        assert shapes(predicted, predicted.groups) <= real, path.name


# Interrupt remapping and the firmware table ------------------------------------------
def test_interrupt_remapping_is_detected_as_enabled(topologies: Outcome) -> None:
    rep, truth = report(topologies), topologies.step("truth")
    assert [u["interrupt_remapping"] for u in rep["iommus"]] == ["enabled"]
    assert [u["dma_remapping"] for u in rep["iommus"]] == ["enabled"]
    assert "no-interrupt-remapping" not in codes(rep["findings"])
    assert any("Enabled IRQ remapping" in line for line in truth["dmesg"])  # the kernel agrees
    assert " IR-" in truth["interrupts"]


def test_interrupt_remapping_is_detected_as_absent_under_intremap_off(no_intremap: Outcome) -> None:
    ran, truth = no_intremap.step("audit"), no_intremap.step("truth")
    rep = report(no_intremap)
    assert "intremap=off" in truth["cmdline"] and " IR-" not in truth["interrupts"]
    assert [u["interrupt_remapping"] for u in rep["iommus"]] == ["disabled"]
    assert "no-interrupt-remapping" in codes(rep["findings"]) and ran["exit"] == 1
    edu = group_of(rep, no_intremap.bdf("edu1"))
    assert edu["verdict"] == "not-assignable" and "msi-not-isolated" in codes(edu["reasons"])
    assert rep["firmware"]["flags"] == ["INTR_REMAP"]  # the firmware offers it; the kernel declined


def test_dmar_flags_are_read(topologies: Outcome) -> None:
    firmware, flags = report(topologies)["firmware"], topologies.step("truth")["dmar_flags"]
    assert firmware["table"] == "DMAR" and firmware["units"] == 1
    assert ("INTR_REMAP" in firmware["flags"]) == bool(flags & 0x1)
    assert ("X2APIC_OPT_OUT" in firmware["flags"]) == bool(flags & 0x2)
    assert ("DMA_CTRL_PLATFORM_OPT_IN" in firmware["flags"]) == bool(flags & 0x4)
    assert firmware["preboot_dma_protection"] is bool(flags & 0x4)


# The ground truth the audit relies on, seen by DMA ------------------------------------
def test_a_driverless_device_in_a_dma_domain_is_blocked_and_the_audit_agrees(topologies: Outcome) -> None:
    for name in ("edu1", "edu5"):  # under a root port; behind a PCIe-to-PCI bridge
        probe = topologies.step(f"probe-{name}-dma")
        assert probe["verdict"] == "BLOCKED" and probe["dmar_faults"] > 0, probe
    edu1 = group_of(report(topologies), topologies.bdf("edu1"))
    assert edu1["domain"] == "DMA" and edu1["verdict"] == "ready-after-quarantine"
    assert "identity-domain" not in codes(edu1["reasons"])


def test_the_same_device_in_an_identity_group_lands_and_the_audit_refuses_it(topologies: Outcome) -> None:
    assert topologies.step("edu1-to-identity")["type"] == "identity"
    probe = topologies.step("probe-edu1-identity")
    assert probe["verdict"] == "LANDED" and probe["dmar_faults"] == 0, probe
    rep = report(topologies, "audit-edu1-identity")
    edu1 = group_of(rep, topologies.bdf("edu1"))
    assert edu1["domain"] == "identity" and edu1["verdict"] == "not-assignable"
    assert "identity-domain" in codes(edu1["reasons"])
    assert "identity-domains" in codes(rep["findings"])
    assert reported_groups(rep) == kernel_groups(topologies, "truth-edu1-identity")


def test_under_iommu_pt_every_group_is_flagged_as_not_translating_as_it_stands(passthrough: Outcome) -> None:
    ran, truth = passthrough.step("audit"), passthrough.step("truth")
    assert {g["type"] for g in truth["groups"].values()} == {"identity"}
    rep = report(passthrough)
    assert ran["exit"] == 1 and "identity-domains" in codes(rep["findings"])
    probe = passthrough.step("probe-edu1")
    assert probe["verdict"] == "LANDED", probe
    edu1 = group_of(rep, passthrough.bdf("edu1"))
    assert edu1["verdict"] == "not-assignable" and "identity-domain" in codes(edu1["reasons"])


def test_without_interrupt_remapping_dma_is_still_translated(no_intremap: Outcome) -> None:
    probe = no_intremap.step("probe-edu1")
    assert probe["verdict"] == "BLOCKED" and probe["dmar_faults"] > 0, probe


# Enforcement: quarantine with vfio-pci, and back ---------------------------------------
def test_quarantine_binds_vfio_pci_and_the_dma_is_blocked(topologies: Outcome) -> None:
    edu2, nic = topologies.bdf("edu2"), topologies.bdf("nic")
    for step in ("quarantine-edu2", "quarantine-nic"):
        assert topologies.step(step)["exit"] == 0, topologies.step(step)
    drivers = topologies.step("truth-quarantined")["drivers"]
    assert (drivers[edu2], drivers[nic]) == ("vfio-pci", "vfio-pci")
    for step in ("probe-edu2-quarantined", "probe-nic-quarantined"):
        probe = topologies.step(step)
        assert probe["verdict"] == "BLOCKED" and probe["dmar_faults"] > 0, probe
    rep = report(topologies, "audit-quarantined")
    assert group_of(rep, edu2)["verdict"] == "ready" and group_of(rep, nic)["verdict"] == "ready"


def test_the_nic_probe_sees_dma_land_when_nothing_blocks_it(topologies: Outcome) -> None:
    """The other half of the NIC's BLOCKED: driver-less in an identity group, it lands."""
    assert topologies.step("nic-to-identity")["type"] == "identity"
    probe = topologies.step("probe-nic-identity")
    assert probe["verdict"] == "LANDED" and probe["dmar_faults"] == 0, probe


def test_an_assigned_device_reaches_only_its_vms_page_and_is_blocked_once_the_vm_dies(
    topologies: Outcome,
) -> None:
    before = topologies.step("vfio-before-assign")
    assert "Permission denied" in before["greeting"]  # not the VM's before assign
    assigned = topologies.step("assign-edu2")
    assert (
        assigned["exit"] == 0 and "<hostdev mode='subsystem' type='pci' managed='no'>" in assigned["output"]
    )
    session = topologies.step("vfio-assigned")
    assert session["greeting"].startswith("ready"), session
    assert session["into-vm-page"][0] == "LANDED", session
    assert session["into-host-page"][0] == "BLOCKED", session
    assert session["into-unmapped-iova"]["faults"] > 0, session
    assert session["after-the-vm-died"]["verdict"] == "BLOCKED", session  # back in quarantine
    assert topologies.step("release-edu2")["exit"] == 0
    assert topologies.step("truth-released")["drivers"][topologies.bdf("edu2")] == "vfio-pci"


def test_assignment_without_interrupt_remapping_is_refused_by_pciguard_and_by_vfio(
    no_intremap: Outcome,
) -> None:
    refused = no_intremap.step("assign-edu1")
    assert refused["exit"] == 5 and "interrupt remapping" in refused["stderr"]
    vfio = no_intremap.step("vfio-as-root")  # VFIO's own check (no allow_unsafe_interrupts)
    assert vfio["greeting"] == "error [Errno 1] Operation not permitted", vfio


def test_unquarantine_gives_the_nic_back_to_e1000e(topologies: Outcome) -> None:
    edu2, nic = topologies.bdf("edu2"), topologies.bdf("nic")
    for step in ("unquarantine-nic", "unquarantine-edu2"):
        assert topologies.step(step)["exit"] == 0, topologies.step(step)
    drivers = topologies.step("truth-unquarantined")["drivers"]
    assert (drivers[edu2], drivers[nic]) == (None, "e1000e")
    journal = topologies.step("journal")["output"]
    assert journal.count(": done\n") == 6 and "intended" not in journal and "failed" not in journal


def test_under_iommu_pt_quarantine_makes_the_group_translating_and_unquarantine_restores_it(
    passthrough: Outcome,
) -> None:
    edu1 = passthrough.bdf("edu1")
    assert passthrough.step("probe-edu1")["verdict"] == "LANDED"  # identity: vfio-pci alone would not help
    quarantined = passthrough.step("quarantine-edu1")
    assert quarantined["exit"] == 0 and "echo DMA > /sys/kernel/iommu_groups/" in quarantined["output"]

    def group_type(step: str) -> str:
        truth = passthrough.step(step)
        (kind,) = [g["type"] for g in truth["groups"].values() if edu1 in g["devices"]]
        return str(kind)

    after = passthrough.step("truth-after-quarantine")
    assert (group_type("truth-after-quarantine"), after["drivers"][edu1]) == ("DMA", "vfio-pci")
    probe = passthrough.step("probe-edu1-after-quarantine")
    assert probe["verdict"] == "BLOCKED" and probe["dmar_faults"] > 0, probe
    assert passthrough.step("unquarantine-edu1")["exit"] == 0
    back = passthrough.step("truth-after-unquarantine")
    assert (group_type("truth-after-unquarantine"), back["drivers"][edu1]) == ("identity", None)
    assert passthrough.step("probe-edu1-after-unquarantine")["verdict"] == "LANDED"


def test_quarantine_blocks_dma_without_interrupt_remapping_too(no_intremap: Outcome) -> None:
    assert no_intremap.step("quarantine-edu1")["exit"] == 0
    assert no_intremap.step("truth-after-quarantine")["drivers"][no_intremap.bdf("edu1")] == "vfio-pci"
    probe = no_intremap.step("probe-edu1-after-quarantine")
    assert probe["verdict"] == "BLOCKED" and probe["dmar_faults"] > 0, probe


# Other ways of running it ---------------------------------------------------------------
def test_an_ordinary_user_sees_the_same_groups_and_is_told_what_is_hidden(topologies: Outcome) -> None:
    root, user = report(topologies), report(topologies, "audit-as-nobody")
    assert reported_groups(user) == reported_groups(root)
    hidden = {lim["path"] for lim in user["limitations"]}
    assert {"sys/bus/pci/devices/*/config", "sys/firmware/acpi/tables/DMAR"} <= hidden
    assert "derivation-skipped" in codes(user["findings"])
    assert root["limitations"] == []


def test_a_snapshot_taken_in_the_guest_gives_the_same_report_here(topologies: Outcome) -> None:
    snapshot = topologies.out / "snapshot.tar.gz"
    result = CliRunner().invoke(app, ["audit", "--snapshot", str(snapshot), "--json"])
    here, there = json.loads(result.stdout), report(topologies)
    assert here.pop("source") != there.pop("source")
    assert here.pop("host") == "snapshot" and there.pop("host") != "snapshot"  # no host names in snapshots
    assert here == there


def test_the_nic_is_driven_by_its_host_driver(topologies: Outcome) -> None:
    nic = group_of(report(topologies), topologies.bdf("nic"))
    assert [m["driver"] for m in nic["members"]] == ["e1000e"]
    assert nic["verdict"] == "ready-after-quarantine"


def test_dmar_fault_interrupts_are_summed_over_cpus() -> None:
    text = (
        "           CPU0       CPU1\n"
        "  0:        161          0  IR-IO-APIC    2-edge      timer\n"
        " 24:          3          4  DMAR-MSI    0-edge      dmar0\n"
        " 25:          1          0  DMAR-MSI    1-edge      dmar1\n"
    )
    assert dmar_fault_interrupts(text) == 8


# The hot-plug guard -----------------------------------------------------------------------
def guard_step(hotplug: Outcome) -> dict[str, Any]:
    ran = dict(hotplug.step("guard"))
    assert ran["guard-exit"] == 0, ran["guard-log"]
    assert set(ran["devices"].values()) < set(ran["decisions"]), ran["guard-log"]
    return ran


def rejected(ran: dict[str, Any]) -> list[str]:
    return [bdf for bdf in ran["decisions"] if bdf not in ran["devices"].values()]


def test_drivers_autoprobe_0_does_not_keep_a_loaded_driver_from_a_new_device(hotplug: Outcome) -> None:
    # Why the guard has vfio-pci claim new devices: the PCI core offers a new function
    # to the loaded drivers as it enumerates it, whatever drivers_autoprobe says.
    ran = hotplug.step("without-guard")
    assert ran["bdf"] is not None and ran["autoprobe"] == "0"
    assert ran["driver"] == "e1000e"


def test_the_guard_turns_probing_off_while_it_runs_and_back_on(hotplug: Outcome) -> None:
    ran = guard_step(hotplug)
    assert (ran["autoprobe-before"], ran["autoprobe-while-running"], ran["autoprobe-after"]) == (
        "1",
        "0",
        "1",
    )


def test_hot_plugged_devices_get_what_the_policy_says(hotplug: Outcome) -> None:
    ran = guard_step(hotplug)
    device = ran["devices"]
    targets = {name: ran["decisions"][device[name]]["target"] for name in device}
    assert targets == {"edu": "quarantine", "nic": "allow", "nic2": "quarantine"}
    assert ran["drivers"] == {device["edu"]: "vfio-pci", device["nic"]: "e1000e", device["nic2"]: "vfio-pci"}
    journaled = {(d["device"], d["target"]) for d in ran["journaled"] if d["source"] == "hotplug"}
    expected = {(device[name], target) for name, target in targets.items()}
    assert journaled == expected | {(bdf, "reject") for bdf in rejected(ran)}


def test_a_rejected_device_is_taken_off_the_bus_before_any_host_driver(hotplug: Outcome) -> None:
    ran = guard_step(hotplug)
    (edu2,) = rejected(ran)
    decision = ran["decisions"][edu2]
    assert decision["target"] == "reject" and decision["outcome"] == "removed from the bus"
    assert "via-port 0000:00:15.0" in decision["rule"]
    assert edu2 not in ran["listed-after"]
    assert {driver for _, driver in ran["watched"][edu2]["drivers"]} <= {None, "vfio-pci"}


def test_the_guards_socket_quarantines_a_device_in_use_and_gives_it_back(hotplug: Outcome) -> None:
    control = guard_step(hotplug)["control"]
    quarantined, given_back = control["quarantine"], control["allow"]
    assert quarantined["exit"] == 0 and quarantined["driver"] == "vfio-pci", quarantined["output"]
    assert quarantined["probe"]["verdict"] == "BLOCKED", quarantined["probe"]
    assert given_back["exit"] == 0 and given_back["driver"] == "e1000e", given_back["output"]
    assert "bound to host driver e1000e" in " ".join(given_back["output"].split())


def test_a_quarantined_device_never_has_a_host_driver_and_its_dma_is_blocked(hotplug: Outcome) -> None:
    ran = guard_step(hotplug)
    for name, probe_kind in (("edu", "edu"), ("nic2", "nic")):
        bdf = ran["devices"][name]
        # nic2's driver, e1000e, is loaded: without vfio-pci's claim the kernel binds it
        # at enumeration (seen here on Linux 6.1 with drivers_autoprobe=0).
        seen = {driver for _, driver in ran["watched"][bdf]["drivers"]}
        assert seen <= {None, "vfio-pci"}, f"{name} was seen with {seen}"
        assert ran["decisions"][bdf]["bound_before"] is None
        probe = ran[f"probe-{name}"]
        assert probe["verdict"] == "BLOCKED" and probe["dmar_faults"] > 0, (probe_kind, probe)


def test_the_allowed_nic_gets_its_host_driver_only_after_the_decision(hotplug: Outcome) -> None:
    ran = guard_step(hotplug)
    nic = ran["devices"]["nic"]
    drivers = [driver for _, driver in ran["watched"][nic]["drivers"]]
    assert drivers[-1] == "e1000e" and "e1000e" not in drivers[:-1]
    assert ran["decisions"][nic]["outcome"] == "bound to host driver e1000e"


# -- Xen 4.17 under QEMU, the lab's kernel as its PV dom0 -------------------------------
def test_the_audit_in_a_xen_dom0_judges_from_xen_and_derives_the_groups(xen: Outcome) -> None:
    audit = xen.step("audit")["json"]
    (unit,) = audit["iommus"]
    assert (unit["dma_remapping"], unit["interrupt_remapping"]) == ("enabled", "enabled"), unit
    codes = {f["code"]: f for f in audit["findings"]}
    assert {"xen-dom0", "xen-quarantine"} <= set(codes), codes
    assert not [f for f in audit["findings"] if f["severity"] == "critical"], audit["findings"]
    edu = xen.bdf("edu1")
    (group,) = [g for g in audit["groups"] if edu in {m["bdf"] for m in g["members"]}]
    assert group["number"] is not None  # derived by pciguard: the dom0 kernel has no groups


def test_the_real_xens_words_are_read_as_the_recorded_ones(xen: Outcome) -> None:
    from pciguard.model import Feature
    from pciguard.platforms.xen.evidence import parse_xl_dmesg, parse_xl_info

    info = parse_xl_info(xen.step("xl-info")["stdout"])
    assert info["xen_version"].startswith("4.17") and "hvm_directio" in info["virt_caps"].split()
    boot = parse_xl_dmesg(xen.step("xl-dmesg")["stdout"])
    assert (boot.iommu_vendor, boot.dma_remapping, boot.interrupt_remapping, boot.complete) == (
        "Intel VT-d",
        Feature.ENABLED,
        Feature.ENABLED,
        True,
    )


def test_on_xen_a_device_pciguard_made_assignable_has_its_dma_blocked_and_back_in_dom0_it_lands(
    xen: Outcome,
) -> None:
    # The edu's DMA, driven from dom0, aimed at dom0's own pages (machine addresses).
    verdicts = {
        name: xen.step(name)["verdict"] for name in ("probe-dom0", "probe-quarantined", "probe-given-back")
    }
    assert verdicts == {
        "probe-dom0": "LANDED",
        "probe-quarantined": "BLOCKED",
        "probe-given-back": "LANDED",
    }, [xen.step(name) for name in verdicts]


def test_with_xens_scratch_page_quarantine_the_dma_is_contained(xen_scratch: Outcome) -> None:
    # Neither in dom0's memory nor faulted: the device's scratch page took it.
    assert xen_scratch.step("quarantine")["exit"] == 0, xen_scratch.step("quarantine")
    found = xen_scratch.step("probe-quarantined")
    assert found["verdict"] == "CONTAINED", found
    assert xen_scratch.step("probe-given-back")["verdict"] == "LANDED"
    findings = {f["code"]: f["message"] for f in xen_scratch.step("audit")["json"]["findings"]}
    assert "scratch page" in findings["xen-quarantine"]


def test_pciguard_makes_a_device_assignable_on_xen_and_gives_it_back(xen: Outcome) -> None:
    edu = xen.bdf("edu1")
    quarantined = xen.step("quarantine")
    assert quarantined["exit"] == 0, quarantined
    shown = [line.strip() for line in quarantined["output"].splitlines()]
    assert shown == [
        f"quarantined: {edu}",
        f"xl pci-assignable-add {edu}",
        f"echo 1 > /sys/bus/pci/devices/{edu}/reset",
    ]
    assert xen.step("assignable")["stdout"].split() == [edu]
    after = xen.step("audit-quarantined")["json"]
    (member,) = [m for g in after["groups"] for m in g["members"] if m["bdf"] == edu]
    assert (member["state"], member["driver"]) == ("quarantined", "pciback")
    given_back = xen.step("unquarantine")
    assert given_back["exit"] == 0 and f"xl pci-assignable-remove {edu}" in given_back["output"], given_back
    assert xen.step("assignable-after")["stdout"].split() == []
    journal = xen.step("journal")["output"]
    assert journal.count("done") >= 2 and "quarantine" in journal and "unquarantine" in journal


def test_on_xen_a_pv_guest_given_the_device_gets_its_dma_only_into_its_own_pages(xen: Outcome) -> None:
    edu = xen.bdf("edu1")
    created = xen.step("create-vm1")
    assert created["exit"] == 0, created
    assigned = xen.step("assign")
    assert assigned["exit"] == 0, assigned
    assert [line.strip() for line in assigned["output"].splitlines()] == [
        f"assigned: {edu}",
        f"echo 1 > /sys/bus/pci/devices/{edu}/reset",
        f"xl pci-attach vm1 {edu}",
    ]
    assert edu in xen.step("pci-list")["stdout"].split()
    # Read from a page of vm1's and written into the same page: there; into dom0's: faulted.
    into_guest, into_dom0 = xen.step("probe-domu"), xen.step("probe-domu-to-dom0")
    assert (into_guest["verdict"], into_dom0["verdict"]) == ("LANDED", "BLOCKED"), (into_guest, into_dom0)


def test_on_xen_a_destroyed_guests_device_stays_assignable_and_blocked(xen: Outcome) -> None:
    edu = xen.bdf("edu1")
    assert xen.step("destroy-vm1")["exit"] == 0, xen.step("destroy-vm1")
    assert xen.step("assignable-after-destroy")["stdout"].split() == [edu]  # never dom0's
    found = xen.step("probe-after-destroy")
    assert found["verdict"] == "BLOCKED", found
    # pciguard's release finds the domain gone: nothing to detach, only the reset.
    released = xen.step("release")
    assert released["exit"] == 0, released
    assert [line.strip() for line in released["output"].splitlines()] == [
        f"released to quarantine: {edu}",
        f"echo 1 > /sys/bus/pci/devices/{edu}/reset",
    ]


def test_on_xen_a_device_pciback_only_seized_is_dom0s_until_pciguard_quarantines_it(
    xen_scratch: Outcome,
) -> None:
    # What xen-pciback.hide= does: pciback holds the device, Xen still has it in dom0's context.
    edu = xen_scratch.bdf("edu1")
    assert xen_scratch.step("seize")["driver"] == "pciback"
    found = xen_scratch.step("probe-seized")
    assert found["verdict"] == "LANDED", found
    seized = xen_scratch.step("audit-seized")["json"]
    (member,) = [m for g in seized["groups"] for m in g["members"] if m["bdf"] == edu]
    assert (member["state"], member["driver"]) == ("host", "pciback")
    (finding,) = [f["message"] for f in seized["findings"] if f["code"] == "xen-pciback-not-assignable"]
    assert edu in finding
    # pciguard asks Xen to quarantine it all the same: then, and only then, it is.
    assert f"xl pci-assignable-add {edu}" in xen_scratch.step("quarantine")["output"]
    after = xen_scratch.step("audit-quarantined")["json"]
    (member,) = [m for g in after["groups"] for m in g["members"] if m["bdf"] == edu]
    assert member["state"] == "quarantined"
    assert "xen-pciback-not-assignable" not in codes(after["findings"])


def test_on_xen_the_guard_has_pciback_seize_new_devices_and_quarantines_them_in_domid_io(
    xen_hotplug: Outcome,
) -> None:
    ran = xen_hotplug.step("guard")
    assert ran["guard-exit"] == 0, ran["guard-log"]
    edu, nic = ran["devices"]["edu"], ran["devices"]["nic"]
    decided = ran["decisions"]
    assert (decided[edu]["target"], decided[edu]["outcome"]) == (
        "quarantine",
        f"quarantined with xen-pciback, in DOMID_IO: {edu}",
    )
    assert (decided[nic]["target"], decided[nic]["outcome"]) == ("allow", "bound to host driver e1000e")
    # Seized by pciback as the kernel found them: no dom0 driver before the decision.
    edu_drivers = [driver for _, driver in ran["watched"][edu]["drivers"]]
    nic_drivers = [driver for _, driver in ran["watched"][nic]["drivers"]]
    assert [d for d in edu_drivers if d] == ["pciback"], edu_drivers
    assert [d for d in nic_drivers if d] == ["pciback", "e1000e"], nic_drivers
    assert ran["probe-edu"]["verdict"] == "BLOCKED", ran["probe-edu"]
    assert xen_hotplug.step("assignable")["stdout"].split() == [edu]
    audit = xen_hotplug.step("audit")["json"]
    states = {m["bdf"]: (m["state"], m["driver"]) for g in audit["groups"] for m in g["members"]}
    assert states[edu] == ("quarantined", "pciback") and states[nic] == ("host", "e1000e")
