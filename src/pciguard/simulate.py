"""Replay a scenario on the simulated platform with the real toolstack, checking every
invariant after every platform call. Pure: returns a timeline, prints nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from pciguard.errors import PlatformMisuse, RefusedError, StepFailed
from pciguard.formats.scenario_file import Scenario, ScenarioStep
from pciguard.legacy.platform import make_platform
from pciguard.legacy.toolstack import make_toolstack
from pciguard.model import Bdf
from pciguard.platforms.base import HOST
from pciguard.platforms.sim import Blocked, CallRecord, Delivered, Landed, SimPlatform
from pciguard.toolstack import Cursor, Outcome, Toolstack
from pciguard.verify.invariants import PLATFORM_CONTRACT, Violation, check_all


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
        misuse = {PLATFORM_CONTRACT} if self.misuse else set()
        return {v.invariant for v in self.violations} | misuse

    @property
    def as_expected(self) -> bool:
        """Every step expectation met, and exactly the violations declared
        (none, unless the scenario declares ``expect_violations``)."""
        expected = self.scenario.expect_violations or frozenset()
        return not self.unmet and self.broken_invariants == expected

    @property
    def unmet(self) -> list[TimelineEntry]:
        return [e for e in self.timeline if e.expectation_met is False]

    @property
    def misuse(self) -> list[TimelineEntry]:
        return [e for e in self.timeline if e.status == "misuse"]


def build(scenario: Scenario) -> tuple[SimPlatform, Toolstack]:
    platform = make_platform(
        scenario.host, quarantine_mode=scenario.quarantine_mode, flaws=scenario.options.flaws
    )
    toolstack = make_toolstack(platform, scenario.options, scenario.policy)
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
    replay = Replay(platform, toolstack)
    timeline = []
    for index, step in enumerate(scenario.steps, 1):
        first_call = len(platform.log)
        status, outcome = replay.apply(step)
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


class Replay:
    """Carries out scenario steps, keeping the operations a scenario left in flight."""

    def __init__(self, platform: SimPlatform, toolstack: Toolstack) -> None:
        self.platform = platform
        self.toolstack = toolstack
        self.in_flight: dict[str, Cursor] = {}

    def apply(self, step: ScenarioStep) -> tuple[str, str]:
        """Carry out one step; return (status, what happened in words)."""
        platform = self.platform
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
            if step.op == "continue" or step.partial is not None:
                return self._stepwise(step)
            return "ok", self._operate(step)
        except RefusedError as exc:
            return "refused", str(exc)
        except PlatformMisuse as exc:
            return "misuse", f"platform misuse (a toolstack bug): {exc}"
        except StepFailed as exc:
            return "failed", str(exc)

    def _stepwise(self, step: ScenarioStep) -> tuple[str, str]:
        """Start an operation and take ``partial`` of its calls, or ``continue`` one."""
        assert step.id is not None
        if step.op == "continue":
            cursor = self.in_flight.pop(step.id)
            calls = step.count
        else:
            if step.op == "hotplug":
                self._plug(step)
            plan = self.toolstack.plan(step.op, step.device, step.vm, with_group=step.with_group)
            cursor = self.toolstack.begin(plan)
            calls = step.partial or 0
        for i in range(calls):
            upcoming = cursor.next_step
            armed = len(self.platform.faults)
            if step.fail and i == 0 and upcoming is not None:
                self.platform.inject(upcoming.call, upcoming.device)
            result = self.toolstack.advance(cursor)
            del self.platform.faults[armed:]  # the failure was for this call only
            if isinstance(result, Outcome):
                status = "ok" if result.failure is None else "failed"
                return status, f"{step.id} finished: " + "; ".join(
                    filter(None, [result.failure, result.message])
                )
            cursor = result
        self.in_flight[step.id] = cursor
        upcoming = cursor.next_step
        return "ok", f"{step.id} in flight ({cursor.phase.value}), next: {upcoming or 'finish'}"

    def _plug(self, step: ScenarioStep) -> None:
        assert step.device is not None
        if self.platform.present(step.device):
            raise RefusedError(f"{step.device} is already present", device=str(step.device))
        parent = self.platform.host.topology[step.device].parent
        if parent is not None and not self.platform.present(parent):
            raise RefusedError(f"{step.device} cannot appear before {parent}, the bridge above it")
        self.platform.plug(step.device)
        self.toolstack.device_appeared(step.device)

    def _returned(self, held: list[Bdf]) -> str:
        """Where the devices a VM held went when it went."""
        if not held:
            return ""
        places = ", ".join(f"{b} {self.toolstack.ledger[b].state.value}" for b in held)
        return f"; ledger: {places}"

    def _operate(self, step: ScenarioStep) -> str:
        platform, toolstack = self.platform, self.toolstack
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
                held = toolstack.devices_of(vm)
                toolstack.destroy_vm(vm)
                return f"destroyed {vm}" + self._returned(held)
            case "crash":
                assert vm is not None
                platform.crash_domain(vm)
                if not step.cleanup:
                    return f"{vm} crashed"
                held = toolstack.devices_of(vm)
                toolstack.vm_crashed(vm)
                return f"{vm} crashed and cleaned up" + self._returned(held)
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
                self._plug(step)
                plan = toolstack.execute(toolstack.plan_hotplug(device))
                decision = toolstack.ledger[device].decision
                rule = f" by '{decision.rule}'" if decision else ""
                return f"{plan.operation}{rule}"
            case "unplug":
                if not platform.present(device):
                    raise RefusedError(f"{device} is not present", device=str(device))
                toolstack.device_unplugged(device)
                platform.unplug(device)
                return "removed"
        rec = toolstack.record(device)
        return rec.state.value + (f" ({rec.vm})" if rec.vm else "")
