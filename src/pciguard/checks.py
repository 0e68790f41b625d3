"""The checks that must pass before anything of a device reaches a guest.

Pure functions shared by the toolstack (which refuses) and the audit (which
explains). Each failed check is a ``Reason`` whose message says what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from pciguard.legacy import Flaw
from pciguard.model import Arch, Bdf, DomainType, Feature, Host, ReservedRegion
from pciguard.model.ownership import State


class RmrrPolicy(StrEnum):
    STRICT = "strict"  # refuse any device with firmware 1:1 regions
    RELAXED = "relaxed"  # accept regions private to the device; refuse shared ones


@dataclass(frozen=True)
class Options:
    allow_unsafe_interrupts: bool = False
    rmrr: RmrrPolicy = RmrrPolicy.STRICT
    flaws: frozenset[Flaw] = field(default_factory=frozenset)

    def unsafe_overrides(self) -> list[str]:
        out = []
        if self.allow_unsafe_interrupts:
            out.append("allow_unsafe_interrupts: devices may be assigned without interrupt isolation")
        if self.rmrr is RmrrPolicy.RELAXED:
            out.append("rmrr=relaxed: firmware 1:1 regions of a device are mapped into its guest")
        out.extend(f"legacy flaw {f.value}: {f.describe}" for f in sorted(self.flaws))
        return out


@dataclass(frozen=True)
class Reason:
    code: str
    message: str

    def __str__(self) -> str:
        return self.message


# Codes, so reports and tests need not match on prose.
NO_IOMMU = "no-iommu"
MSI_NOT_ISOLATED = "msi-not-isolated"
RESERVED_REGION = "reserved-region"
NO_RESET = "no-reset"
BRIDGE = "bridge"
HOST_CRITICAL = "host-critical"
GROUP_SIBLING = "group-sibling"
SRIOV_PF = "sriov-pf"
IDENTITY_DOMAIN = "identity-domain"
UNKNOWN_DOMAIN = "unknown-domain"
CONTRADICTED_GROUP = "contradicted-group"
SHARED_RESOURCE = "shared-resource"


def iommu_reason(host: Host, bdf: Bdf) -> Reason | None:
    unit = host.iommu_of(bdf)
    if unit is None:
        return Reason(NO_IOMMU, f"no IOMMU covers {bdf}: its DMA reaches all host memory")
    if unit.dma_remapping is not Feature.ENABLED:
        return Reason(
            NO_IOMMU,
            f"DMA remapping of IOMMU {unit.name} is {unit.dma_remapping.value}: "
            "enable it (intel_iommu=on / amd_iommu=on, or the firmware setting)",
        )
    group = host.group_or_none(bdf)
    if group is not None and group.doubt is not None:
        return Reason(
            CONTRADICTED_GROUP,
            f"the kernel's sources disagree about {group} of {bdf} ({group.doubt}): "
            "its true members are unknown, so it counts as not isolated",
        )
    if group is not None and group.domain is DomainType.UNKNOWN:
        return Reason(
            UNKNOWN_DOMAIN,
            f"the default domain type of {group} of {bdf} could not be read: pciguard cannot "
            "tell whether its DMA is translated, so it counts as not isolated",
        )
    if group is not None and group.domain is not None and not group.domain.translates:
        remedy = (
            "`pciguard quarantine` switches this single-device group to DMA first"
            if len(group.members) == 1
            else "boot without iommu=pt (or iommu.passthrough=1)"
        )
        return Reason(
            IDENTITY_DOMAIN,
            f"{group} of {bdf} has an identity (passthrough) default domain: its DMA is not "
            f"translated, so even bound to vfio-pci it reaches all RAM; {remedy}",
        )
    return None


def msi_reason(host: Host, bdf: Bdf) -> Reason | None:
    if host.msi_isolated(bdf) or host.iommu_of(bdf) is None:
        return None
    unit = host.iommu_of(bdf)
    assert unit is not None
    if host.arch is Arch.ARM:
        what = f"its MSI controller is {unit.msi_controller or 'unknown'}, which does not isolate"
    else:
        what = f"interrupt remapping of IOMMU {unit.name} is {unit.interrupt_remapping.value}"
    return Reason(
        MSI_NOT_ISOLATED,
        f"{bdf} could raise any interrupt in any domain: {what}; "
        "only allow_unsafe_interrupts would let it through",
    )


def device_reasons(
    host: Host,
    bdf: Bdf,
    options: Options,
    shares: Callable[[ReservedRegion, ReservedRegion], bool] = ReservedRegion.overlaps,
) -> list[Reason]:
    """What about the device itself, whatever its owner, stops assignment. Two firmware
    regions are shared when they overlap at all, not only when they are equal
    (XSA-378/386/400: overlapping RMRRs handed one guest another's memory)."""
    fn = host.topology[bdf]
    reasons: list[Reason] = []
    if fn.kind.is_bridge:
        reasons.append(Reason(BRIDGE, f"{bdf} is a {fn.kind.value}; bridges stay with the host"))
        return reasons
    if (r := iommu_reason(host, bdf)) is not None:
        reasons.append(r)
    if (r := msi_reason(host, bdf)) is not None and not options.allow_unsafe_interrupts:
        reasons.append(r)
    if fn.reserved_regions:
        shared = [
            region
            for region in fn.reserved_regions
            if any(
                other.bdf != bdf and any(shares(region, r) for r in other.reserved_regions)
                for other in host.topology.values()
            )
        ]
        if options.rmrr is RmrrPolicy.STRICT or shared:
            regions = ", ".join(map(str, shared or fn.reserved_regions))
            why = "shared with another device" if shared else "rmrr policy is strict"
            reasons.append(Reason(RESERVED_REGION, f"{bdf} needs firmware 1:1 regions {regions} ({why})"))
    vfs = host.topology.virtual_functions(bdf)
    if vfs:
        reasons.append(
            Reason(
                SRIOV_PF,
                f"{bdf} is an SR-IOV physical function with {len(vfs)} virtual "
                "functions enabled; whoever drives it controls them: assign the VFs instead, "
                "or disable them first",
            )
        )
    if not fn.reset_methods:
        reasons.append(Reason(NO_RESET, f"{bdf} has no reset method: a guest's state would survive it"))
    return reasons


@dataclass(frozen=True)
class Holder:
    """Who holds a device, as the ledger says."""

    state: State
    vm: str | None = None


def group_reasons(host: Host, bdf: Bdf, vm: str, holder_of: Callable[[Bdf], Holder | None]) -> list[Reason]:
    """Every other endpoint of the device's group must be quarantined or with ``vm``."""
    group = host.group_of(bdf)
    reasons = []
    for member in group.members:
        fn = host.topology[member]
        holder = holder_of(member)
        if member == bdf or fn.kind.is_bridge or not _in_the_way(holder, vm):
            continue  # absent devices and bridges do not DMA on a guest's behalf
        assert holder is not None
        owner, todo = _owner_and_remedy(host, member, holder)
        reasons.append(
            Reason(GROUP_SIBLING, f"{group} also holds {member}, which {owner} still owns; {todo}")
        )
    return reasons


def _in_the_way(holder: Holder | None, vm: str | None) -> bool:
    """Whether a device held so stops another from going to ``vm``: it is present, and
    neither quarantined nor (being) assigned to ``vm``."""
    if holder is None or holder.state is State.QUARANTINED:
        return False
    return not (vm is not None and holder.state in (State.ASSIGNED, State.ASSIGNING) and holder.vm == vm)


def _owner_and_remedy(host: Host, member: Bdf, holder: Holder) -> tuple[str, str]:
    """Who holds ``member`` (not quarantined, not with the guest) and what frees it."""
    fn = host.topology[member]
    if holder.state is State.HOST:
        return (f"the host driver {fn.driver}" if fn.driver else "the host"), "quarantine it too"
    if holder.vm:
        return holder.vm, f"release it from {holder.vm} first"
    return f"nobody ({holder.state.value})", "wait for it to settle"


def shared_resource_reasons(
    host: Host, bdf: Bdf, vm: str | None, holder_of: Callable[[Bdf], Holder | None]
) -> list[Reason]:
    """A device sharing a BAR page or an INTx line with ``bdf`` must be quarantined or
    with ``vm`` as well: whoever gets one reaches the other (XSA-461)."""
    reasons = []
    for shared in host.shared_resources(bdf):
        holder = holder_of(shared.other)
        if not _in_the_way(holder, vm):
            continue
        assert holder is not None
        owner, todo = _owner_and_remedy(host, shared.other, holder)
        reasons.append(
            Reason(
                SHARED_RESOURCE,
                f"{bdf} shares {shared.what} with {shared.other}, which {owner} still owns; {todo}",
            )
        )
    return reasons
