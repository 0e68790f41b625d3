"""The simulated hypervisor as it was before each historic fix: the secure simulated
platform with what a flaw made the hardware or hypervisor do put back. The secure
``SimPlatform`` knows none of them."""

from __future__ import annotations

from collections.abc import Iterable

from pciguard.legacy.flaws import Flaw
from pciguard.model import Bdf, Host
from pciguard.platforms.sim import SimPlatform

SHARED_PAGE = "shared"  # the one scratch page of the shared-scratch-page flaw


def make_platform(host: Host, *, quarantine_mode: str = "block", flaws: Iterable[Flaw] = ()) -> SimPlatform:
    """The secure simulated platform, or the legacy one when ``flaws`` are selected."""
    flaws = frozenset(flaws)
    if flaws:
        return LegacySimPlatform(host, quarantine_mode=quarantine_mode, flaws=flaws)
    return SimPlatform(host, quarantine_mode=quarantine_mode)


class LegacySimPlatform(SimPlatform):
    def __init__(self, host: Host, *, quarantine_mode: str = "block", flaws: frozenset[Flaw]) -> None:
        self.flaws = flaws  # first: the platform's own start already takes steps
        super().__init__(host, quarantine_mode=quarantine_mode)

    def scratch_page(self, rid: Bdf) -> Bdf | str:
        # Xen before per-device quarantine page tables: one page for every device.
        return SHARED_PAGE if Flaw.SHARED_SCRATCH_PAGE in self.flaws else super().scratch_page(rid)

    def _trusted(self, device: Bdf) -> bool:
        # Linux before it marked devices behind external ports untrusted.
        return Flaw.ATS_UNTRUSTED in self.flaws or super()._trusted(device)

    def _check_group(self, device: Bdf, domain: str) -> None:
        if Flaw.NO_GROUP_CHECK not in self.flaws:  # Xen never checks groups
            super()._check_group(device, domain)

    def _contexts_set_by_attach(self, device: Bdf) -> frozenset[Bdf]:
        # XSA-449: phantom functions and aliases kept the previous owner's context.
        return frozenset({device}) if Flaw.XSA_449 in self.flaws else super()._contexts_set_by_attach(device)

    def _clear_scratch_page(self, rid: Bdf) -> None:
        if Flaw.XSA_445 not in self.flaws:  # the page kept what the previous owner left
            super()._clear_scratch_page(rid)

    def _invalidate_device_tlb(self, rid: Bdf) -> None:
        if Flaw.NO_DEVTLB_FLUSH not in self.flaws:  # the IOTLB was flushed, the device-TLB not
            super()._invalidate_device_tlb(rid)
