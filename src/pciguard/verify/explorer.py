"""Breadth-first exploration of every interleaving of toolstack operations (one platform
call at a time), injected failures, VM crashes and hot-plug arrivals, running the real
toolstack on the simulated platform and checking every invariant in every state.

A state is the platform's snapshot, the ledger's snapshot, the operations in flight
(``Cursor`` values) and the faults left to inject. States are deduplicated by a
fingerprint (their hash); each remembers its parent's fingerprint and the action that
led to it, so the first violation found comes with a shortest trace.

Reductions, each switchable:

- **symmetry**: interchangeable devices (same shape, alone in their IOMMU group, behind
  identical ports) and interchangeable VMs (same IOMMU context) are renamed into a
  canonical order, so states that differ only by such a renaming are explored once;
- **independence**: operations whose footprints (IOMMU groups, VM, and what their
  devices share across groups: BAR pages, INTx lines, firmware memory, scratch pages)
  are disjoint commute, and every invariant looks at one such footprint at a time; so
  a state that mixes the progress of disjoint operations breaks nothing that the same
  progress of each alone would not. An operation therefore starts while others are in
  flight only if it overlaps one of them, and of several mutually disjoint operations
  in flight only the first is advanced. A VM's crash counts as an operation of one
  step whose footprint is the VM and the devices pointing at it: it is not interleaved
  with the steps of operations it cannot affect (what it would reach is also reached by
  crashing first: mostly this saves transitions);
- **messages**: an operation in flight carries the words of its first failure (and of
  FORWARD steps that failed after it), which the toolstack only writes into the outcome
  the search drops; what steers it is whether there was a failure and how many steps
  stuck. Those words are left out of the state, so two states that differ only there
  are one.
"""

from __future__ import annotations

import gc
import resource
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, NamedTuple

from pciguard.errors import PlatformMisuse, RefusedError
from pciguard.formats.scenario_file import PARTIAL_OPS, Exploration, Scenario
from pciguard.model import Bdf
from pciguard.model.ownership import State as DeviceState
from pciguard.platforms.base import STEPS, DomainState
from pciguard.platforms.sim import POINTER_FIELDS, SimSnapshot
from pciguard.policy import Decision
from pciguard.simulate import Replay, build
from pciguard.toolstack import Cursor, LedgerSnapshot, Plan, Step
from pciguard.verify.invariants import PLATFORM_CONTRACT, Violation, check_all

BEGIN_OPS = tuple(op for op in PARTIAL_OPS if op != "hotplug")  # hot-plugs arrive, not start
FAILED = "a step failed"  # a failure's words, as the messages reduction keeps them

Renaming = dict[Any, Any]


class State(NamedTuple):
    """One state of the search."""

    platform: SimSnapshot
    ledger: LedgerSnapshot
    in_flight: frozenset[Cursor]
    faults: int  # failures left to inject


class Parent(NamedTuple):
    """Where a state was first reached from: the fingerprint of the state before and the
    action taken, with the renaming that made the result canonical."""

    fingerprint: int
    action: Action
    renaming: Renaming


class Successor(NamedTuple):
    """One transition out of a state, as the search sees it."""

    action: Action
    raw: State  # as the toolstack left it
    state: State  # canonical: what the search stores
    fingerprint: int
    renaming: Renaming  # raw -> canonical names
    misuse: bool  # the platform refused a call: a violation, new state or not


@dataclass(frozen=True)
class Action:
    """One transition: start an operation, advance one (or make its next call fail),
    crash a VM, or plug a device in."""

    kind: str  # begin | advance | fail | crash | hotplug
    op: str = ""
    device: Bdf | None = None
    vm: str | None = None
    key: tuple[Any, ...] = ()  # the operation in flight (advance, fail)
    free: bool = False  # fail: a reset of a device whose resets may fail (no fault spent)

    def __str__(self) -> str:
        if self.kind in ("advance", "fail"):
            what = describe_key(self.key)
            if self.kind == "advance":
                return f"{what}: next call"
            return f"{what}: next call FAILS " + ("(a reset that may fail)" if self.free else "(injected)")
        if self.kind == "crash":
            return f"{self.vm} crashes"
        if self.kind == "hotplug":
            return f"{self.device} is plugged in"
        target = f" -> {self.vm}" if self.op == "assign" else (f" {self.vm}" if self.vm else "")
        return f"start {self.op}{' ' + str(self.device) if self.device else ''}{target}"


def key_of(cursor: Cursor) -> tuple[Any, ...]:
    plan = cursor.plan
    return (plan.operation, plan.devices, plan.vm)


def describe_key(key: tuple[Any, ...]) -> str:
    operation, devices, vm = key
    return " ".join([operation, *map(str, devices), *([vm] if vm else [])])


@dataclass
class Stats:
    states: int = 0
    transitions: int = 0
    seconds: float = 0.0
    depth: int = 0
    peak_rss_mib: float = 0.0

    @property
    def states_per_second(self) -> float:
        return self.states / self.seconds if self.seconds else 0.0


@dataclass
class Counterexample:
    actions: list[Action]
    violations: list[Violation]


@dataclass
class Result:
    verdict: str  # pass | violation | incomplete
    stats: Stats
    counterexample: Counterexample | None = None
    reason: str = ""  # why an incomplete run stopped


class Explorer:
    def __init__(
        self,
        scenario: Scenario,
        *,
        symmetry: bool = True,
        independence: bool = True,
        messages: bool = True,
        max_states: int | None = None,
        time_limit: float | None = None,
        workers: int = 1,
        on_progress: Callable[[Stats], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.explore = scenario.explore or Exploration(devices=(), operations=())
        self.independence = independence
        self.messages = messages
        self.max_states = max_states
        self.time_limit = time_limit
        self.workers = workers
        self.on_progress = on_progress
        self.platform, self.toolstack = build(scenario)
        self._units: dict[Bdf, list[Bdf]] = {}
        replay = Replay(self.platform, self.toolstack)
        for step in scenario.steps:  # the set-up the exploration starts from
            replay.apply(step)
        self.tracked = self._tracked(replay)
        self.initial = State(
            self.platform.snapshot(),
            self.toolstack.snapshot(self.tracked),
            frozenset(self._kept(c) for c in replay.in_flight.values()),
            self.explore.faults,
        )
        self.vms = tuple(name for name, _ in scenario.vms)
        self.hotplug = tuple(d for d in self.explore.devices if d in scenario.host.hotplug_later)
        self.symmetry = Symmetry(scenario, self.explore.devices) if symmetry else None
        self._interned: dict[Any, Any] = {}
        self._startable: dict[tuple[Any, Any], tuple[tuple[str, Bdf | None, str | None, Plan], ...]] = {}
        self._checked: dict[tuple[Any, Any], tuple[Violation, ...]] = {}
        self._crash_footprints: dict[tuple[Any, ...], frozenset[Any]] = {}
        self._renamings: dict[frozenset[Any], Renaming] = {}
        self._loaded: State | None = None
        self._initial_renaming: Renaming = {}

    # -- state handling ---------------------------------------------------------
    def _tracked(self, replay: Replay) -> frozenset[Bdf] | None:
        """The devices whose ledger records a state holds (None: every device).

        An operation moves the records of the devices it names, of their group mates
        (whole groups, shared requester IDs) and of the devices they share resources
        with; a teardown those its VM holds. The exploration names the devices it
        explores; the set-up may have given a VM others or left operations in flight. No
        other record can change, so no state needs it.
        """
        ledger = self.toolstack.ledger
        named = {
            *self.explore.devices,
            *(b for b, rec in ledger.items() if rec.state is not DeviceState.HOST),  # moved or given a VM
            *(d for cursor in replay.in_flight.values() for d in cursor.plan.devices),
        }
        host = self.scenario.host
        units = {u for d in named if d in host.topology for u in self._unit(d)}
        return frozenset(m for u in units for m in host.group_of(u).members)

    def _unit(self, device: Bdf) -> list[Bdf]:
        """``device`` and the devices it shares a BAR page, an INTx line or firmware
        memory with: an operation on one may move, be stopped by, or (through an
        invariant that compares the two) matter to the others."""
        found = self._units.get(device)
        if found is None:
            host = self.scenario.host
            regions = host.topology[device].reserved_regions
            overlapping = [
                other
                for other, fn in host.topology.items()
                if other != device and any(r.overlaps(t) for r in regions for t in fn.reserved_regions)
            ]
            found = self._units[device] = [
                device,
                *(s.other for s in host.shared_resources(device)),
                *overlapping,
            ]
        return found

    def load(self, state: State) -> None:
        if self._loaded is state:
            return  # still exactly as loaded: nothing has run since
        self.platform.restore(state.platform)
        self.toolstack.restore(state.ledger, self.tracked)
        self._loaded = state

    def capture(self, cursors: Iterable[Cursor], faults: int) -> State:
        """The loaded state as one value. Its parts recur in state after state and are
        interned: the frontier shares them, and the caches keyed by them compare them by
        identity instead of field by field."""
        intern = self._interned.setdefault
        sim = SimSnapshot._make(intern(part, part) for part in self.platform.snapshot())
        ledger = self.toolstack.snapshot(self.tracked)
        flights = frozenset(self._kept(c) for c in cursors)
        return State(intern(sim, sim), intern(ledger, ledger), intern(flights, flights), faults)

    def _shared(self, value: Any) -> Any:
        """``value``, or the equal value met before: caches kept per platform and ledger
        hold the same plans and footprints again and again, parent links the same actions."""
        return self._interned.setdefault(value, value)

    def _kept(self, cursor: Cursor) -> Cursor:
        """The operation in flight as the state keeps it (the messages reduction: a
        failure's words replaced by one word, see the module docstring)."""
        if not self.messages or (cursor.failure is None and not cursor.stuck):
            return cursor
        failure = None if cursor.failure is None else FAILED
        return replace(cursor, failure=failure, stuck=(FAILED,) * len(cursor.stuck))

    # -- transitions -----------------------------------------------------------
    def actions(self, state: State) -> list[Action]:
        """What may happen next (the state must be loaded)."""
        cursors, faults = state.in_flight, state.faults
        out: list[Action] = []
        ops = self.explore.operations
        room = len(cursors) < self.explore.concurrency
        busy = [self._footprint(c.plan) for c in cursors]
        if room:
            out += [
                Action("begin", op, device, vm)
                for op, device, vm, plan in self._startable_plans(state)
                if self._may_start(plan, busy)
            ]
        for cursor in self._advancable(cursors):
            key = key_of(cursor)
            out.append(Action("advance", key=key))
            step = cursor.next_step
            if step is None or step.call not in STEPS:  # only a platform step can fail
                continue
            if self._may_fail_by_itself(step):
                out.append(Action("fail", key=key, free=True))
            elif faults:
                out.append(Action("fail", key=key))
        domains = self.platform.domains()
        if "crash" in ops:
            out += [
                Action("crash", vm=v)
                for v in self.vms
                if domains[v].state is DomainState.RUNNING and self._may_crash(state, v, busy)
            ]
        if "hotplug" in ops and room:
            out += [
                Action("hotplug", device=d)
                for d in self.hotplug
                if not self.platform.present(d)
                and self._parent_present(d)
                and self._may_start(Plan("hotplug", (d,), None, (), None), busy)
            ]
        return out

    def _startable_plans(self, state: State) -> tuple[tuple[str, Bdf | None, str | None, Plan], ...]:
        """The operations the toolstack would start in the loaded ``state``, with their
        plans. Planning reads only the platform and the ledger: each pair is planned once."""
        key = (state.platform, state.ledger)
        found = self._startable.get(key)
        if found is None:
            startable = []
            for op in BEGIN_OPS:
                if op not in self.explore.operations:
                    continue
                for device, vm in self._arguments(op):
                    try:
                        plan = self.toolstack.plan(op, device, vm, with_group=self.explore.whole_groups)
                    except (RefusedError, PlatformMisuse, KeyError):
                        continue
                    startable.append(self._shared((op, device, vm, self._shared(plan))))
            found = self._startable[key] = self._shared(tuple(startable))
        return found

    def _may_fail_by_itself(self, step: Step) -> bool:
        """A reset of a device whose resets may fail fails as often as it likes."""
        return (
            step.call == "reset"
            and step.device is not None
            and self.scenario.host.topology[step.device].reset_may_fail
        )

    def _parent_present(self, device: Bdf) -> bool:
        parent = self.scenario.host.topology[device].parent
        return parent is None or self.platform.present(parent)

    def _may_start(self, plan: Plan, busy: list[frozenset[Any]]) -> bool:
        """With the independence reduction, an operation starts while others are in
        flight only if it touches what one of them touches: the interleavings of
        disjoint operations add no state that matters (see the module docstring)."""
        if not self.independence or not busy:
            return True
        return _overlaps(self._footprint(plan), busy)

    def _may_crash(self, state: State, vm: str, busy: list[frozenset[Any]]) -> bool:
        """A crash is an operation of one step: with the independence reduction it
        happens while others are in flight only if it touches what one of them touches
        (it changes the VM's state alone, which the toolstack reads only for an
        operation naming the VM, and invariants only beside the devices pointing at it)."""
        if not self.independence or not busy:
            return True
        key = (state.platform, state.ledger, vm)
        footprint = self._crash_footprints.get(key)
        if footprint is None:
            plan = Plan("crash", self._pointing_at(vm), vm, (), None)
            footprint = self._crash_footprints[key] = self._shared(self._footprint(plan))
        return _overlaps(footprint, busy)

    def _pointing_at(self, vm: str) -> tuple[Bdf, ...]:
        """The devices the loaded platform or ledger points at ``vm`` from: contexts,
        caches, interrupt entries, exposure, firmware mappings, records."""
        host, sim = self.scenario.host, self.platform.snapshot()
        rids = {
            entry[0]
            for name in POINTER_FIELDS
            for entry in getattr(sim, name)
            if entry[1] == vm or (isinstance(entry[1], (tuple, frozenset)) and vm in entry[1])
        }
        devices = {d for rid in rids for d in host.owner_of_rid(rid)}
        devices |= {bdf for d in sim.domains if d.name == vm for bdf, _ in d.reserved}
        devices |= {
            bdf
            for bdf, rec in self.toolstack.ledger.items()
            if vm in (rec.vm, rec.context, rec.msi, rec.exposed)
        }
        return tuple(sorted(devices))

    def _arguments(self, op: str) -> list[tuple[Bdf | None, str | None]]:
        domains = self.platform.domains()
        if op == "destroy":
            return [(None, v) for v in self.vms if domains[v].state is not DomainState.DESTROYED]
        present = [d for d in self.explore.devices if self.platform.present(d)]
        if op == "assign":
            running = [v for v in self.vms if domains[v].state is DomainState.RUNNING]
            return [(d, v) for d in present for v in running]
        return [(d, None) for d in present]

    def _advancable(self, cursors: frozenset[Cursor]) -> list[Cursor]:
        if len(cursors) < 2:
            return list(cursors)
        ordered = sorted(cursors, key=lambda c: repr(key_of(c)))
        if not self.independence:
            return ordered
        prints = {id(c): self._footprint(c.plan) for c in ordered}
        independent = [
            id(c)
            for c in ordered
            if all(prints[id(c)].isdisjoint(prints[id(o)]) for o in ordered if o is not c)
        ]
        return [c for c in ordered if id(c) not in independent or id(c) == independent[0]]

    def _footprint(self, plan: Plan) -> frozenset[Any]:
        """What an operation touches: its devices' IOMMU groups, its VM, and in scratch
        mode the sink pages its devices reach (the platform may share one page)."""
        host = self.scenario.host
        groups = {host.group_of(u).number for d in plan.devices for u in self._unit(d)}
        pages = (
            {self.platform.scratch_page(r) for d in plan.devices for r in host.requester_ids(d)}
            if self.scenario.quarantine_mode == "scratch"
            else set()
        )
        return frozenset({*groups, *pages, *([plan.vm] if plan.vm else [])})

    def apply(self, state: State, action: Action) -> tuple[State, list[Violation]]:
        """Take ``action`` from ``state``; return the new state and what it breaks."""
        self.load(state)
        self._loaded = None  # the action changes what is loaded
        cursors, faults = state.in_flight, state.faults
        in_flight = {key_of(c): c for c in cursors}
        broken: list[Violation] = []
        try:
            if action.kind == "begin":
                plan = self.toolstack.plan(
                    action.op, action.device, action.vm, with_group=self.explore.whole_groups
                )
                cursor = self.toolstack.begin(plan)
                in_flight[key_of(cursor)] = cursor
            elif action.kind == "hotplug":
                assert action.device is not None
                self.platform.plug(action.device)
                self.toolstack.device_appeared(action.device)
                cursor = self.toolstack.begin(self.toolstack.plan_hotplug(action.device))
                in_flight[key_of(cursor)] = cursor
            elif action.kind == "crash":
                assert action.vm is not None
                self.platform.crash_domain(action.vm)
            else:
                cursor = in_flight.pop(action.key)
                if action.kind == "fail":
                    step = cursor.next_step
                    assert step is not None
                    self.platform.inject(step.call, step.device)
                    faults -= 0 if action.free else 1
                result = self.toolstack.advance(cursor)
                if isinstance(result, Cursor):
                    in_flight[key_of(result)] = result
        except PlatformMisuse as exc:
            broken.append(Violation(PLATFORM_CONTRACT, action.device, str(exc)))
        new = self.capture(in_flight.values(), faults)
        return new, broken

    # -- search ------------------------------------------------------------------
    def successors(self, state: State) -> Iterator[Successor]:
        """Every transition out of ``state``. While one is looked at, the state it reached
        is the one loaded, so ``_check(successor.raw)`` judges it."""
        self.load(state)
        for action in self.actions(state):
            raw, broken = self.apply(state, action)
            canonical, renaming = self._canonical(raw)
            yield Successor(action, raw, canonical, hash(canonical), renaming, bool(broken))

    def link(self, fingerprint: int, step: Successor) -> Parent:
        """Where ``step`` came from, as the search keeps it for every state: the action
        and the renaming are shared with every other link that has them."""
        renaming = self._renamings.setdefault(frozenset(step.renaming.items()), step.renaming)
        return Parent(fingerprint, self._shared(step.action), renaming)

    def start(self) -> tuple[State, list[Violation]]:
        """The initial state as the search stores it, and what it breaks."""
        initial, self._initial_renaming = self._canonical(self.initial)
        self.load(initial)
        return initial, check_all(self.toolstack, self.platform)

    def run(self) -> Result:
        with rare_collections():
            if self.workers > 1:  # one process per core, each owning a share of the states
                from pciguard.verify.partitioned import Forked, run_partitioned

                return run_partitioned(self, Forked, self.workers)
            return self._run()

    def _run(self) -> Result:
        started = time.perf_counter()
        stats = Stats(states=1)
        initial, first = self.start()
        if first:
            return self._done("violation", stats, started, Counterexample([], first))
        root = hash(initial)
        parents: dict[int, Parent | None] = {root: None}
        frontier: deque[tuple[State, int, int]] = deque([(initial, root, 0)])
        next_report = started + 1.0
        while frontier:
            state, fingerprint, depth = frontier.popleft()
            for step in self.successors(state):
                stats.transitions += 1
                if step.misuse:  # the platform caught a misuse: a violation, new state or not
                    trace = self._trace(parents.__getitem__, fingerprint, step.action)
                    return self._violation(stats, started, trace)
                if step.fingerprint in parents:
                    continue
                parents[step.fingerprint] = self.link(fingerprint, step)
                stats.states += 1
                stats.depth = max(stats.depth, depth + 1)
                if self._check(step.raw):
                    return self._violation(stats, started, self._trace(parents.__getitem__, step.fingerprint))
                frontier.append((step.state, step.fingerprint, depth + 1))
            now = time.perf_counter()
            if self.max_states is not None and stats.states >= self.max_states:
                return self._done("incomplete", stats, started, reason=f"--max-states {self.max_states}")
            if self.time_limit is not None and now - started >= self.time_limit:
                return self._done("incomplete", stats, started, reason=f"--time-limit {self.time_limit:g}s")
            if self.on_progress is not None and now >= next_report:
                stats.seconds = now - started
                self.on_progress(stats)
                next_report = now + 0.5
        return self._done("pass", stats, started)

    def replay(self, trace: list[Action]) -> tuple[list[tuple[Any, ...]], list[Violation]]:
        """Run a concrete trace from the initial state. Returns the key of the operation
        each ``begin`` or ``hotplug`` started, in order, and what the last state breaks."""
        state, keys = self.initial, []
        broken: list[Violation] = []
        for action in trace:
            before = {key_of(c) for c in state.in_flight}
            state, broken = self.apply(state, action)
            if action.kind in ("begin", "hotplug"):  # begin claims; no call is taken yet
                (started,) = {key_of(c) for c in state.in_flight} - before
                keys.append(started)
        return keys, broken or check_all(self.toolstack, self.platform)

    def _violation(self, stats: Stats, started: float, trace: list[Action]) -> Result:
        """The counterexample with what its last state breaks, found again by replaying
        the trace on concrete names: the search's own messages name the canonical
        devices and VMs of the symmetry reduction, not those the replay acts on."""
        _, broken = self.replay(trace)
        return self._done("violation", stats, started, Counterexample(trace, broken))

    def _done(
        self,
        verdict: str,
        stats: Stats,
        started: float,
        counterexample: Counterexample | None = None,
        reason: str = "",
    ) -> Result:
        stats.seconds = time.perf_counter() - started
        stats.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return Result(verdict, stats, counterexample, reason)

    def _check(self, state: State) -> list[Violation]:
        """The invariants over the loaded ``state``. They read only the platform and the
        ledger, which many states share (differing in operations in flight or faults
        left): each pair is checked once."""
        key = (state.platform, state.ledger)
        found = self._checked.get(key)
        if found is None:
            found = self._checked[key] = self._shared(tuple(check_all(self.toolstack, self.platform)))
        return list(found)

    def _canonical(self, state: State) -> tuple[State, Renaming]:
        if self.symmetry is None:
            return state, {}
        return self.symmetry.canonical(state)

    def _trace(
        self, parent_of: Callable[[int], Parent | None], last: int, then: Action | None = None
    ) -> list[Action]:
        """The actions from the initial state to ``last`` (and ``then``, taken from it),
        renamed back into concrete names; ``parent_of`` looks up where a state came from."""
        path: list[tuple[Action, Renaming]] = []
        entry = parent_of(last)
        while entry is not None:
            path.append((entry.action, entry.renaming))
            entry = parent_of(entry.fingerprint)
        path.reverse()
        # to_concrete maps the names of the stored (canonical) state to the names the
        # concrete run has; each step's renaming raw -> canonical is undone on the way.
        to_concrete = _then_undo({}, self._initial_renaming)
        concrete: list[Action] = []
        for action, renaming in path:
            concrete.append(rename(action, to_concrete))
            to_concrete = _then_undo(to_concrete, renaming)
        if then is not None:
            concrete.append(rename(then, to_concrete))
        return concrete


def _overlaps(footprint: frozenset[Any], busy: list[frozenset[Any]]) -> bool:
    """Whether ``footprint`` touches what one of the operations in flight touches."""
    return any(not footprint.isdisjoint(other) for other in busy)


@contextmanager
def rare_collections() -> Iterator[None]:
    """The search makes millions of objects that live until it ends, and few cycles: at
    its default thresholds the cycle collector rescans them again and again (10-15% of
    the time). During a search: what exists before it is never scanned (frozen, which
    also spares forked workers copying those pages), young objects every 200,000
    allocations, older ones rarely."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(200_000, 100, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _then_undo(to_concrete: Renaming, renaming: Renaming) -> Renaming:
    """x -> to_concrete(renaming^-1(x)), as a dict (absent keys map to themselves)."""
    inverse = {canonical: raw for raw, canonical in renaming.items()}
    names = set(inverse) | set(to_concrete)
    composed = {x: to_concrete.get(inverse.get(x, x), inverse.get(x, x)) for x in names}
    return {x: y for x, y in composed.items() if x != y}


# -- symmetry ---------------------------------------------------------------------------
def rename(value: Any, mapping: Renaming) -> Any:
    """``value`` with every BDF and VM name in ``mapping`` replaced, however deep."""
    if not mapping:
        return value
    if isinstance(value, (Bdf, str)):
        return mapping.get(value, value)
    if isinstance(value, tuple):
        items = tuple(rename(v, mapping) for v in value)
        return value._make(items) if hasattr(value, "_make") else items  # named tuples stay named
    if isinstance(value, frozenset):
        return frozenset(rename(v, mapping) for v in value)
    if isinstance(value, (Cursor, Plan, Step, Action, Decision)) and is_dataclass(value):
        changes = {f.name: rename(getattr(value, f.name), mapping) for f in fields(value)}
        return replace(value, **changes)
    return value


@dataclass
class Symmetry:
    """Classes of interchangeable devices and VMs, and the canonical renaming of a state."""

    scenario: Scenario
    devices: tuple[Bdf, ...]
    device_classes: list[list[Bdf]] = field(default_factory=list)
    vm_classes: list[list[str]] = field(default_factory=list)
    _memo: dict[frozenset[Any], dict[Any, Any]] = field(default_factory=dict)
    _vm_memo: dict[tuple[Any, ...], str] = field(default_factory=dict)
    _part_memo: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes: dict[Any, list[Bdf]] = {}
        for d in self.devices:
            shape = self._shape(d)
            if shape is not None:
                shapes.setdefault(shape, []).append(d)
        self.device_classes = [sorted(c) for c in shapes.values() if len(c) > 1]
        by_context: dict[bool, list[str]] = {}
        for name, iommu in self.scenario.vms:
            by_context.setdefault(iommu, []).append(name)
        self.vm_classes = [sorted(c) for c in by_context.values() if len(c) > 1]

    def _shape(self, d: Bdf) -> Any:
        """What makes devices interchangeable; None if ``d`` can only be itself."""
        host = self.scenario.host
        fn = host.topology[d]
        group = [m for m in host.group_of(d).members if not host.topology[m].kind.is_bridge]
        if group != [d] or host.requester_ids(d) != {d} or fn.physfn or host.topology.virtual_functions(d):
            return None
        ports = tuple(
            (p.kind, p.acs.isolates() if p.acs else False, p.external, p.driver is not None)
            for p in host.topology.path_to_root(d)
        )
        unit = host.iommu_of(d)
        return (
            fn.kind,
            fn.ids,
            fn.driver is not None,
            fn.reset_methods,
            fn.reset_may_fail,
            fn.ats,
            fn.reserved_regions,
            fn.host_critical,
            d in host.hotplug_later,
            ports,
            unit.name if unit else None,
            host.msi_isolated(d),
            len(host.group_of(d).members),
        )

    @property
    def active(self) -> bool:
        return bool(self.device_classes or self.vm_classes)

    def canonical(self, state: State) -> tuple[State, Renaming]:
        if not self.active:
            return state, {}
        placeholder = {vm: "·" for c in self.vm_classes for vm in c}
        renaming: Renaming = {}
        for vms in self.vm_classes:
            by_vm = sorted(vms, key=lambda vm: self._vm_signature(state, vm, placeholder))
            renaming.update({raw: canon for raw, canon in zip(by_vm, vms, strict=True) if raw != canon})
        for devices in self.device_classes:
            by_dev = sorted(devices, key=lambda d: self._device_signature(state, d, renaming))
            renaming.update({raw: canon for raw, canon in zip(by_dev, devices, strict=True) if raw != canon})
        if not renaming:
            return state, {}
        # ``rename``, remembered: the same parts recur in state after state.
        memo = self._memo.setdefault(frozenset(renaming.items()), {})

        def renamed(value: Any) -> Any:
            found = memo.get(value)
            if found is None:
                found = memo[value] = rename(value, renaming)
            return found

        ledger = state.ledger
        return State(
            SimSnapshot._make(renamed(part) for part in state.platform),
            LedgerSnapshot(frozenset(renamed(entry) for entry in ledger.records), renamed(ledger.torn_down)),
            frozenset(renamed(c) for c in state.in_flight),
            state.faults,
        ), renaming

    def _device_signature(self, state: State, d: Bdf, names: Renaming) -> str:
        """Everything about ``d`` in ``state``, with device names erased ("self" for
        ``d``, "other" for the rest of its class) and VM names mapped by ``names``."""
        erase: Renaming = names | {o: "other" for c in self.device_classes for o in c} | {d: "self"}
        local = [sorted(repr(rename(e, erase)) for e in self._mentioning(part, d)) for part in state.platform]
        record = [rename(rec, erase) for bdf, rec in state.ledger.records if bdf == d]
        flights = sorted(
            repr(
                (
                    c.plan.operation,
                    c.phase.value,
                    c.index,
                    names.get(c.plan.vm, c.plan.vm),
                    c.plan.devices.index(d),
                )
            )
            for c in state.in_flight
            if d in c.plan.devices
        )
        return repr((local, record, flights))

    def _mentioning(self, part: frozenset[Any], d: Bdf) -> tuple[Any, ...]:
        """The entries of a state part that name ``d`` (parts recur: remembered)."""
        key = (part, d)
        found = self._part_memo.get(key)
        if found is None:
            found = self._part_memo[key] = tuple(e for e in part if _mentions(e, d))
        return found

    def _vm_signature(self, state: State, vm: str, placeholder: Renaming) -> tuple[str, str, str]:
        """Everything that points at ``vm``, with VM names erased. Each part is remembered
        by the state parts it comes from: they recur in state after state."""
        sim, ledger, cursors = state.platform, state.ledger, state.in_flight
        memo = self._vm_memo
        key: tuple[Any, ...] = (sim.domains, vm)
        domain = memo.get(key)
        if domain is None:
            domain = memo[key] = repr([d[1:] for d in sim.domains if d.name == vm])
        parts = [getattr(sim, name) for name in POINTER_FIELDS]
        key = (*parts, ledger, vm)  # parts are interned: cheap keys
        pointers = memo.get(key)
        if pointers is None:
            # entries (BDF or page, domain or domains) that name the VM
            entries = sorted(
                repr((i, rename(e, placeholder)))
                for i, part in enumerate(parts)
                for e in part
                if e[1] == vm or (isinstance(e[1], (tuple, frozenset)) and vm in e[1])
            )
            records = sorted(
                repr((b, rename(rec, placeholder)))
                for b, rec in ledger.records
                if vm in (rec.vm, rec.context, rec.msi, rec.exposed)
            )
            pointers = memo[key] = repr((entries, records, vm in ledger.torn_down))
        key = (cursors, vm)
        flights = memo.get(key)
        if flights is None:
            flights = memo[key] = repr(
                sorted(
                    repr((c.plan.operation, c.plan.devices, c.phase.value, c.index))
                    for c in cursors
                    if c.plan.vm == vm
                )
            )
        return (domain, pointers, flights)


def _mentions(entry: Any, d: Bdf) -> bool:
    if entry == d:
        return True
    if isinstance(entry, tuple):
        return any(_mentions(e, d) for e in entry)
    if isinstance(entry, frozenset):
        return any(_mentions(e, d) for e in entry)
    return False
