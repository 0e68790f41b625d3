"""The built-in hot-plug policy, until a rule file says otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from pciguard.model import Bdf, Host


class Target(StrEnum):
    ALLOW = "allow"  # a host driver may bind
    QUARANTINE = "quarantine"  # DMA blocked, kept for guests
    REJECT = "reject"  # taken off the bus


@dataclass(frozen=True)
class Decision:
    target: Target
    rule: str  # which rule decided, in words
    explicit: bool  # a rule named this device; False for implicit defaults


class HotplugPolicy(Protocol):
    def decide(self, host: Host, device: Bdf) -> Decision: ...


@dataclass(frozen=True)
class DefaultPolicy:
    """Devices on internal slots go to the host; anything behind an external-facing
    port, and anything there that presents itself as a bridge, is quarantined."""

    allow_internal: bool = True

    def decide(self, host: Host, device: Bdf) -> Decision:
        fn = host.topology[device]
        external = host.topology.is_behind_external_port(device)
        if fn.kind.is_bridge and external:
            return Decision(
                Target.QUARANTINE,
                "default: presents itself as a bridge behind an external port",
                explicit=False,
            )
        if external:
            return Decision(Target.QUARANTINE, "default: behind an external port", explicit=False)
        if fn.kind.is_bridge or not self.allow_internal:
            return Decision(Target.QUARANTINE, "default: quarantine", explicit=False)
        return Decision(Target.ALLOW, "default: internal slot", explicit=True)


class PresentPolicy(StrEnum):
    """What the guard does with devices already there when it starts (USBGuard's
    PresentDevicePolicy). ``keep`` is the default: they had host drivers before the
    guard ran, and quarantining a disk or network controller the policy forgot would
    cut the host off; run ``pciguard policy generate`` first, then ``apply-policy``."""

    KEEP = "keep"
    APPLY_POLICY = "apply-policy"
    ALLOW = "allow"
    QUARANTINE = "quarantine"
