"""The toolstack's plans and refusals: order of steps, what goes together, and the
messages that say what to do."""

from __future__ import annotations

import pytest

from conftest import bdf, world
from pciguard.checks import RmrrPolicy
from pciguard.errors import IllegalTransition, PreconditionFailed, RefusedError
from pciguard.formats.platform_file import parse_platform
from pciguard.model.ownership import State
from pciguard.platforms.base import HOST
from pciguard.platforms.sim import Blocked

NIC, GPU, AUDIO = bdf("03:00.0"), bdf("01:00.0"), bdf("01:00.1")


def test_assign_checks_everything_then_exposes_last() -> None:
    w = world("workstation")
    w.toolstack.make_assignable(NIC)
    plan = w.toolstack.plan_assign(NIC, "vm1")
    calls = [s.call for s in plan.steps]
    assert calls == ["reset", "attach", "flush_iotlb", "route_msi", "expose"]


def test_release_never_goes_through_the_host() -> None:
    w = world("workstation")
    w.toolstack.make_assignable(NIC)
    w.toolstack.assign(NIC, "vm1")
    plan = w.toolstack.plan_release(NIC)
    assert all(s.domain != HOST and s.call != "bind_host_driver" for s in plan.steps)
    assert plan.steps[0].call == "unexpose"  # the guest loses it first


def test_make_assignable_twice_is_an_illegal_transition() -> None:
    w = world("workstation")
    w.toolstack.make_assignable(NIC)
    with pytest.raises(IllegalTransition, match=r"0000:03:00\.0 is quarantined"):
        w.toolstack.make_assignable(NIC)


def test_host_critical_and_bridges_are_refused_quarantine() -> None:
    w = world("workstation")
    with pytest.raises(RefusedError, match="host-critical"):
        w.toolstack.make_assignable(bdf("02:00.0"))
    with pytest.raises(RefusedError, match="bridges stay with the host"):
        w.toolstack.make_assignable(bdf("00:01.0"))


def test_no_giving_back_to_the_host_while_the_group_is_with_a_guest() -> None:
    w = world("workstation")
    w.toolstack.make_assignable(GPU)
    w.toolstack.assign(GPU, "vm1")
    with pytest.raises(RefusedError, match="release those first"):
        w.toolstack.make_unassignable(AUDIO)
    w.toolstack.release(GPU)
    w.toolstack.make_unassignable(AUDIO)
    assert w.toolstack.ledger[AUDIO].state is State.HOST
    assert w.violations == []


def test_sriov_pf_with_vfs_is_refused_and_its_vfs_assignable() -> None:
    w = world("server")
    pf, vf = bdf("12:00.0"), bdf("12:00.2")
    w.toolstack.make_assignable(pf)
    with pytest.raises(PreconditionFailed, match="assign the VFs instead"):
        w.toolstack.assign(pf, "vm1")
    w.toolstack.make_assignable(vf)
    w.toolstack.assign(vf, "vm1")
    assert w.violations == []


@pytest.mark.parametrize(
    ("policy", "device", "ok"),
    [
        (RmrrPolicy.STRICT, "00:14.0", False),
        (RmrrPolicy.RELAXED, "00:14.0", True),
        (RmrrPolicy.RELAXED, "00:1a.0", False),  # its region is shared with 00:1d.0
    ],
)
def test_rmrr_policy(policy: RmrrPolicy, device: str, ok: bool) -> None:
    w = world("rmrr-usb", rmrr=policy)
    dev = bdf(device)
    w.toolstack.make_assignable(dev)
    if ok:
        w.toolstack.assign(dev, "vm1")
        assert any("rmrr=relaxed" in u for u in w.toolstack.unsafe_in_force())
    else:
        with pytest.raises(PreconditionFailed, match="firmware 1:1 regions"):
            w.toolstack.assign(dev, "vm1")
    assert w.violations == []


def test_devices_sharing_a_requester_id_move_together() -> None:
    w = world("server")
    serial, capture = bdf("31:01.0"), bdf("31:02.0")
    w.toolstack.make_assignable(serial)  # takes the whole group
    plan = w.toolstack.assign(serial, "vm1")
    assert plan.devices == (serial, capture)
    assert w.toolstack.ledger[capture].vm == "vm1"
    w.toolstack.release(capture)
    assert w.toolstack.ledger[serial].state is State.QUARANTINED
    w.toolstack.make_unassignable(serial)
    assert {w.toolstack.ledger[d].state for d in (serial, capture)} == {State.HOST}
    assert w.violations == []


HOTPLUG_HOST = """
name: hotplug
iommus: [{name: dmar0}]
devices:
  - bdf: 0000:00:01.0
    kind: root-port
    acs: full
    children: [{bdf: 0000:01:00.0, kind: endpoint, name: internal hot-plug, hotplug: true}]
  - bdf: 0000:00:02.0
    kind: root-port
    acs: full
    external: true
    children: [{bdf: 0000:02:00.0, kind: endpoint, name: external, hotplug: true}]
"""


def test_default_policy_admits_internal_and_quarantines_external() -> None:
    w = world(parse_platform(HOTPLUG_HOST))
    internal, external = bdf("01:00.0"), bdf("02:00.0")
    for dev in (internal, external):
        w.platform.plug(dev)
        w.toolstack.hotplug(dev)
    assert w.toolstack.ledger[internal].state is State.HOST
    assert w.platform.host_driver_bound(internal)
    assert w.toolstack.ledger[external].state is State.QUARANTINED
    assert isinstance(w.platform.dma(external, 0), Blocked)
    assert w.violations == []


def test_hotplug_without_iommu_is_rejected_off_the_bus() -> None:
    host = parse_platform(HOTPLUG_HOST.replace("iommus: [{name: dmar0}]\n", ""))
    w = world(host)
    external = bdf("02:00.0")
    w.platform.plug(external)
    plan = w.toolstack.hotplug(external)
    assert plan.operation == "reject" and not w.platform.present(external)
    assert w.toolstack.ledger[external].state is State.REMOVED


def test_an_unsafe_override_is_reported_once_per_device_while_it_is_assigned() -> None:
    """Regression: every assign appended the plan's overrides to each device's record, so
    a device named itself twice ("0000:00:14.0: 0000:00:14.0: ...") and the record grew
    with every assign/release cycle (the verifier never finished)."""
    w = world("rmrr-usb", rmrr=RmrrPolicy.RELAXED)
    dev = bdf("00:14.0")
    w.toolstack.make_assignable(dev)
    for _ in range(3):
        w.toolstack.assign(dev, "vm1")
        per_device = [u for u in w.toolstack.unsafe_in_force() if "rmrr=relaxed)" in u]
        assert per_device == [f"{dev} has firmware regions mapped into vm1 (rmrr=relaxed)"]
        w.toolstack.release(dev)
        assert not any(str(dev) in u for u in w.toolstack.unsafe_in_force())
    assert w.violations == []


OVERLAPPING_RMRRS = """
name: overlapping-rmrrs
iommus: [{name: dmar0, scope: all}]
devices:
  - bdf: 0000:00:14.0
    kind: rc-endpoint
    reserved_regions: [{name: usb, start: 0xdd000000, end: 0xdd01ffff}]
  - bdf: 0000:00:1a.0
    kind: rc-endpoint
    reserved_regions: [{name: ehci, start: 0xdd010000, end: 0xdd02ffff}]
"""


def test_overlapping_firmware_regions_are_shared_not_private() -> None:
    """Regression (XSA-378/386/400 class): regions were shared only when equal, so two
    devices whose RMRRs overlap counted as private under rmrr: relaxed."""
    w = world(parse_platform(OVERLAPPING_RMRRS), rmrr=RmrrPolicy.RELAXED)
    dev = bdf("00:14.0")
    w.toolstack.make_assignable(dev)
    with pytest.raises(PreconditionFailed, match="shared with another device"):
        w.toolstack.assign(dev, "vm1")


def test_the_invariant_judges_apart_from_the_toolstacks_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariants are an independent oracle: with the toolstack's own device checks
    broken, a device with a shared firmware region still reaching a guest is caught."""
    import pciguard.toolstack

    monkeypatch.setattr(pciguard.toolstack, "device_reasons", lambda *args: [])
    w = world(parse_platform(OVERLAPPING_RMRRS), rmrr=RmrrPolicy.RELAXED)
    dev = bdf("00:14.0")
    w.toolstack.make_assignable(dev)
    w.toolstack.assign(dev, "vm1")
    assert any(v.invariant == "check-before-expose" and "overlaps" in v.message for v in w.violations)


def test_one_table_names_every_step_of_the_protocol_and_what_each_does_to_the_ledger() -> None:
    """The protocol's step names, the toolstack's table of their effects and undos, and
    the methods of every platform are the same set."""
    from pciguard.platforms.base import DEVICE_STEPS, STEPS, Platform
    from pciguard.platforms.linux.platform import LinuxPlatform
    from pciguard.platforms.sim import SimPlatform
    from pciguard.platforms.xen.platform import XenPlatform
    from pciguard.toolstack import EFFECTS

    assert set(EFFECTS) == set(DEVICE_STEPS)
    for step in STEPS:
        for platform in (Platform, SimPlatform, LinuxPlatform, XenPlatform):
            assert callable(getattr(platform, step)), (platform, step)


def test_fault_injection_refuses_a_step_the_protocol_does_not_have() -> None:
    w = world("workstation")
    with pytest.raises(ValueError, match="no platform step named 'atach'"):
        w.platform.inject("atach")


def test_a_frozen_record_has_the_fields_of_a_record_in_their_order() -> None:
    """``thaw`` passes a frozen record's fields by position; a field added to one and
    not the other, or moved, would shift every field after it."""
    from dataclasses import fields

    from pciguard.toolstack import DeviceRecord, FrozenRecord

    assert FrozenRecord._fields == tuple(f.name for f in fields(DeviceRecord))
    record = DeviceRecord(State.ASSIGNED, vm="vm1", context="vm1", reserved={"vm1"}, stale={"host"})
    assert DeviceRecord.thaw(record.freeze()) == record
