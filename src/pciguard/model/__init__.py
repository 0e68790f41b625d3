"""Pure values: PCI topology, IOMMU units and groups, the ownership table.

Nothing in this package performs I/O; tests check its imports.
"""

from pciguard.model.groups import DomainType, IommuGroup, derive_groups, requester_ids
from pciguard.model.host import Arch, Feature, Host, IommuUnit, MsiController
from pciguard.model.pci import (
    Acs,
    AcsCapability,
    Bar,
    Bdf,
    Function,
    Kind,
    ReservedRegion,
    Resource,
    SharedResource,
    Topology,
)

__all__ = [
    "Acs",
    "AcsCapability",
    "Arch",
    "Bar",
    "Bdf",
    "DomainType",
    "Feature",
    "Function",
    "Host",
    "IommuGroup",
    "IommuUnit",
    "Kind",
    "MsiController",
    "ReservedRegion",
    "Resource",
    "SharedResource",
    "Topology",
    "derive_groups",
    "requester_ids",
]
