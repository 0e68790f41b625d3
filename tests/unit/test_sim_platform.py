"""The simulated platform: its DMA/MSI engine, its IOTLB, fault injection, and the
checks it makes on its caller (contract violations raise at once)."""

from __future__ import annotations

import pytest

from conftest import bdf, example
from pciguard.errors import InjectedFault, PlatformMisuse, StepFailed
from pciguard.formats.platform_file import parse_platform
from pciguard.platforms.base import HOST, QUARANTINE, DomainState, Platform
from pciguard.platforms.sim import Blocked, Landed, SimPlatform

NIC, GPU, AUDIO = bdf("03:00.0"), bdf("01:00.0"), bdf("01:00.1")


@pytest.fixture
def sim() -> SimPlatform:
    platform = SimPlatform(example("workstation"))
    platform.create_domain("vm1", iommu_context=True)
    return platform


def test_it_implements_the_platform_protocol(sim: SimPlatform) -> None:
    assert isinstance(sim, Platform)


def test_devices_with_a_driver_start_in_the_hosts_domain(sim: SimPlatform) -> None:
    assert sim.host_driver_bound(NIC) and sim.context_of(NIC) == HOST
    assert sim.dma(NIC, 0x10) == Landed(HOST, "memory 0x10", f"context entry for {NIC}")


def test_hotplug_devices_are_absent_until_plugged_and_then_blocked(sim: SimPlatform) -> None:
    tb = bdf("05:00.0")
    assert not sim.present(tb)
    sim.plug(tb)
    assert sim.dma(tb, 0) == Blocked(f"no context entry present for {tb}")


def test_guest_translation_ram_unmapped_and_destroyed(sim: SimPlatform) -> None:
    sim.unbind_host_driver(NIC)
    sim.attach(NIC, "vm1")
    sim.flush_iotlb(NIC)
    assert sim.dma(NIC, 0x1000).domain == "vm1"  # type: ignore[union-attr]
    assert isinstance(sim.dma(NIC, 0x8000_0000), Blocked)  # beyond the guest's RAM
    sim.attach(NIC, QUARANTINE)
    sim.flush_iotlb(NIC)
    sim.destroy_domain("vm1")
    sim.attach(NIC, HOST)
    assert sim.domains()["vm1"].state is DomainState.DESTROYED


def test_repointing_a_context_keeps_the_old_translation_until_flushed(sim: SimPlatform) -> None:
    sim.unbind_host_driver(NIC)
    sim.attach(NIC, QUARANTINE)
    assert sim.stale_entries(NIC) == {NIC: {HOST}}
    assert sim.dma(NIC, 0).domain == HOST  # type: ignore[union-attr]
    sim.flush_iotlb(NIC)
    assert sim.stale_entries(NIC) == {} and isinstance(sim.dma(NIC, 0), Blocked)


def test_injected_faults_skip_then_fail_then_stop(sim: SimPlatform) -> None:
    sim.inject("reset", NIC, skip=1, times=2)
    sim.reset(NIC)
    for _ in range(2):
        with pytest.raises(InjectedFault):
            sim.reset(NIC)
    sim.reset(NIC)
    assert [r.error for r in sim.log if r.call == "reset"] == [None, "injected fault", "injected fault", None]


def test_reset_without_a_method_fails() -> None:
    host = parse_platform("name: x\ndevices:\n  - {bdf: 0000:00:05.0, kind: rc-endpoint, reset: []}\n")
    with pytest.raises(StepFailed, match="no reset method"):
        SimPlatform(host).reset(bdf("00:05.0"))


# The platform checks its caller --------------------------------------------------------
def test_attaching_to_a_guest_with_a_host_driver_bound_is_misuse(sim: SimPlatform) -> None:
    with pytest.raises(PlatformMisuse, match="host driver is still bound"):
        sim.attach(NIC, "vm1")


def test_two_owners_in_one_group_is_misuse(sim: SimPlatform) -> None:
    sim.unbind_host_driver(GPU)
    with pytest.raises(PlatformMisuse, match="two owners in one IOMMU group"):
        sim.attach(GPU, "vm1")  # the audio function is still with the host


def test_releasing_what_is_not_owned_is_misuse(sim: SimPlatform) -> None:
    with pytest.raises(PlatformMisuse, match="not exposed to vm1"):
        sim.unexpose(NIC, "vm1")
    with pytest.raises(PlatformMisuse, match="nothing of it is mapped"):
        sim.unmap_reserved(NIC, "vm1")
    sim.unbind_host_driver(NIC)
    with pytest.raises(PlatformMisuse, match="no host driver is bound"):
        sim.unbind_host_driver(NIC)


def test_double_exposure_is_misuse(sim: SimPlatform) -> None:
    sim.create_domain("vm2", iommu_context=True)
    sim.unbind_host_driver(NIC)
    sim.expose(NIC, "vm1")
    with pytest.raises(PlatformMisuse, match="already exposed to vm1"):
        sim.expose(NIC, "vm2")


def test_destroying_a_domain_devices_still_point_at_is_misuse(sim: SimPlatform) -> None:
    sim.unbind_host_driver(NIC)
    sim.attach(NIC, "vm1")
    with pytest.raises(PlatformMisuse, match=f"{NIC} still point at it"):
        sim.destroy_domain("vm1")


def test_attaching_to_a_domain_without_iommu_context_is_misuse(sim: SimPlatform) -> None:
    sim.create_domain("plain", iommu_context=False)
    sim.unbind_host_driver(NIC)
    with pytest.raises(PlatformMisuse, match="without an IOMMU context"):
        sim.attach(NIC, "plain")


def test_binding_a_host_driver_outside_the_hosts_domain_is_misuse(sim: SimPlatform) -> None:
    sim.unbind_host_driver(NIC)
    sim.attach(NIC, QUARANTINE)
    with pytest.raises(PlatformMisuse, match="not in the host's domain"):
        sim.bind_host_driver(NIC)


def test_a_device_cannot_appear_before_the_bridge_above_it(sim: SimPlatform) -> None:
    behind_fake_bridge = bdf("08:00.0")
    with pytest.raises(PlatformMisuse, match="the bridge above it"):
        sim.plug(behind_fake_bridge)
    for device in ("06:00.0", "07:00.0", "08:00.0"):
        sim.plug(bdf(device))
    assert sim.present(behind_fake_bridge)
