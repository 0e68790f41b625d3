"""The simulated hypervisor platform: a first-class Platform, not test scaffolding."""

from pciguard.platforms.sim.platform import (
    POINTER_FIELDS,
    Blocked,
    CallRecord,
    Delivered,
    Landed,
    SimPlatform,
    SimSnapshot,
)

__all__ = ["POINTER_FIELDS", "Blocked", "CallRecord", "Delivered", "Landed", "SimPlatform", "SimSnapshot"]
