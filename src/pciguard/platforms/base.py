"""The Platform protocol: the narrow contract the toolstack is written against.

Each method is one atomic step. A step either completes or raises ``StepFailed``
having changed nothing; the toolstack unwinds what came before. A step called in a
way the platform's contract forbids raises ``PlatformMisuse`` (a bug in the caller).

Domains are named by strings: ``HOST``, ``QUARANTINE`` and VM names.

Each device step says, as Linux's iommufd does, what the caller (the toolstack) holds
before and after it, and which step undoes it. "Owns" is the ledger's word: a step never
changes the ledger's owner of a device; the toolstack has claimed the device (an
in-flight state of ``model.ownership``) before it calls any of them.
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
    "offer_host_driver",
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
    def unbind_host_driver(self, device: Bdf) -> None:
        """Before: a host driver drives ``device``. After: no driver does; its DMA still
        goes where its context points. Undo: ``bind_host_driver``."""
        ...

    def bind_host_driver(self, device: Bdf) -> None:
        """Before: ``device`` translates through the host and no driver holds it. After:
        the host driver it had before pciguard took it drives it (none, if it had none).
        Undo: ``unbind_host_driver``."""
        ...

    def offer_host_driver(self, device: Bdf) -> None:
        """As ``bind_host_driver``, for a device that never had a host driver pciguard
        knows of (a hot-plugged one): the host's drivers are offered it, and if none takes
        it, it is held with no driver. Undo: ``unbind_host_driver``."""
        ...

    def reset(self, device: Bdf) -> None:
        """Before and after: the same owner. What the device carried (programmed DMA,
        its owner's data) is gone when it succeeds. Undo: none needed."""
        ...

    def attach(self, device: Bdf, domain: str) -> None:
        """Point the context entries of every requester ID of ``device`` at ``domain``.
        Before: no driver drives it (the host's, when ``domain`` is the host, comes after).
        After: its DMA translates through ``domain``; the IOTLB may still hold the
        previous domain's entries until ``flush_iotlb``. Undo: ``attach`` back, then
        ``flush_iotlb``."""
        ...

    def flush_iotlb(self, device: Bdf) -> None:
        """After: no IOTLB or device-TLB entry of ``device`` translates anywhere but
        through its context. Undo: none needed."""
        ...

    def map_reserved(self, device: Bdf, domain: str) -> None:
        """After: the firmware's 1:1 regions of ``device`` are mapped in ``domain``.
        Undo: ``unmap_reserved``."""
        ...

    def unmap_reserved(self, device: Bdf, domain: str) -> None:
        """After: ``domain`` maps none of ``device``'s firmware regions. Undo: none (the
        toolstack calls it only while taking the device away)."""
        ...

    def route_msi(self, device: Bdf, domain: str) -> None:
        """Set the interrupt remapping entries of ``device`` to deliver to ``domain``
        (``QUARANTINE``: deliver nowhere). Undo: ``route_msi`` back."""
        ...

    def expose(self, device: Bdf, domain: str) -> None:
        """Make the device (config space, BARs, IRQs) visible to a guest. Before: every
        precondition has passed and nothing else of it reached ``domain``. After: the
        guest may program it. Undo: ``unexpose``."""
        ...

    def unexpose(self, device: Bdf, domain: str) -> None:
        """After: ``domain`` can no longer reach the device's registers (what it
        programmed may still run until a reset). Undo: none (a step of taking away)."""
        ...

    def remove(self, device: Bdf) -> None:
        """Take the device off the bus (hot-unplug or reject), with everything below it
        when it is a bridge. After: nobody owns them; a device that comes back is new.
        Undo: none."""
        ...
