"""One test per isolation problem of the design: each attack succeeds with the historic
flaw switched on, and is stopped by the secure toolstack."""

from __future__ import annotations

import pytest

from conftest import bdf, world
from pciguard.checks import RmrrPolicy
from pciguard.errors import PreconditionFailed, RefusedError
from pciguard.legacy import Flaw
from pciguard.model.ownership import State
from pciguard.platforms.base import HOST, QUARANTINE, DomainState
from pciguard.platforms.sim import Blocked, Delivered, Landed
from pciguard.toolstack import OperationFailed, Outcome

NIC = bdf("0000:03:00.0")  # workstation: an Ethernet controller alone in its group
GPU, AUDIO = bdf("0000:01:00.0"), bdf("0000:01:00.1")


def assigned_nic(*flaws: Flaw, quarantine: str = "block"):
    w = world("workstation", *flaws, quarantine=quarantine)
    w.toolstack.make_assignable(NIC)
    w.toolstack.assign(NIC, "vm1")
    assert ("vm1", "RAM") in w.platform.reachable(NIC)
    return w


# 1. In-flight DMA after teardown (XSA-302) ------------------------------------------
def test_xsa_302_inflight_dma_after_destroy_lands_in_host_memory() -> None:
    w = assigned_nic(Flaw.XSA_302)
    w.toolstack.destroy_vm("vm1")
    outcome = w.platform.dma(NIC, 0x1000)
    assert isinstance(outcome, Landed) and outcome.domain == HOST
    assert {"no-host-return", "dma-containment"} <= w.broken


@pytest.mark.parametrize("mode", ["block", "scratch"])
def test_inflight_dma_after_destroy_stays_in_quarantine(mode: str) -> None:
    w = assigned_nic(quarantine=mode)
    w.toolstack.destroy_vm("vm1")
    outcome = w.platform.dma(NIC, 0x1000)
    if mode == "block":
        assert isinstance(outcome, Blocked)
    else:
        assert outcome == Landed(QUARANTINE, "scratch page", f"context entry for {NIC}")
    assert w.toolstack.ledger[NIC].state is State.QUARANTINED
    assert w.platform.domains()["vm1"].state is DomainState.DESTROYED
    assert w.violations == []


def test_crashed_vm_devices_go_to_quarantine_not_host() -> None:
    w = assigned_nic()
    w.platform.crash_domain("vm1")
    w.toolstack.vm_crashed("vm1")
    assert w.platform.hardware_owner(NIC) == QUARANTINE
    assert not w.platform.host_driver_bound(NIC)
    assert w.violations == []


# 2. Half-done assignment ---------------------------------------------------------
ASSIGN_STEPS = ["reset", "attach", "flush_iotlb", "route_msi", "expose"]


@pytest.mark.parametrize("call", ASSIGN_STEPS)
def test_fault_at_each_assignment_step_leaves_device_quarantined(call: str) -> None:
    w = world("workstation")
    w.toolstack.make_assignable(NIC)
    w.platform.inject(call, NIC)
    with pytest.raises(OperationFailed):
        w.toolstack.assign(NIC, "vm1")
    assert w.toolstack.ledger[NIC].state is State.QUARANTINED
    assert set(w.platform.contexts(NIC).values()) == {QUARANTINE}
    assert w.platform.exposed_to(NIC) is None
    assert w.platform.msi_route(NIC) == set()
    assert w.platform.stale_entries(NIC) == {}
    assert isinstance(w.platform.dma(NIC, 0x1000), Blocked)
    assert w.platform.domains()["vm1"].state is DomainState.RUNNING
    assert w.violations == []


@pytest.mark.parametrize("call", ["route_msi", "expose"])  # after map_reserved
def test_failed_unwinding_crashes_the_vm_and_marks_the_device_broken(call: str) -> None:
    w = world("rmrr-usb", rmrr=RmrrPolicy.RELAXED)
    usb = bdf("0000:00:14.0")
    w.toolstack.make_assignable(usb)
    w.platform.inject(call, usb)
    w.platform.inject("unmap_reserved", usb, times=None)  # the reserved mapping sticks
    with pytest.raises(OperationFailed, match="device broken"):
        w.toolstack.assign(usb, "vm1")
    assert w.platform.domains()["vm1"].state is DomainState.CRASHED
    assert w.toolstack.ledger[usb].state is State.BROKEN
    assert w.platform.hardware_owner(usb) != HOST
    assert w.violations == []


def test_xsa_400_fault_mid_reassignment_leaves_device_with_host() -> None:
    w = assigned_nic(Flaw.XSA_400)
    w.platform.inject("attach", NIC, skip=1)  # attach(host) works, attach(quarantine) fails
    seen_in_the_window = []

    def probe(record) -> None:
        if record.call == "attach" and record.error:
            seen_in_the_window.append(w.platform.reachable(NIC))

    w.platform.observers.append(probe)
    with pytest.raises(OperationFailed, match="second try"):
        w.toolstack.release(NIC)
    assert (HOST, "memory") in seen_in_the_window[0]
    assert {"no-host-return", "dma-containment"} <= w.broken


def test_release_fault_pushes_on_to_quarantine() -> None:
    w = assigned_nic()
    w.platform.inject("attach", NIC, times=1)
    with pytest.raises(OperationFailed, match="second try"):
        w.toolstack.release(NIC)
    assert w.toolstack.ledger[NIC].state is State.QUARANTINED
    assert w.platform.hardware_owner(NIC) == QUARANTINE
    assert w.violations == []


# 3. Checks that come too late (XSA-61) -------------------------------------------------
def test_xsa_61_device_exposed_before_the_iommu_check(no_iommu_host) -> None:
    w = world(no_iommu_host, Flaw.XSA_61)
    nic = bdf("0000:01:00.0")
    w.toolstack.make_assignable(nic)
    seen_during_exposure = []

    def probe(record) -> None:
        if record.call == "expose" and record.error is None:
            seen_during_exposure.append(w.platform.dma(nic, 0x1000))

    w.platform.observers.append(probe)
    with pytest.raises(OperationFailed):
        w.toolstack.assign(nic, "vm1")
    assert "expose" in w.calls()
    assert isinstance(seen_during_exposure[0], Landed)
    assert seen_during_exposure[0].domain == HOST
    assert "check-before-expose" in w.broken


def test_assignment_without_iommu_is_refused_before_anything_is_exposed(no_iommu_host) -> None:
    w = world(no_iommu_host)
    nic = bdf("0000:01:00.0")
    before = len(w.platform.log)
    with pytest.raises(RefusedError, match="quarantine could not block its DMA"):
        w.toolstack.make_assignable(nic)
    with pytest.raises(PreconditionFailed, match="no IOMMU covers"):
        w.toolstack.assign(nic, "vm1")
    assert w.platform.log[before:] == []  # not one platform call
    assert w.toolstack.ledger[nic].state is State.HOST
    assert w.violations == []


# 4. Interrupts are DMA too ---------------------------------------------------------
def test_msi_injection_works_without_interrupt_remapping() -> None:
    w = world("no-interrupt-remapping")
    nic = bdf("0000:01:00.0")
    w.toolstack.make_assignable(nic)
    assert w.platform.msi(nic, "vm1") == Delivered(
        "vm1", "no interrupt isolation: the device picks the destination"
    )
    with_ir = world("workstation")
    assert with_ir.platform.msi(NIC, "vm1") == Delivered(HOST, f"remapping entry of {NIC}")
    with_ir.toolstack.make_assignable(NIC)
    assert isinstance(with_ir.platform.msi(NIC, "vm1"), Blocked)


def test_assignment_without_msi_isolation_is_refused() -> None:
    w = world("no-interrupt-remapping")
    nic = bdf("0000:01:00.0")
    w.toolstack.make_assignable(nic)
    with pytest.raises(PreconditionFailed, match="interrupt remapping of IOMMU dmar0 is absent"):
        w.toolstack.assign(nic, "vm1")


def test_unsafe_interrupts_override_is_named_and_reported() -> None:
    w = world("no-interrupt-remapping", allow_unsafe_interrupts=True)
    nic = bdf("0000:01:00.0")
    w.toolstack.make_assignable(nic)
    w.toolstack.assign(nic, "vm1")
    unsafe = w.toolstack.unsafe_in_force()
    assert any("allow_unsafe_interrupts" in u and str(nic) in u for u in unsafe)
    assert w.violations == []


def test_silent_unsafe_interrupts_break_msi_isolation() -> None:
    w = world("no-interrupt-remapping", Flaw.NO_MSI_CHECK)
    nic = bdf("0000:01:00.0")
    w.toolstack.make_assignable(nic)
    w.toolstack.assign(nic, "vm1")
    assert w.platform.msi(nic, HOST).domain == HOST  # type: ignore[union-attr]
    assert "msi-isolation" in w.broken


def test_arm_gicv2m_does_not_isolate_but_its_does() -> None:
    w = world("arm-gicv2m")
    behind_v2m, behind_its = bdf("0000:01:00.0"), bdf("0000:02:00.0")
    for dev in (behind_v2m, behind_its):
        w.toolstack.make_assignable(dev)
    with pytest.raises(PreconditionFailed, match="gicv2m, which does not isolate"):
        w.toolstack.assign(behind_v2m, "vm1")
    w.toolstack.assign(behind_its, "vm1")
    assert w.platform.msi(behind_its, HOST) == Delivered("vm1", f"remapping entry of {behind_its}")


# 5. Hot-plug -------------------------------------------------------------------------
TB_DISK, FAKE_BRIDGE = bdf("0000:05:00.0"), bdf("0000:06:00.0")


@pytest.mark.parametrize("device", [TB_DISK, FAKE_BRIDGE])
def test_hotplugged_device_on_external_port_cannot_dma_to_host(device) -> None:
    w = world("workstation")
    w.platform.plug(device)
    assert isinstance(w.platform.dma(device, 0x1000), Blocked)  # before any decision
    w.toolstack.hotplug(device)
    assert w.toolstack.ledger[device].state is State.QUARANTINED
    assert isinstance(w.platform.dma(device, 0x1000), Blocked)
    assert w.violations == []


@pytest.mark.parametrize(
    ("flaw", "device"),
    [(Flaw.HOTPLUG_TO_HOST, TB_DISK), (Flaw.TRUSTED_BRIDGES, FAKE_BRIDGE)],
)
def test_legacy_hotplug_hands_device_to_host(flaw: Flaw, device) -> None:
    w = world("workstation", flaw)
    w.platform.plug(device)
    w.toolstack.hotplug(device)
    assert w.platform.dma(device, 0x1000).domain == HOST  # type: ignore[union-attr]
    assert "hotplug-quarantine" in w.broken


# 6. IOMMU context declared up front -----------------------------------------------------
def test_vm_created_without_iommu_context_cannot_receive_devices() -> None:
    w = world("workstation", vms=())
    w.toolstack.create_vm("plain", iommu=False)
    w.toolstack.make_assignable(NIC)
    with pytest.raises(PreconditionFailed, match="created without an IOMMU context"):
        w.toolstack.assign(NIC, "plain")
    assert w.violations == []


def test_late_iommu_context_is_caught() -> None:
    w = world("workstation", Flaw.LATE_IOMMU_CONTEXT, vms=())
    w.toolstack.create_vm("plain", iommu=False)
    w.toolstack.make_assignable(NIC)
    w.toolstack.assign(NIC, "plain")
    assert "enable_iommu_context" in w.calls()
    assert "context-up-front" in w.broken


# 7. Groups -----------------------------------------------------------------------------
def test_group_members_cannot_be_split_between_owners() -> None:
    w = world("workstation", vms=("vm1", "vm2"))
    w.toolstack.make_assignable(GPU, with_group=False)
    with pytest.raises(PreconditionFailed) as refused:
        w.toolstack.assign(GPU, "vm1")
    assert (
        f"group 7 also holds {AUDIO}, which the host driver snd_hda_intel still owns; quarantine it too"
    ) in str(refused.value)
    w.toolstack.make_assignable(AUDIO)
    w.toolstack.assign(GPU, "vm1")
    with pytest.raises(PreconditionFailed, match="which vm1 still owns"):
        w.toolstack.assign(AUDIO, "vm2")
    assert w.violations == []


def test_no_group_check_lets_guest_device_write_into_host_sibling() -> None:
    w = world("workstation", Flaw.NO_GROUP_CHECK)
    w.toolstack.make_assignable(GPU, with_group=False)
    w.toolstack.assign(GPU, "vm1")
    outcome = w.platform.dma(GPU, peer=AUDIO)
    assert outcome == Landed(HOST, f"BAR of {AUDIO}", "peer-to-peer inside the IOMMU group")
    assert {"group-unity", "dma-containment"} <= w.broken


def test_make_assignable_takes_the_whole_group_by_default() -> None:
    w = world("workstation")
    plan = w.toolstack.make_assignable(GPU)
    assert plan.devices == (GPU, AUDIO)
    assert {w.toolstack.ledger[d].state for d in (GPU, AUDIO)} == {State.QUARANTINED}


# flush-on-change (XSA-442) --------------------------------------------------------------
def test_xsa_442_stale_iotlb_entry_lets_dma_through() -> None:
    w = assigned_nic(Flaw.XSA_442)
    w.toolstack.release(NIC)
    outcome = w.platform.dma(NIC, 0x1000)
    assert outcome == Landed("vm1", "RAM 0x1000", f"stale IOTLB entry for {NIC}")
    assert {"flush-on-change", "dma-containment"} <= w.broken


def test_flush_on_change_blocks_the_stale_entry() -> None:
    w = assigned_nic()
    w.toolstack.release(NIC)
    assert isinstance(w.platform.dma(NIC, 0x1000), Blocked)
    assert w.violations == []


# all-requester-ids (XSA-449) --------------------------------------------------------------
RAID, PHANTOM = bdf("0000:20:00.0"), bdf("0000:20:00.4")


def test_xsa_449_phantom_function_reaches_previous_owner() -> None:
    w = world("server", Flaw.XSA_449)
    w.toolstack.make_assignable(RAID)
    w.toolstack.assign(RAID, "vm1")
    outcome = w.platform.dma(RAID, 0x1000, requester=PHANTOM)
    assert outcome.domain == HOST  # type: ignore[union-attr]  # the phantom never left
    assert {"all-requester-ids", "dma-containment"} <= w.broken


def test_phantom_function_follows_its_device() -> None:
    w = world("server")
    w.toolstack.make_assignable(RAID)
    w.toolstack.assign(RAID, "vm1")
    assert w.platform.dma(RAID, 0x1000, requester=PHANTOM).domain == "vm1"  # type: ignore[union-attr]
    w.toolstack.release(RAID)
    assert isinstance(w.platform.dma(RAID, 0x1000, requester=PHANTOM), Blocked)
    assert w.violations == []


# clean-handover: device state survives a failed reset ---------------------------------------
GPU_ATS, THUNDERBOLT_NIC = bdf("0000:01:00.0"), bdf("0000:05:00.0")  # gpu-ats


def test_reset_ignored_hands_the_next_guest_what_the_last_one_programmed() -> None:
    w = world("gpu-ats", Flaw.RESET_IGNORED, vms=("vm1", "vm2"))
    w.toolstack.make_assignable(GPU_ATS)
    w.toolstack.assign(GPU_ATS, "vm1")
    w.platform.inject("reset", GPU_ATS, times=2)
    w.toolstack.release(GPU_ATS)
    w.toolstack.assign(GPU_ATS, "vm2")
    assert w.platform.carried_state(GPU_ATS) == {"vm1", "vm2"}
    assert w.broken == {"clean-handover"}


def test_a_device_whose_reset_fails_stays_broken_until_a_reset_succeeds() -> None:
    w = world("gpu-ats", vms=("vm1", "vm2"))
    w.toolstack.make_assignable(GPU_ATS)
    w.toolstack.assign(GPU_ATS, "vm1")
    w.platform.inject("reset", GPU_ATS, times=2)
    with pytest.raises(OperationFailed):
        w.toolstack.release(GPU_ATS)
    assert w.toolstack.ledger[GPU_ATS].state is State.BROKEN
    assert w.platform.carried_state(GPU_ATS) == {"vm1"}  # held away from everyone
    with pytest.raises(PreconditionFailed):
        w.toolstack.assign(GPU_ATS, "vm2")
    w.toolstack.recover(GPU_ATS)
    w.toolstack.assign(GPU_ATS, "vm2")
    assert w.platform.carried_state(GPU_ATS) == {"vm2"}
    assert w.violations == []


# sink-isolation: the scratch page (XSA-445) ---------------------------------------------------
def test_xsa_445_a_scratch_page_not_cleared_shows_the_last_owners_data() -> None:
    w = assigned_nic(Flaw.XSA_445, quarantine="scratch")
    w.toolstack.release(NIC)
    assert "host" in w.platform.scratch_pages_read(NIC)[NIC]  # written while it was quarantined
    assert w.broken == {"sink-isolation"}


def test_each_device_enters_quarantine_on_a_clean_scratch_page_of_its_own() -> None:
    w = assigned_nic(quarantine="scratch")
    w.toolstack.release(NIC)
    assert w.platform.scratch_pages_read(NIC) == {NIC: {"vm1"}}  # only what vm1 had it write
    assert w.platform.scratch_page(NIC) != w.platform.scratch_page(GPU)
    assert w.violations == []


# atc-flush and ats-untrusted ---------------------------------------------------------------
def test_no_devtlb_flush_leaves_the_gpu_writing_into_host_memory() -> None:
    w = world("gpu-ats", Flaw.NO_DEVTLB_FLUSH)
    w.toolstack.make_assignable(GPU_ATS)
    outcome = w.platform.dma(GPU_ATS, 0x1000)
    assert outcome == Landed(HOST, "memory 0x1000", f"stale device-TLB (ATS) entry of {GPU_ATS}")
    assert w.broken == {"atc-flush", "dma-containment"}


def test_the_device_tlb_is_invalidated_with_the_iotlb_and_untrusted_devices_get_no_ats() -> None:
    w = world("gpu-ats")
    assert w.platform.ats_enabled(GPU_ATS)
    w.toolstack.make_assignable(GPU_ATS)
    assert w.platform.stale_device_tlb(GPU_ATS) == {}
    w.platform.plug(THUNDERBOLT_NIC)
    w.toolstack.hotplug(THUNDERBOLT_NIC)
    w.toolstack.assign(THUNDERBOLT_NIC, "vm1")
    assert not w.platform.ats_enabled(THUNDERBOLT_NIC)
    assert w.violations == []


def test_ats_on_an_untrusted_device_reaches_any_physical_address() -> None:
    w = world("gpu-ats", Flaw.ATS_UNTRUSTED)
    w.platform.plug(THUNDERBOLT_NIC)
    w.toolstack.hotplug(THUNDERBOLT_NIC)
    w.toolstack.assign(THUNDERBOLT_NIC, "vm1")
    assert w.platform.dma(THUNDERBOLT_NIC, 0x1000).domain == HOST  # type: ignore[union-attr]
    assert w.broken == {"ats-untrusted", "dma-containment"}


# reserved-exact: firmware regions belong to devices (XSA-378) ----------------------------------
XHCI, SATA = bdf("0000:00:14.0"), bdf("0000:00:11.0")


def test_xsa_378_leaves_the_region_mapped_in_the_guest_the_device_left() -> None:
    w = world("rmrr-usb", Flaw.XSA_378, rmrr=RmrrPolicy.RELAXED)
    w.toolstack.make_assignable(XHCI)
    w.toolstack.assign(XHCI, "vm1")
    w.toolstack.release(XHCI)
    assert {d for d, _ in w.platform.reserved_mappings("vm1")} == {XHCI}
    assert {"reserved-exact", "fail-closed-assign"} == w.broken


def test_release_unmaps_the_region_before_the_device_leaves() -> None:
    w = world("rmrr-usb", rmrr=RmrrPolicy.RELAXED)
    w.toolstack.make_assignable(XHCI)
    w.toolstack.assign(XHCI, "vm1")
    w.toolstack.release(XHCI)
    release = [str(r) for r in w.platform.log][-8:]
    assert release.index(f"unmap_reserved({XHCI}, vm1)") < release.index(f"attach({XHCI}, quarantine)")
    assert w.violations == []


def test_overlapping_firmware_regions_are_shared_and_equal_only_comparison_misses_them() -> None:
    secure = world("ivmd-ranges", rmrr=RmrrPolicy.RELAXED)
    secure.toolstack.make_assignable(SATA)
    with pytest.raises(PreconditionFailed, match="shared with another device"):
        secure.toolstack.assign(SATA, "vm1")
    legacy = world("ivmd-ranges", Flaw.RMRR_EQUAL_ONLY, rmrr=RmrrPolicy.RELAXED)
    legacy.toolstack.make_assignable(SATA)
    legacy.toolstack.assign(SATA, "vm1")
    assert legacy.broken == {"check-before-expose", "reserved-exact"}


def test_an_ivmd_range_gives_every_device_in_it_the_region() -> None:
    host = world("ivmd-ranges").host
    named = [b for b, f in host.topology.items() if any(r.name == "ivmd-usb" for r in f.reserved_regions)]
    assert named == [XHCI, bdf("0000:00:14.3")]


# shared-resources: BAR pages and INTx lines (XSA-461) -------------------------------------------
USB_CARD, SERIAL_CARD, SHARED_IRQ_NIC = bdf("0000:01:00.0"), bdf("0000:02:00.0"), bdf("0000:03:00.0")


def test_xsa_461_a_guest_reaches_the_host_device_in_the_same_page() -> None:
    w = world("shared-bars", Flaw.XSA_461)
    w.toolstack.make_assignable(USB_CARD)
    w.toolstack.assign(USB_CARD, "vm1")
    assert w.platform.host_driver_bound(SERIAL_CARD)
    assert "vm1" in w.platform.carried_state(SERIAL_CARD)  # vm1 programs it through the page
    assert w.broken == {"shared-resources", "clean-handover"}


def test_devices_sharing_a_page_or_a_line_go_to_one_owner() -> None:
    w = world("shared-bars")
    plan = w.toolstack.make_assignable(USB_CARD)
    assert plan.devices == (USB_CARD, SERIAL_CARD)  # quarantined together
    w.toolstack.make_assignable(SHARED_IRQ_NIC, with_group=False)
    with pytest.raises(PreconditionFailed, match="legacy interrupt line 17"):
        w.toolstack.assign(SHARED_IRQ_NIC, "vm1")
    w.toolstack.assign(USB_CARD, "vm1")
    w.toolstack.assign(SERIAL_CARD, "vm1")
    assert w.violations == []


# vm-lifecycle: a VM being torn down accepts no device --------------------------------------------
def test_teardown_running_lets_an_assignment_land_in_a_vm_reported_destroyed() -> None:
    w = world("workstation", Flaw.TEARDOWN_RUNNING)
    w.toolstack.make_assignable(NIC)
    w.toolstack.make_assignable(GPU)
    down = w.toolstack.begin(w.toolstack.plan_teardown("vm1"))
    w.toolstack.assign(GPU, "vm1")
    while not isinstance(down, Outcome):
        down = w.toolstack.advance(down)
    assert w.platform.domains()["vm1"].state is DomainState.RUNNING
    assert w.broken == {"vm-lifecycle"}


def test_teardown_stops_the_vm_first_so_no_assignment_reaches_it() -> None:
    w = world("workstation")
    w.toolstack.make_assignable(GPU)
    down = w.toolstack.advance(w.toolstack.begin(w.toolstack.plan_teardown("vm1")))
    with pytest.raises(PreconditionFailed, match="accepts no device"):
        w.toolstack.assign(GPU, "vm1")
    while not isinstance(down, Outcome):
        down = w.toolstack.advance(down)
    assert w.platform.domains()["vm1"].state is DomainState.DESTROYED
    assert w.violations == []
