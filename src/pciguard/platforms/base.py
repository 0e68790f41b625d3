"""The Platform protocol: the narrow contract the toolstack is written against.

Each method is one atomic step. A step either completes or raises ``StepFailed``
having changed nothing; the toolstack unwinds what came before. A step called in a
way the platform's contract forbids raises ``PlatformMisuse`` (a bug in the caller).

Domains are named by strings: ``HOST``, ``QUARANTINE`` and VM names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from pciguard.model import Bdf, Host

HOST = "host"
QUARANTINE = "quarantine"
RESERVED_NAMES = frozenset({HOST, QUARANTINE, "firmware", "*"})

#: The steps of the protocol by name, as plans, scenarios and fault injection name them.
DEVICE_STEPS = (
    "unbind_host_driver",
    "bind_host_driver",
    "reset",
    "attach",
    "flush_iotlb",
    "map_reserved",
    "unmap_reserved",
    "route_msi",
    "expose",
    "unexpose",
    "remove",
)
DOMAIN_STEPS = ("create_domain", "crash_domain", "destroy_domain", "enable_iommu_context")
STEPS = DEVICE_STEPS + DOMAIN_STEPS


class DomainState(StrEnum):
    RUNNING = "running"
    CRASHED = "crashed"  # dying: its memory is held until every device has left it
    DESTROYED = "destroyed"  # its memory is back with the host


@dataclass(frozen=True)
class DomainInfo:
    name: str
    state: DomainState
    iommu_context: bool  # declared when the domain was created


@runtime_checkable
class Platform(Protocol):
    """What the toolstack may ask of a platform (simulated or a real Linux host)."""

    @property
    def host(self) -> Host: ...

    # -- what is there now ---------------------------------------------------
    def domains(self) -> Mapping[str, DomainInfo]: ...
    def present(self, device: Bdf) -> bool: ...
    def host_driver_bound(self, device: Bdf) -> bool: ...
    def context_of(self, device: Bdf) -> str | None:
        """The domain the device's own requester ID translates through, or None."""
        ...

    # -- domains -------------------------------------------------------------
    def create_domain(self, name: str, *, iommu_context: bool) -> None: ...
    def crash_domain(self, name: str) -> None: ...
    def destroy_domain(self, name: str) -> None:
        """Free the domain's memory. Refused while any device still points at it."""
        ...

    def enable_iommu_context(self, name: str) -> None:
        """Give a running domain an IOMMU context late. The secure toolstack never does."""
        ...

    # -- device steps (each atomic) -------------------------------------------
    def unbind_host_driver(self, device: Bdf) -> None: ...
    def bind_host_driver(self, device: Bdf) -> None: ...
    def reset(self, device: Bdf) -> None: ...
    def attach(self, device: Bdf, domain: str) -> None:
        """Point the context entries of every requester ID of ``device`` at ``domain``."""
        ...

    def flush_iotlb(self, device: Bdf) -> None: ...
    def map_reserved(self, device: Bdf, domain: str) -> None: ...
    def unmap_reserved(self, device: Bdf, domain: str) -> None: ...
    def route_msi(self, device: Bdf, domain: str) -> None:
        """Set the interrupt remapping entries of ``device`` to deliver to ``domain``
        (``QUARANTINE``: deliver nowhere)."""
        ...

    def expose(self, device: Bdf, domain: str) -> None:
        """Make the device (config space, BARs, IRQs) visible to a guest."""
        ...

    def unexpose(self, device: Bdf, domain: str) -> None: ...
    def remove(self, device: Bdf) -> None:
        """Take the device off the bus (hot-unplug or reject)."""
        ...
