"""The audit report: host findings and a verdict per IOMMU group. Pure.

The pydantic models below *are* the JSON schema of ``pciguard audit --json``
(``docs/json-schema.md`` is generated from them; ``schema_version`` changes when a
field changes meaning).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

from pydantic import BaseModel

from pciguard.checks import HOST_CRITICAL, Options, Reason, device_reasons
from pciguard.model import Arch, Bdf, Feature, Host, MsiController
from pciguard.model.ownership import State
from pciguard.toolstack import Toolstack

SCHEMA_VERSION: Final = 1


class Severity(StrEnum):
    CRITICAL = "critical"  # the host cannot isolate devices (or an unsafe override is on)
    WARNING = "warning"
    INFO = "info"


class Verdict(StrEnum):
    READY = "ready"  # every endpoint is quarantined and passes every check
    READY_AFTER_QUARANTINE = "ready-after-quarantine"  # quarantine the listed devices first
    NOT_ASSIGNABLE = "not-assignable"
    BRIDGES_ONLY = "bridges-only"  # infrastructure; stays with the host


class Finding(BaseModel):
    code: str
    severity: Severity
    message: str


class ReasonEntry(BaseModel):
    code: str
    message: str


class DeviceEntry(BaseModel):
    bdf: str
    name: str
    ids: str
    kind: str
    driver: str | None
    state: str
    vm: str | None
    external: bool
    iommu: str | None
    requester_ids: list[str]
    reasons: list[ReasonEntry]


class GroupEntry(BaseModel):
    number: int
    verdict: Verdict
    members: list[DeviceEntry]
    must_quarantine: list[str]  # what must go with a device of this group
    reasons: list[ReasonEntry]


class AuditReport(BaseModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    host: str
    arch: str
    source: str
    findings: list[Finding]
    unsafe_overrides: list[str]
    groups: list[GroupEntry]

    @property
    def critical(self) -> bool:
        return any(f.severity is Severity.CRITICAL for f in self.findings)


def host_findings(host: Host, options: Options) -> list[Finding]:
    out: list[Finding] = []
    if not host.iommus:
        out.append(
            Finding(
                code="no-iommu",
                severity=Severity.CRITICAL,
                message=(
                    "no IOMMU: every device can DMA to all of memory, so no device can be safely "
                    "given to a VM"
                ),
            )
        )
    for unit in host.iommus:
        if unit.dma_remapping is not Feature.ENABLED:
            out.append(
                Finding(
                    code="dma-remapping-off",
                    severity=Severity.CRITICAL,
                    message=(
                        f"IOMMU {unit.name}: DMA remapping is {unit.dma_remapping.value}; devices "
                        "behind it reach all of memory"
                    ),
                )
            )
        if host.arch is Arch.X86 and unit.interrupt_remapping is not Feature.ENABLED:
            out.append(
                Finding(
                    code="no-interrupt-remapping",
                    severity=Severity.CRITICAL,
                    message=(
                        f"IOMMU {unit.name}: interrupt remapping is {unit.interrupt_remapping.value}; "
                        "a device can raise any interrupt in any domain, so assignment is refused"
                    ),
                )
            )
        if host.arch is Arch.ARM and unit.msi_controller is not MsiController.ITS:
            out.append(
                Finding(
                    code="msi-not-isolated",
                    severity=Severity.CRITICAL,
                    message=(
                        f"IOMMU {unit.name}: MSIs go to {unit.msi_controller}, which cannot tell "
                        "devices apart, so assignment of devices behind it is refused"
                    ),
                )
            )
    uncovered = [b for b in host.topology if host.iommu_of(b) is None]
    if host.iommus and uncovered:
        out.append(
            Finding(
                code="uncovered-devices",
                severity=Severity.WARNING,
                message=(
                    f"{len(uncovered)} device(s) are covered by no IOMMU and reach all of memory: "
                    + ", ".join(map(str, uncovered[:5]))
                    + (" ..." if len(uncovered) > 5 else "")
                ),
            )
        )
    external = [b for b, f in host.topology.items() if f.external]
    if external:
        out.append(
            Finding(
                code="external-ports",
                severity=Severity.INFO,
                message=(
                    f"{len(external)} external-facing port(s) ({', '.join(map(str, external))}): "
                    "devices plugged in there are quarantined unless a rule names them"
                ),
            )
        )
    for text in options.unsafe_overrides():
        out.append(
            Finding(
                code="unsafe-override",
                severity=Severity.CRITICAL,
                message=f"UNSAFE override in force: {text}",
            )
        )
    return out


def _device_entry(ts: Toolstack, bdf: Bdf, reasons: list[Reason]) -> DeviceEntry:
    host = ts.host
    fn = host.topology[bdf]
    rec = ts.ledger[bdf]
    unit = host.iommu_of(bdf)
    return DeviceEntry(
        bdf=str(bdf),
        name=fn.name,
        ids=fn.ids,
        kind=fn.kind.value,
        driver=fn.driver,
        state=rec.state.value,
        vm=rec.vm,
        external=host.topology.is_behind_external_port(bdf),
        iommu=unit.name if unit else None,
        requester_ids=[str(r) for r in sorted(host.requester_ids(bdf))],
        reasons=[ReasonEntry(code=r.code, message=r.message) for r in reasons],
    )


def audit(ts: Toolstack, source: str) -> AuditReport:
    """Audit the toolstack's host as it stands now."""
    host = ts.host
    groups = []
    for group in host.groups:
        present = [b for b in group.members if b in ts.ledger and ts.ledger[b].state is not State.REMOVED]
        if not present:
            continue
        endpoints = [b for b in present if not host.topology[b].kind.is_bridge]
        per_device: dict[Bdf, list[Reason]] = {}
        for bdf in present:
            reasons = device_reasons(host, bdf, ts.options) if bdf in endpoints else []
            if host.topology[bdf].host_critical:
                reasons.append(
                    Reason(
                        HOST_CRITICAL,
                        f"{bdf} is host-critical ({host.topology[bdf].name or 'the host needs it'})",
                    )
                )
            per_device[bdf] = reasons
        blockers = [r for b in endpoints for r in per_device[b]]
        to_quarantine = [str(b) for b in endpoints if ts.ledger[b].state is State.HOST]
        if not endpoints:
            verdict = Verdict.BRIDGES_ONLY
        elif blockers:
            verdict = Verdict.NOT_ASSIGNABLE
        elif to_quarantine:
            verdict = Verdict.READY_AFTER_QUARANTINE
        else:
            verdict = Verdict.READY
        groups.append(
            GroupEntry(
                number=group.number,
                verdict=verdict,
                members=[_device_entry(ts, b, per_device[b]) for b in present],
                must_quarantine=to_quarantine if verdict is not Verdict.NOT_ASSIGNABLE else [],
                reasons=[ReasonEntry(code=r.code, message=r.message) for r in dict.fromkeys(blockers)],
            )
        )
    return AuditReport(
        host=host.name,
        arch=host.arch.value,
        source=source,
        findings=host_findings(host, ts.options),
        unsafe_overrides=ts.unsafe_in_force(),
        groups=groups,
    )
