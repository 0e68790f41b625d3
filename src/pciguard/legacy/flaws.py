"""The historic flaws by name, with what each was and where it lives."""

from __future__ import annotations

from enum import StrEnum


class Flaw(StrEnum):
    XSA_61 = "xsa-61"
    XSA_302 = "xsa-302"
    XSA_306 = "xsa-306"
    XSA_400 = "xsa-400"
    XSA_442 = "xsa-442"
    XSA_449 = "xsa-449"
    HOTPLUG_TO_HOST = "hotplug-to-host"
    TRUSTED_BRIDGES = "trusted-bridges"
    NO_MSI_CHECK = "no-msi-check"
    NO_GROUP_CHECK = "no-group-check"
    LATE_IOMMU_CONTEXT = "late-iommu-context"
    RESET_IGNORED = "reset-ignored"
    XSA_445 = "xsa-445"
    SHARED_SCRATCH_PAGE = "shared-scratch-page"
    XSA_378 = "xsa-378"
    RMRR_EQUAL_ONLY = "rmrr-equal-only"
    XSA_461 = "xsa-461"
    TEARDOWN_RUNNING = "teardown-running"
    ATS_UNTRUSTED = "ats-untrusted"
    NO_DEVTLB_FLUSH = "no-devtlb-flush"

    @property
    def describe(self) -> str:
        return _DESCRIPTIONS[self]

    @property
    def layer(self) -> str:
        """Where the flaw lives: in the toolstack or in the (simulated) hypervisor."""
        return "platform" if self in _PLATFORM_FLAWS else "toolstack"


_DESCRIPTIONS = {
    Flaw.XSA_61: "libxl gave an HVM guest the device before checking that an IOMMU exists",
    Flaw.XSA_302: "on VM teardown the device went straight back to the host, with guest DMA still in flight",
    Flaw.XSA_306: "only devices prepared with pci-assignable-add were quarantined; a device "
    "assigned straight from the host went back to it",
    Flaw.XSA_400: "reassignment was not atomic: the device passed through the host's domain "
    "on its way to quarantine",
    Flaw.XSA_442: "ownership changed without flushing the IOTLB, so stale translations "
    "kept pointing at the previous owner",
    Flaw.XSA_449: "phantom functions and aliases kept the previous owner's context when "
    "a device was reassigned",
    Flaw.HOTPLUG_TO_HOST: "a hot-plugged device was handed to a host driver at once "
    "(Thunderbolt: DMA to the host before anyone decided)",
    Flaw.TRUSTED_BRIDGES: "a device that presents itself as a bridge was treated as "
    "infrastructure and given to the host",
    Flaw.NO_MSI_CHECK: "assignment went ahead without interrupt isolation and reported "
    "nothing (VFIO's allow_unsafe_interrupts)",
    Flaw.NO_GROUP_CHECK: "members of one IOMMU group could go to different owners (Xen never checks groups)",
    Flaw.LATE_IOMMU_CONTEXT: "a VM created without an IOMMU context got one patched in when a device arrived",
    Flaw.RESET_IGNORED: "a failed reset was only logged and the device handed on as if clean "
    "(libxl ignores the result of its reset)",
    Flaw.XSA_445: "the scratch page a quarantined device reaches was not cleared between "
    "assignments, so a device could read what its previous owner left there",
    Flaw.SHARED_SCRATCH_PAGE: "one scratch page served every quarantined device (Xen before "
    "per-device quarantine page tables), so devices read each other's owners' data",
    Flaw.XSA_378: "a device's firmware 1:1 regions stayed mapped in the guest it left",
    Flaw.RMRR_EQUAL_ONLY: "a firmware 1:1 region counted as shared only when another "
    "device's was the same range, not when the two overlapped",
    Flaw.XSA_461: "devices sharing a BAR page or a legacy interrupt line went to different "
    "owners, so a guest reached the other device's registers",
    Flaw.TEARDOWN_RUNNING: "a VM kept running while it was torn down, so an assignment "
    "started meanwhile passed its checks and the VM reported destroyed kept the device",
    Flaw.ATS_UNTRUSTED: "ATS was enabled on devices behind external ports, whose translated "
    "requests the IOMMU passes unchecked (Linux before it marked such devices untrusted)",
    Flaw.NO_DEVTLB_FLUSH: "the IOTLB was invalidated but not the device-TLB (ATS), so a "
    "device kept its previous owner's translations",
}

_PLATFORM_FLAWS = frozenset(
    {
        Flaw.XSA_449,
        Flaw.NO_GROUP_CHECK,
        Flaw.XSA_445,
        Flaw.SHARED_SCRATCH_PAGE,
        Flaw.ATS_UNTRUSTED,
        Flaw.NO_DEVTLB_FLUSH,
    }
)


def parse_flaws(names: list[str]) -> frozenset[Flaw]:
    known = {f.value: f for f in Flaw}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown flaw(s) {unknown}; known: {sorted(known)}")
    return frozenset(known[n] for n in names)
