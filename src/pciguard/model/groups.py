"""IOMMU group derivation and requester-ID aliases, following Linux's rules.

The rules mirror drivers/iommu/iommu.c pci_device_group() and
drivers/pci/pci.c pci_acs_enabled():

1. Walk the DMA aliases upward: a device behind a PCIe-to-PCI bridge is seen by the
   IOMMU with the bridge's secondary-bus requester ID, so it joins the bridge.
2. From there, keep walking up while the port above is not ACS-isolated all the way
   to the root (SV, RR, CR and UF on every port): everything below a port without
   ACS shares that port's group.
3. Devices whose requester IDs overlap (phantom functions) share a group.
4. Functions of one multi-function device that lack ACS share a group.

Whether a port or a function isolates is asked of the kernel's ACS quirk table first
(``acs_quirks``), as Linux does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pciguard.model.acs_quirks import quirk_decision
from pciguard.model.pci import Bdf, Function, Kind, Topology


class DomainType(StrEnum):
    """A Linux IOMMU group's default domain (``/sys/kernel/iommu_groups/N/type``)."""

    DMA = "DMA"  # translated, strict IOTLB invalidation
    DMA_FQ = "DMA-FQ"  # translated, lazy (flush-queue) invalidation
    IDENTITY = "identity"  # passthrough: DMA is not translated at all
    BLOCKED = "blocked"
    UNMANAGED = "unmanaged"  # owned by a user such as VFIO
    UNKNOWN = "unknown"

    @property
    def translates(self) -> bool:
        """Whether the domain stops DMA that nothing was mapped for. Unknown does not."""
        return self not in (DomainType.IDENTITY, DomainType.UNKNOWN)


# What sysfs's ``type`` says of a group whose domain translates.
TRANSLATING_TYPES = frozenset(t.value for t in DomainType if t.translates)


@dataclass(frozen=True)
class IommuGroup:
    number: int
    members: tuple[Bdf, ...]
    domain: DomainType | None = None  # None: not reported (simulated hosts translate)
    # What the kernel's sources contradict each other about (the group is not assignable).
    doubt: str | None = None

    def __contains__(self, bdf: object) -> bool:
        return bdf in self.members

    def __str__(self) -> str:
        return f"group {self.number}"


def acs_enabled(topology: Topology, fn: Function) -> bool:
    """Linux pci_acs_enabled(fn, SV|RR|CR|UF): the kernel's quirk table first."""
    if acs_never_asked(topology, fn):
        return True
    quirk = quirk_decision(topology, fn)
    if quirk is not None:
        return quirk.isolated
    if not fn.kind.is_pcie:
        return False  # conventional PCI: a shared bus, anyone can snoop
    if fn.kind is Kind.PCIE_TO_PCI_BRIDGE:
        return False
    return fn.acs is not None and fn.acs.isolates()  # a port, or a function of a multi-function device


def acs_never_asked(topology: Topology, fn: Function) -> bool:
    """A single-function PCIe endpoint (or upstream port): the kernel never asks whether
    it isolates (ACS concerns only its functions' traffic with each other)."""
    return (
        fn.kind.is_pcie
        and fn.kind not in (Kind.ROOT_PORT, Kind.SWITCH_DOWNSTREAM, Kind.PCIE_TO_PCI_BRIDGE)
        and not topology.is_multifunction(fn.bdf)
    )


def acs_path_enabled(topology: Topology, bridge: Function) -> bool:
    """Linux pci_acs_path_enabled(bridge, NULL): every port from here to the root isolates."""
    return acs_enabled(topology, bridge) and all(
        acs_enabled(topology, up) for up in topology.path_to_root(bridge.bdf)
    )


def requester_ids(topology: Topology, bdf: Bdf) -> frozenset[Bdf]:
    """Every requester ID DMA from ``bdf`` may carry: its own, phantom functions, and
    the secondary-bus ID of each PCIe-to-PCI bridge above it (the bridge takes
    ownership of the transaction)."""
    fn = topology[bdf]
    rids = {bdf, *fn.phantom_rids()}
    for bridge in topology.path_to_root(bdf):
        if bridge.kind is Kind.PCIE_TO_PCI_BRIDGE:
            bus = topology.secondary_bus(bridge.bdf)
            if bus is not None:
                rids.add(Bdf(bdf.segment, bus, 0, 0))
    return frozenset(rids)


def _isolation_anchor(topology: Topology, bdf: Bdf, isolated: dict[Bdf, bool]) -> Bdf:
    """The device whose group ``bdf`` joins (steps 1 and 2 of the module docstring).
    ``isolated`` remembers acs_path_enabled per bridge: many devices share each one."""
    anchor = bdf
    for bridge in topology.path_to_root(bdf):
        if bridge.kind is Kind.PCIE_TO_PCI_BRIDGE:
            anchor = bridge.bdf
    node = topology[anchor]
    while node.parent is not None:
        up = topology[node.parent]
        if up.bdf not in isolated:
            isolated[up.bdf] = acs_path_enabled(topology, up)
        if isolated[up.bdf]:
            break
        node = up
    return node.bdf


def derive_groups(topology: Topology) -> tuple[IommuGroup, ...]:
    """Partition the topology into IOMMU groups, numbered in BDF order."""
    leader: dict[Bdf, Bdf] = {bdf: bdf for bdf in topology}

    def find(x: Bdf) -> Bdf:
        while leader[x] != x:
            leader[x] = leader[leader[x]]
            x = leader[x]
        return x

    def union(a: Bdf, b: Bdf) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            leader[max(ra, rb)] = min(ra, rb)

    users_of_rid: dict[Bdf, list[Bdf]] = {}
    for bdf in topology:
        for rid in (bdf, *topology[bdf].phantom_rids()):
            users_of_rid.setdefault(rid, []).append(bdf)
    for users in users_of_rid.values():  # step 3: overlapping requester IDs
        for other in users[1:]:
            union(users[0], other)
    isolated: dict[Bdf, bool] = {}
    for bdf in topology:
        anchor = _isolation_anchor(topology, bdf, isolated)
        union(bdf, anchor)
        anchor_fn = topology[anchor]
        if topology.is_multifunction(anchor) and not acs_enabled(topology, anchor_fn):
            for sibling in topology.slot_siblings(anchor):  # step 4
                if not acs_enabled(topology, sibling):
                    union(anchor, sibling.bdf)

    members: dict[Bdf, list[Bdf]] = {}
    for bdf in topology:
        members.setdefault(find(bdf), []).append(bdf)
    ordered = sorted(members.values(), key=lambda m: m[0])
    return tuple(IommuGroup(i, tuple(m)) for i, m in enumerate(ordered))
