"""Replay a scenario on the simulated platform with the real toolstack, checking every
invariant after every platform call. Pure: returns a timeline, prints nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from pciguard.errors import PlatformMisuse, RefusedError, StepFailed
from pciguard.formats.scenario_file import Scenario, ScenarioStep
from pciguard.platforms.base import HOST
from pciguard.platforms.sim import Blocked, CallRecord, Delivered, Landed, SimPlatform
from pciguard.toolstack import Toolstack
from pciguard.verify.invariants import Violation, check_all


@dataclass
class TimelineEntry:
    index: int
    step: ScenarioStep
    status: str  # ok | refused | failed | misuse | landed | blocked | delivered
    outcome: str
    calls: list[CallRecord] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    expectation_met: bool | None = None  # None: the step expected nothing


@dataclass
class SimulationResult:
    scenario: Scenario
    timeline: list[TimelineEntry]
    unsafe: list[str]
    toolstack: Toolstack
    platform: SimPlatform

    @property
    def violations(self) -> list[Violation]:
        return [v for e in self.timeline for v in e.violations]

    @property
    def broken_invariants(self) -> set[str]:
        return {v.invariant for v in self.violations}

    @property
    def as_expected(self) -> bool:
        """Every step expectation met, no misuse, and exactly the violations declared
        (none, unless the scenario declares ``expect_violations``)."""
        expected = self.scenario.expect_violations or frozenset()
        return not self.unmet and not self.misuse and self.broken_invariants == expected

    @property
    def unmet(self) -> list[TimelineEntry]:
        return [e for e in self.timeline if e.expectation_met is False]

    @property
    def misuse(self) -> list[TimelineEntry]:
        return [e for e in self.timeline if e.status == "misuse"]


def build(scenario: Scenario) -> tuple[SimPlatform, Toolstack]:
    platform = SimPlatform(
        scenario.host, quarantine_mode=scenario.quarantine_mode, flaws=scenario.options.flaws
    )
    toolstack = Toolstack(platform, scenario.options)
    for name, iommu in scenario.vms:
        toolstack.create_vm(name, iommu=iommu)
    return platform, toolstack


def run(scenario: Scenario) -> SimulationResult:
    platform, toolstack = build(scenario)
    seen: set[Violation] = set()
    fresh: list[Violation] = []

    def observe(_: CallRecord | None = None) -> None:
        for violation in check_all(toolstack, platform):
            if violation not in seen:
                seen.add(violation)
                fresh.append(violation)

    platform.observers.append(observe)
    toolstack.observers.append(observe)
    observe()
    timeline = []
    for index, step in enumerate(scenario.steps, 1):
        first_call = len(platform.log)
        status, outcome = apply(step, platform, toolstack)
        observe()
        entry = TimelineEntry(index, step, status, outcome, platform.log[first_call:], list(fresh))
        fresh.clear()
        entry.expectation_met = _meets(step, status, outcome)
        timeline.append(entry)
    return SimulationResult(scenario, timeline, toolstack.unsafe_in_force(), toolstack, platform)


def _meets(step: ScenarioStep, status: str, outcome: str) -> bool | None:
    if step.expect is None and step.expect_in is None:
        return None
    if step.expect is not None and status != step.expect:
        return False
    return step.expect_in is None or f" {step.expect_in} " in f" {outcome} "


def apply(step: ScenarioStep, platform: SimPlatform, toolstack: Toolstack) -> tuple[str, str]:
    """Carry out one scenario step; return (status, what happened in words)."""
    try:
        if step.op == "dma":
            assert step.device is not None
            result: Landed | Blocked | Delivered = platform.dma(
                step.device, step.address, requester=step.requester, peer=step.peer
            )
            return ("landed" if isinstance(result, Landed) else "blocked"), str(result)
        if step.op == "msi":
            assert step.device is not None
            result = platform.msi(step.device, step.target or HOST)
            return ("delivered" if isinstance(result, Delivered) else "blocked"), str(result)
        return "ok", _operate(step, platform, toolstack)
    except RefusedError as exc:
        return "refused", str(exc)
    except PlatformMisuse as exc:
        return "misuse", f"platform misuse (a toolstack bug): {exc}"
    except StepFailed as exc:
        return "failed", str(exc)


def _operate(step: ScenarioStep, platform: SimPlatform, toolstack: Toolstack) -> str:
    device, vm = step.device, step.vm
    match step.op:
        case "fault":
            platform.inject(step.call, device, skip=step.skip, times=step.times)
            return "armed"
        case "create-vm":
            assert vm is not None
            toolstack.create_vm(vm, iommu=step.iommu)
            return f"{vm} running"
        case "destroy":
            assert vm is not None
            toolstack.destroy_vm(vm)
            return toolstack.notes[-1]
        case "crash":
            assert vm is not None
            platform.crash_domain(vm)
            toolstack.vm_crashed(vm)
            return toolstack.notes[-1]
    assert device is not None
    match step.op:
        case "make-assignable":
            toolstack.make_assignable(device, with_group=step.with_group)
        case "make-unassignable":
            toolstack.make_unassignable(device)
        case "assign":
            assert vm is not None
            toolstack.assign(device, vm)
        case "release":
            toolstack.release(device)
        case "recover":
            toolstack.recover(device)
        case "hotplug":
            if platform.present(device):
                raise RefusedError(f"{device} is already present", device=str(device))
            platform.plug(device)
            plan = toolstack.hotplug(device)
            decision = toolstack.ledger[device].decision
            rule = f" by '{decision.rule}'" if decision else ""
            return f"{plan.operation}{rule}"
        case "unplug":
            if not platform.present(device):
                raise RefusedError(f"{device} is not present", device=str(device))
            toolstack.device_unplugged(device)
            platform.unplug(device)
            return "removed"
    return str(toolstack.record(device).state.value) + (
        f" ({toolstack.record(device).vm})" if toolstack.record(device).vm else ""
    )
