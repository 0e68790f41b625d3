"""The simulated hypervisor platform: a first-class Platform, not test scaffolding."""

from pciguard.platforms.sim.platform import Blocked, CallRecord, Delivered, Landed, SimPlatform

__all__ = ["Blocked", "CallRecord", "Delivered", "Landed", "SimPlatform"]
