"""A host as pciguard sees it: its PCI topology and IOMMU units. Pure values."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

from pciguard.errors import TopologyError
from pciguard.model.groups import IommuGroup, derive_groups, requester_ids
from pciguard.model.pci import Bdf, SharedResource, Topology


class Arch(StrEnum):
    X86 = "x86"
    ARM = "arm"


class Feature(StrEnum):
    """State of an IOMMU feature: the hardware may have it and the OS may not use it."""

    ABSENT = "absent"
    DISABLED = "disabled"
    ENABLED = "enabled"
    UNKNOWN = "unknown"  # the input cannot show it (an lspci dump); judged as not enabled


class MsiController(StrEnum):
    """ARM interrupt controllers that receive MSIs."""

    ITS = "gicv3-its"  # tags each MSI with its DeviceID: isolates
    GICV2M = "gicv2m"  # one doorbell for all: any device can raise any SPI


@dataclass(frozen=True)
class IommuUnit:
    """One DMA remapping unit (VT-d DRHD, AMD IOMMU, ARM SMMU).

    ``scope`` lists the bridges and devices it covers (each with its subtree);
    ``None`` means every device no other unit claims (VT-d INCLUDE_PCI_ALL).
    """

    name: str
    dma_remapping: Feature = Feature.ENABLED
    interrupt_remapping: Feature = Feature.ENABLED
    msi_controller: MsiController | None = None
    scope: tuple[Bdf, ...] | None = None


@dataclass(frozen=True)
class Host:
    name: str
    arch: Arch
    topology: Topology
    iommus: tuple[IommuUnit, ...] = ()
    hotplug_later: frozenset[Bdf] = frozenset()  # absent at boot, plugged in later
    # The groups a running kernel formed: the truth on a real host. None: derive them.
    kernel_groups: tuple[IommuGroup, ...] | None = None

    def __post_init__(self) -> None:
        names = [u.name for u in self.iommus]
        if len(set(names)) != len(names):
            raise TopologyError(f"IOMMU unit names repeat: {names}")
        if sum(u.scope is None for u in self.iommus) > 1:
            raise TopologyError("only one IOMMU unit may cover all remaining devices (scope: all)")
        for group in self.kernel_groups or ():
            for bdf in group.members:
                if bdf not in self.topology:
                    raise TopologyError(f"{group} names {bdf}, which is not a device")
        for unit in self.iommus:
            for bdf in unit.scope or ():
                if bdf not in self.topology:
                    raise TopologyError(f"IOMMU {unit.name}: scope names {bdf}, which is not a device")
            if self.arch is Arch.X86 and unit.msi_controller is not None:
                raise TopologyError(f"IOMMU {unit.name}: msi_controller is for ARM hosts only")

    @cached_property
    def _unit_of(self) -> dict[Bdf, IommuUnit]:
        owners: dict[Bdf, IommuUnit] = {}
        for unit in self.iommus:
            for top in unit.scope or ():
                for bdf in self.topology.subtree(top):
                    owners[bdf] = unit
        catch_all = next((u for u in self.iommus if u.scope is None), None)
        if catch_all is not None:
            for bdf in self.topology:
                owners.setdefault(bdf, catch_all)
        return owners

    def iommu_of(self, bdf: Bdf) -> IommuUnit | None:
        return self._unit_of.get(bdf)

    def dma_translated(self, bdf: Bdf) -> bool:
        """DMA from ``bdf`` goes through an enabled remapping unit that translates it."""
        unit = self.iommu_of(bdf)
        if unit is None or unit.dma_remapping is not Feature.ENABLED:
            return False
        group = self.group_or_none(bdf)
        if group is None:
            return True
        return group.doubt is None and (group.domain is None or group.domain.translates)

    def msi_isolated(self, bdf: Bdf) -> bool:
        """An MSI from ``bdf`` can reach only the vectors set up for it."""
        unit = self.iommu_of(bdf)
        if unit is None or unit.dma_remapping is not Feature.ENABLED:
            return False
        if self.arch is Arch.ARM:
            return unit.msi_controller is MsiController.ITS
        return unit.interrupt_remapping is Feature.ENABLED

    @cached_property
    def derived_groups(self) -> tuple[IommuGroup, ...]:
        """The groups pciguard derives from topology and ACS, as Linux would form them."""
        return derive_groups(self.topology)

    @cached_property
    def groups_differing(self) -> dict[int, tuple[IommuGroup, ...]]:
        """Kernel group number -> the derived groups its members fall in, for each kernel
        group pciguard's derivation does not reproduce (a quirk, an ACS override, or a bug)."""
        derived_of = {b: g for g in self.derived_groups for b in g.members}
        derived = {frozenset(g.members) for g in self.derived_groups}
        return {
            g.number: tuple(dict.fromkeys(derived_of[m] for m in g.members))
            for g in self.kernel_groups or ()
            if frozenset(g.members) not in derived
        }

    @property
    def groups(self) -> tuple[IommuGroup, ...]:
        return self.derived_groups if self.kernel_groups is None else self.kernel_groups

    @cached_property
    def _group_of(self) -> dict[Bdf, IommuGroup]:
        return {bdf: g for g in self.groups for bdf in g.members}

    def group_of(self, bdf: Bdf) -> IommuGroup:
        return self._group_of[bdf]

    def group_or_none(self, bdf: Bdf) -> IommuGroup | None:
        """A device's group; None on a real host whose kernel put it in none (no IOMMU)."""
        return self._group_of.get(bdf)

    def ungrouped(self) -> list[Bdf]:
        return [b for b in self.topology if b not in self._group_of]

    @cached_property
    def _rids(self) -> dict[Bdf, frozenset[Bdf]]:
        return {bdf: requester_ids(self.topology, bdf) for bdf in self.topology}

    def requester_ids(self, bdf: Bdf) -> frozenset[Bdf]:
        return self._rids[bdf]

    def owner_of_rid(self, rid: Bdf) -> list[Bdf]:
        """The devices whose DMA can carry requester ID ``rid``."""
        return sorted(b for b, rids in self._rids.items() if rid in rids)

    def shared_resources(self, bdf: Bdf) -> tuple[SharedResource, ...]:
        """The devices sharing a BAR page or a legacy interrupt line with ``bdf``."""
        return self.topology.shared_resources(bdf)
