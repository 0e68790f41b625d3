"""Breadth-first exploration of every interleaving of toolstack operations (one platform
call at a time), injected failures, VM crashes and hot-plug arrivals, running the real
toolstack on the simulated platform and checking every invariant in every state.

A state is the platform's snapshot, the ledger's snapshot, the operations in flight
(``Cursor`` values) and the faults left to inject. States are deduplicated by a
fingerprint (their hash); each remembers its parent's fingerprint and the action that
led to it, so the first violation found comes with a shortest trace.

A transition seen before, by the cells of the platform and the ledger it read, is not
run again: its outcome is applied (``memo``; exact, switchable, checked against runs by
the tests).

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
  are one;
- **budget**: two states that differ only in the faults left to inject are alike but
  for one choice, a failure, which the one with more left has and the other may not:
  whatever the other does, it does in as many steps, reaching the same platforms and
  ledgers. So a state is left out when its twin with more faults left is reached at
  the same depth or before (``_spared``): every pair the invariants judge is still
  reached, at the same depth, and a violation with a trace as short.
"""

from __future__ import annotations

import gc
import resource
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from mypy_extensions import mypyc_attr

from pciguard.errors import PlatformMisuse, RefusedError, Undetermined
from pciguard.formats.scenario_file import PARTIAL_OPS, Exploration, Scenario
from pciguard.model import Bdf
from pciguard.model.ownership import State as DeviceState
from pciguard.platforms.base import STEPS, DomainState
from pciguard.platforms.sim import POINTER_FIELDS, SimSnapshot
from pciguard.policy import Decision
from pciguard.simulate import Replay, build
from pciguard.toolstack import Cursor, LedgerSnapshot, Plan, Step
from pciguard.verify.invariants import (
    PLATFORM_CONTRACT,
    Unit,
    Violation,
    check_all,
    check_unit,
    guests_of,
    in_order,
    units,
)
from pciguard.verify.memo import Cell, Lens, Log, Memo, Outcome, parts, watching

if TYPE_CHECKING:  # partitioned imports this module
    from pciguard.verify.partitioned import Handover

BEGIN_OPS = tuple(op for op in PARTIAL_OPS if op != "hotplug")  # hot-plugs arrive, not start
FAILED = "a step failed"  # a failure's words, as the messages reduction keeps them

Renaming = dict[Any, Any]
NO_RENAMING: Renaming = {}  # one object for the many states already canonical; never changed
#: Bounds on what a search keeps besides its states (``Explorer._trim``): about 800 MiB
#: of caches, and about 200 MiB of remembered outcomes.
CACHE_ENTRIES = 1_000_000
MEMO_READS = 2_000_000


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
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:  # actions key caches: hashed once
        object.__setattr__(
            self, "_hash", hash((self.kind, self.op, self.device, self.vm, self.key, self.free))
        )

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:  # compiled, the default would set frozen fields
        return Action, (self.kind, self.op, self.device, self.vm, self.key, self.free)

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


class State(NamedTuple):
    """One state of the search."""

    platform: SimSnapshot
    ledger: LedgerSnapshot
    in_flight: frozenset[Cursor]
    faults: int  # failures left to inject


class Verdict(NamedTuple):
    """What a platform-and-ledger pair breaks, and what judged each of its units."""

    violations: tuple[Violation, ...]
    judged: list[tuple[str, Unit]] | None  # the units, as the memo knows them
    outcomes: tuple[Outcome, ...]  # per unit: its verdict and the cells it read


class Choice(NamedTuple):
    """Something that may start, with what it touches."""

    action: Action
    footprint: frozenset[Any]


class Moves(NamedTuple):
    """What the operations in flight touch, and their next calls (made or failing)."""

    busy: list[frozenset[Any]]
    actions: tuple[Action, ...]


class Chances(NamedTuple):
    """The crashes and hot-plugs that may happen in a platform-and-ledger pair."""

    crashes: tuple[Choice, ...]
    hotplugs: tuple[Choice, ...]


class Successor(NamedTuple):
    """One transition out of a state, as the search sees it."""

    action: Action
    raw: State  # as the toolstack left it
    state: State  # canonical: what the search stores
    fingerprint: int
    renaming: Renaming  # raw -> canonical names
    misuse: bool  # the platform refused a call: a violation, new state or not


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
    workers: int = 1  # the processes that explored: 1, or the workers once handed over

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


@mypyc_attr(allow_interpreted_subclasses=True)  # tests and partitions refine it
class Explorer:
    #: Bounds a long search keeps its caches and remembered outcomes within.
    cache_entries = CACHE_ENTRIES
    memo_reads = MEMO_READS

    def __init__(
        self,
        scenario: Scenario,
        *,
        symmetry: bool = True,
        independence: bool = True,
        messages: bool = True,
        budget: bool = True,
        max_states: int | None = None,
        time_limit: float | None = None,
        workers: int = 1,
        hand_over_after: float | None = None,
        memo: bool = True,
        check_memo: bool = False,
        on_progress: Callable[[Stats], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.explore = scenario.explore or Exploration(devices=(), operations=())
        self.independence = independence
        self.messages = messages
        self.budget = budget
        self.max_states = max_states
        self.time_limit = time_limit
        self.workers = workers
        # With workers: start in this process, and hand over to them at the end of the
        # first level past so many seconds (None: the workers search from the start).
        self.hand_over_after = hand_over_after
        self.memo = Memo() if memo else None
        self.check_memo = check_memo
        self.on_progress = on_progress
        self.platform, self.toolstack = build(scenario)
        self._units: dict[Bdf, list[Bdf]] = {}
        replay = Replay(self.platform, self.toolstack)
        for step in scenario.steps:  # the set-up the exploration starts from
            replay.apply(step)
        self.tracked = self._tracked(replay)
        self._interned: dict[Any, Any] = {}
        self.initial = State(
            self.platform.snapshot(),
            self.toolstack.snapshot(self.tracked),
            frozenset(self._kept(c) for c in replay.in_flight.values()),
            self.explore.faults,
        )
        self.vms = tuple(name for name, _ in scenario.vms)
        self.hotplug = tuple(d for d in self.explore.devices if d in scenario.host.hotplug_later)
        self.symmetry = Symmetry(scenario, self.explore.devices, self._shared) if symmetry else None
        self._startable: dict[tuple[Any, Any], tuple[Choice, ...]] = {}
        self._checked: dict[tuple[Any, Any], Verdict] = {}
        self._judged_with: dict[frozenset[Any], tuple[Any, Any]] = {}  # records -> a pair judged
        self._canonicals: dict[State, tuple[State, int, Renaming]] = {}
        self._judged: dict[frozenset[str], list[tuple[str, Unit]]] = {}
        self._chanced: dict[tuple[Any, Any], Chances] = {}
        self._moved: dict[tuple[frozenset[Cursor], bool], Moves] = {}
        self._cursors: dict[int, Cursor] = {}
        self._alone_memo: dict[int, frozenset[Cursor]] = {}
        self._signatures: dict[tuple[frozenset[Cursor], Action], tuple[Action, int]] = {}
        self._pointer_memo: dict[tuple[str, frozenset[Any], str], frozenset[Bdf]] = {}
        self._footprints: dict[tuple[tuple[Bdf, ...], str | None], frozenset[Any]] = {}
        self._crashes = {vm: Action("crash", vm=vm) for vm in self.vms}
        self._hotplugs = {d: Action("hotplug", device=d) for d in self.hotplug}
        self._expanded = 0
        self._trims = 0  # how often the caches were cleared
        self._flights: dict[tuple[Any, ...], tuple[frozenset[Cursor], Cursor | None, frozenset[Cursor]]] = {}
        self._loaded: State | None = None
        self._last_lens: tuple[Any, Any, Lens] = (None, None, [])
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
        """The loaded state, with ``cursors`` in flight (as ``_kept`` made them), as one
        value. Its parts recur in state after state and are interned: the frontier
        shares them, and the caches keyed by them compare them by identity instead of
        field by field."""
        intern = self._interned.setdefault
        sim = SimSnapshot._make(intern(part, part) for part in self.platform.snapshot())
        ledger = self.toolstack.snapshot(self.tracked)
        flights = frozenset(cursors)
        return State(intern(sim, sim), intern(ledger, ledger), intern(flights, flights), faults)

    def _shared(self, value: Any) -> Any:
        """``value``, or the equal value met before: caches kept per platform and ledger
        hold the same plans and footprints again and again."""
        return self._interned.setdefault(value, value)

    def _kept(self, cursor: Cursor) -> Cursor:
        """The operation in flight as the state keeps it (the messages reduction: a
        failure's words replaced by one word, see the module docstring), as the one
        object equal cursors share: hashing or comparing a cursor walks its whole plan
        (microseconds), so states and caches hold cursors told apart by identity."""
        if self.messages and (cursor.failure is not None or cursor.stuck):
            failure = None if cursor.failure is None else FAILED
            cursor = replace(cursor, failure=failure, stuck=(FAILED,) * len(cursor.stuck))
        shared: Cursor = self._shared(cursor)
        return shared

    def _alone(self, cursor: Cursor) -> frozenset[Cursor]:
        """A set of ``cursor`` alone, made once per cursor: a set of cursors made from
        others with it (union, difference) reuses the hashes they hold."""
        found = self._alone_memo.get(id(cursor))
        if found is None:  # the set holds the cursor: its id stays its own
            found = self._alone_memo[id(cursor)] = frozenset((cursor,))
        return found

    # -- transitions -----------------------------------------------------------
    def actions(self, state: State) -> list[Action]:
        """What may happen next."""
        chances = self._chances(state)
        busy, moves = self._moves(state.in_flight, state.faults > 0)
        room = len(state.in_flight) < self.explore.concurrency
        begins = self._begins(state) if room else ()
        hotplugs = chances.hotplugs if room else ()
        if self.independence and busy:
            # What starts (an operation, a crash, a hot-plug) while others are in flight
            # must touch what one of them touches (the module docstring).
            return [
                *(action for action, footprint in begins if _overlaps(footprint, busy)),
                *moves,
                *(action for action, footprint in chances.crashes if _overlaps(footprint, busy)),
                *(action for action, footprint in hotplugs if _overlaps(footprint, busy)),
            ]
        return [
            *(action for action, _ in begins),
            *moves,
            *(action for action, _ in chances.crashes),
            *(action for action, _ in hotplugs),
        ]

    def _begins(self, state: State) -> tuple[Choice, ...]:
        """The operations the toolstack would start in ``state``'s platform and ledger,
        with their footprints. Planning reads only those: each pair is planned once."""
        key = (state.platform, state.ledger)
        found = self._startable.get(key)
        if found is None:
            startable = []
            for op in BEGIN_OPS:
                if op not in self.explore.operations:
                    continue
                for device, vm in self._arguments(state, op):
                    footprint = self._planned(state, op, device, vm)
                    if footprint is not None:
                        startable.append(self._shared(Choice(Action("begin", op, device, vm), footprint)))
            found = self._startable[key] = self._shared(tuple(startable))
        return found

    def _planned(self, state: State, op: str, device: Bdf | None, vm: str | None) -> frozenset[Any] | None:
        """The footprint of the toolstack's plan for ``op`` in ``state``, or None if it
        refuses. A plan made once is not made again for a state that agrees with the
        first on what planning read (see ``memo``)."""
        signature = ("plan", op, device, vm)
        if self.memo is not None:
            outcome = self.memo.find(signature, self._lens(state))
            if outcome is not None:
                footprint: frozenset[Any] | None = outcome.result
                return footprint
        self.load(state)
        log = Log()
        try:
            with nullcontext() if self.memo is None else watching(self.platform, self.toolstack, log):
                plan = self.toolstack.plan(op, device, vm, with_group=self.explore.whole_groups)
            footprint = self._shared(self._footprint(plan))
        except (RefusedError, PlatformMisuse, KeyError):
            footprint = None
        if self.memo is not None:
            self.memo.store(signature, log, self._lens(state), None, footprint)
        return footprint

    def _chances(self, state: State) -> Chances:
        """The crashes and hot-plugs that may happen in ``state``'s platform and ledger,
        whatever is in flight, with their footprints (each pair looked at once)."""
        key = (state.platform, state.ledger)
        found = self._chanced.get(key)
        if found is None:
            sim, ops = state.platform, self.explore.operations
            crashes: tuple[Choice, ...] = ()
            if "crash" in ops:
                running = {d.name for d in sim.domains if d.state is DomainState.RUNNING}
                crashes = tuple(
                    Choice(self._crashes[v], self._crash_footprint(state, v))
                    for v in self.vms
                    if v in running
                )
            hotplugs: tuple[Choice, ...] = ()
            if "hotplug" in ops:
                parents = {d: self.scenario.host.topology[d].parent for d in self.hotplug}
                hotplugs = tuple(
                    Choice(self._hotplugs[d], self._footprint(Plan("hotplug", (d,), None, (), None)))
                    for d in self.hotplug
                    if d not in sim.present and (parents[d] is None or parents[d] in sim.present)
                )
            found = self._chanced[key] = self._shared(
                Chances(tuple(map(self._shared, crashes)), tuple(map(self._shared, hotplugs)))
            )
        return found

    def _moves(
        self, cursors: frozenset[Cursor], may_inject: bool
    ) -> tuple[list[frozenset[Any]], tuple[Action, ...]]:
        """The footprints of the operations in flight, and their next calls (made or
        failing): they depend on the cursors alone."""
        key = (cursors, may_inject)
        found = self._moved.get(key)
        if found is None:
            moves: list[Action] = []
            for cursor in self._advancable(cursors):
                key_ = key_of(cursor)
                moves.append(Action("advance", key=key_))
                step = cursor.next_step
                if step is None or step.call not in STEPS:  # only a platform step can fail
                    continue
                if self._may_fail_by_itself(step):
                    moves.append(Action("fail", key=key_, free=True))
                elif may_inject:
                    moves.append(Action("fail", key=key_))
            busy = [self._footprint(c.plan) for c in cursors]
            found = self._moved[key] = Moves(busy, tuple(map(self._shared, moves)))
        return found

    def _may_fail_by_itself(self, step: Step) -> bool:
        """A reset of a device whose resets may fail fails as often as it likes."""
        return (
            step.call == "reset"
            and step.device is not None
            and self.scenario.host.topology[step.device].reset_may_fail
        )

    def _crash_footprint(self, state: State, vm: str) -> frozenset[Any]:
        """A crash is an operation of one step: its footprint is the VM and the devices
        pointing at it (it changes the VM's state alone, which the toolstack reads only
        for an operation naming the VM, and invariants only beside those devices)."""
        plan = Plan("crash", self._pointing_at(state, vm), vm, (), None)
        footprint: frozenset[Any] = self._shared(self._footprint(plan))
        return footprint

    def _pointing_at(self, state: State, vm: str) -> tuple[Bdf, ...]:
        """The devices ``state``'s platform or ledger points at ``vm`` from: contexts,
        caches, interrupt entries, exposure, firmware mappings, records (those the state
        leaves out belong to no VM)."""
        sim = state.platform
        devices = {d for name in POINTER_FIELDS for d in self._pointers(name, getattr(sim, name), vm)}
        devices |= {bdf for d in sim.domains if d.name == vm for bdf, _ in d.reserved}
        devices |= self._pointers("records", state.ledger.records, vm)
        return tuple(sorted(devices))

    def _pointers(self, name: str, part: frozenset[Any], vm: str) -> frozenset[Bdf]:
        """The devices whose entries in one part (a ``POINTER_FIELDS`` table, or the
        ledger's "records") point at ``vm``, remembered by the part: a new state changes
        a few parts and keeps the rest."""
        key = (name, part, vm)
        found = self._pointer_memo.get(key)
        if found is None:
            if name == "records":
                found = frozenset(bdf for bdf, rec in part if _record_names(rec, vm))
            else:
                host = self.scenario.host
                found = frozenset(d for rid, held in part if _names(held, vm) for d in host.owner_of_rid(rid))
            self._pointer_memo[key] = found
        return found

    def _arguments(self, state: State, op: str) -> list[tuple[Bdf | None, str | None]]:
        sim = state.platform
        domains = {d.name: d.state for d in sim.domains}
        if op == "destroy":
            return [(None, v) for v in self.vms if domains[v] is not DomainState.DESTROYED]
        present = [d for d in self.explore.devices if d in sim.present]
        if op == "assign":
            running = [v for v in self.vms if domains[v] is DomainState.RUNNING]
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
        mode the sink pages its devices reach (the platform may share one page). All
        are the host's and the platform's make, not state: remembered by devices and VM."""
        key = (plan.devices, plan.vm)
        found = self._footprints.get(key)
        if found is None:
            host = self.scenario.host
            groups = {host.group_of(u).number for d in plan.devices for u in self._unit(d)}
            pages = (
                {self.platform.scratch_page(r) for d in plan.devices for r in host.requester_ids(d)}
                if self.scenario.quarantine_mode == "scratch"
                else set()
            )
            found = self._footprints[key] = frozenset({*groups, *pages, *([plan.vm] if plan.vm else [])})
        return found

    def apply(self, state: State, action: Action) -> tuple[State, list[Violation]]:
        """Take ``action`` from ``state``; return the new state and what it breaks."""
        new, broken, _ = self._run_action(state, action)
        return new, broken

    def _run_action(
        self, state: State, action: Action, log: Log | None = None
    ) -> tuple[State, list[Violation], Cursor | None]:
        """Run ``action`` from ``state`` on the real toolstack and platform (seen through
        ``log``, if given); return the new state, what it breaks, and the cursor the
        action left in flight (None if its operation ended, or for a crash)."""
        self.load(state)
        self._loaded = None  # the action changes what is loaded
        cursors, faults = state.in_flight, state.faults
        in_flight = {key_of(c): c for c in cursors}
        broken: list[Violation] = []
        result: Cursor | None = None
        try:
            with nullcontext() if log is None else watching(self.platform, self.toolstack, log):
                if action.kind == "begin":
                    plan = self.toolstack.plan(
                        action.op, action.device, action.vm, with_group=self.explore.whole_groups
                    )
                    result = self.toolstack.begin(plan)
                elif action.kind == "hotplug":
                    assert action.device is not None
                    self.platform.plug(action.device)
                    self.toolstack.device_appeared(action.device)
                    result = self.toolstack.begin(self.toolstack.plan_hotplug(action.device))
                elif action.kind == "crash":
                    assert action.vm is not None
                    self.platform.crash_domain(action.vm)
                else:
                    cursor = in_flight.pop(action.key)
                    if action.kind == "fail":
                        step = cursor.next_step
                        assert step is not None
                        self.platform.inject(step.call, step.device)
                        faults -= _faults_spent(action)
                    advanced = self.toolstack.advance(cursor)
                    result = advanced if isinstance(advanced, Cursor) else None
        except PlatformMisuse as exc:
            broken.append(Violation(PLATFORM_CONTRACT, action.device, str(exc)))
        if result is not None:
            result = self._kept(result)
            in_flight[key_of(result)] = result
        new = self.capture(in_flight.values(), faults)
        # What a restore of ``new`` would leave differs only in what no step reads
        # (the spent fault rule, the call log, the toolstack's notes): cleared, ``new``
        # counts as loaded.
        self.platform.faults.clear()
        self.platform.log.clear()
        self.toolstack.notes.clear()
        self._loaded = new
        return new, broken, result

    # -- search ------------------------------------------------------------------
    def successors(self, state: State) -> Iterator[Successor]:
        """Every transition out of ``state``."""
        self._expanded += 1
        if not self._expanded % 1024:
            self._trim()
        for action in self.actions(state):
            raw, misuse = self._successor(state, action)
            known = self._canonicals.get(raw)  # states are often reached again as they were
            if known is None:
                canonical, renaming = self._canonical(raw)
                known = self._canonicals[raw] = (canonical, hash(canonical), renaming)
            yield Successor(action, raw, *known, misuse)

    def _trim(self) -> None:
        """Keep the caches within a bound: past it, what may be computed again is
        cleared (so a long search's memory goes to its states), and past another the
        remembered outcomes are forgotten and found again by running. The cycle
        collector runs at the first clearing, the fourth, the sixteenth...: a search
        makes almost no cycles, and a pass over the caches it has just filled is a
        twentieth of the time between clearings."""
        if len(self._canonicals) > self.cache_entries // 4:
            # The largest and least reused (a fifth of its lookups hit): alone, early.
            self._canonicals.clear()
        caches = [
            self._canonicals,
            self._checked,
            self._judged_with,
            self._chanced,
            self._startable,
            self._moved,
            self._flights,
            self._alone_memo,
            self._pointer_memo,
            self._footprints,
            self._signatures,
            *(self.symmetry.caches() if self.symmetry else ()),
            *(self.memo.caches() if self.memo else ()),
        ]
        if sum(map(len, caches)) > self.cache_entries:
            for cache in caches:
                cache.clear()
            self._trims += 1
            if not self._trims & (self._trims - 1) and self._trims.bit_length() % 2:  # 1, 4, 16...
                collect_cycles()
        if self.memo is not None and self.memo.size > self.memo_reads:
            self.memo.reset()
            self._last_lens = (None, None, [])  # the ids it holds were the forgotten values'

    def _successor(self, state: State, action: Action) -> tuple[State, bool]:
        """The state ``action`` leads to from ``state``, and whether the platform refused a
        call on the way. A run whose reads another run agreed with is not run again (see
        ``memo``); with ``check_memo``, it is, and the two must agree."""
        if self.memo is None:
            new, broken = self.apply(state, action)
            return new, bool(broken)
        signature = self._signature(state, action)
        outcome = self.memo.find(signature, self._lens(state))
        if outcome is None:
            log = Log()
            new, broken, result = self._run_action(state, action, log)
            if not broken:  # a misuse is a violation: the search stops there
                self.memo.store(signature, log, self._lens(state), parts(new.platform, new.ledger), result)
            return new, bool(broken)
        after = self.memo.after(parts(state.platform, state.ledger), outcome, self._shared)
        moved = action.key if action.kind in ("advance", "fail") else None
        new = State(
            self._shared(SimSnapshot._make(after[: len(SimSnapshot._fields)])),
            self._shared(LedgerSnapshot(after[-2], after[-1])),
            self._flights_after(state.in_flight, moved, outcome.result),
            state.faults - _faults_spent(action),
        )
        if self.check_memo:
            real, broken = self.apply(state, action)
            if broken or real != new:
                raise Undetermined(f"{action}: the remembered outcome differs from a run")
        return new, False

    def _lens(self, state: State) -> Lens:
        """The memo's lens on ``state``'s platform and ledger (the last one is kept:
        every action of a state, and its judgement, look through the same)."""
        assert self.memo is not None
        platform, ledger, lens = self._last_lens
        if platform is not state.platform or ledger is not state.ledger:
            lens = self.memo.lens(state.platform, state.ledger)
            self._last_lens = (state.platform, state.ledger, lens)
        return lens

    def _flights_after(
        self, in_flight: frozenset[Cursor], moved: tuple[Any, ...] | None, result: Cursor | None
    ) -> frozenset[Cursor]:
        """``in_flight`` without the operation ``moved`` and with ``result`` (in place of
        the operation with its key); remembered by identity (the entry holds both, so
        their ids stay theirs). Made by set operations on the cursors' sets of one,
        which keep the hashes the sets hold: hashing a cursor again costs more than a
        transition's other work."""
        key = (id(in_flight), moved, id(result))
        found = self._flights.get(key)
        if found is None or found[0] is not in_flight or found[1] is not result:
            replaced = None if result is None else key_of(result)
            cursors = in_flight
            for cursor in in_flight:
                if key_of(cursor) in (moved, replaced):
                    cursors = cursors - self._alone(cursor)
            if result is not None:
                cursors = cursors | self._alone(result)
            found = self._flights[key] = (in_flight, result, self._shared(cursors))
        return found[2]

    def _signature(self, state: State, action: Action) -> Any:
        """What a run of ``action`` depends on besides the tables: the action, and the
        operation it advances (by identity: the states' cursors are the one object
        equal cursors share, ``_kept``; another object would only make another key)."""
        if action.kind not in ("advance", "fail"):
            return action
        key = (state.in_flight, action)
        found = self._signatures.get(key)
        if found is None:
            (cursor,) = (c for c in state.in_flight if key_of(c) == action.key)
            self._cursors[id(cursor)] = cursor  # kept alive: its id stays its own
            found = self._signatures[key] = (action, id(cursor))
        return found

    def start(self) -> tuple[State, list[Violation]]:
        """The initial state as the search stores it, and what it breaks."""
        initial, self._initial_renaming = self._canonical(self.initial)
        self.load(initial)
        return initial, check_all(self.toolstack, self.platform)

    def run(self) -> Result:
        with rare_collections():
            if self.workers > 1 and self.hand_over_after is None:  # one process per core
                return self._with_workers()
            return self._run()

    def _with_workers(self, handover: Handover | None = None) -> Result:
        """The search by the workers, from the start or from where ``_run`` hands over
        (forked: each worker starts with what this process learnt, its caches and
        remembered outcomes)."""
        from pciguard.verify.partitioned import Forked, run_partitioned

        return run_partitioned(self, Forked, self.workers, handover)

    def _run(self) -> Result:
        started = time.perf_counter()
        stats = Stats(states=1)
        initial, first = self.start()
        if first:
            return self._done("violation", stats, started, Counterexample([], first))
        root = hash(initial)
        # Each state's fingerprint, and the fingerprint of the state it was first reached
        # from (the same integer object as that state's key: no memory of its own).
        parents: dict[int, int | None] = {root: None}
        frontier: deque[tuple[State, int, int]] = deque([(initial, root, 0)])
        depth = 0
        next_report = started + 1.0
        hand_over_at = (
            None if self.workers < 2 or self.hand_over_after is None else started + self.hand_over_after
        )
        while frontier:
            if frontier[0][2] > depth:  # the frontier is one whole level
                spared = self._unspared(((s, f) for s, f, _ in frontier), parents) if self.budget else set()
                if spared:
                    frontier = deque(waiting for waiting in frontier if waiting[1] not in spared)
                    stats.states -= len(spared)
                    if not frontier:  # the whole level was spared
                        stats.depth = depth
                        break
                if hand_over_at is not None and time.perf_counter() >= hand_over_at:
                    # The workers' search goes level by level.
                    from pciguard.verify.partitioned import Handover

                    level = [(s, f) for s, f, _ in frontier]
                    return self._with_workers(Handover(level, parents, stats, started))
            state, fingerprint, depth = frontier.popleft()
            for step in self.successors(state):
                stats.transitions += 1
                if step.misuse:  # the platform caught a misuse: a violation, new state or not
                    trace = self._trace(parents.__getitem__, fingerprint, step.action)
                    return self._violation(stats, started, trace)
                if step.fingerprint in parents or self._spared(step.state, parents):
                    continue
                parents[step.fingerprint] = fingerprint
                stats.states += 1
                stats.depth = max(stats.depth, depth + 1)
                if self._check(step.state, state):
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

    def _spared(self, state: State, *known: dict[int, int | None]) -> bool:
        """Whether ``state``'s twin with more faults left (the same but for them) is
        among the ``known`` states (the budget reduction; the module docstring). The
        canonical renaming does not read the faults left: twins are canonical alike."""
        if not self.budget:
            return False
        for more in range(state.faults + 1, self.explore.faults + 1):
            twin = hash((state.platform, state.ledger, state.in_flight, more))  # as a State would
            for states in known:
                if twin in states:
                    return True
        return False

    def _unspared(self, level: Iterable[tuple[State, int]], parents: dict[int, int | None]) -> set[int]:
        """The fingerprints of a whole level's states whose twin with more faults left
        came later in it (those with one before were never kept), taken out of
        ``parents``: which states a level keeps does not depend on the order they were
        reached in, so one process and the workers keep the same."""
        spared = {fingerprint for state, fingerprint in level if self._spared(state, parents)}
        for fingerprint in spared:
            del parents[fingerprint]
        return spared

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

    def _check(self, state: State, before: State | None = None) -> list[Violation]:
        """The invariants over ``state`` (reached from ``before``, if given). They read
        only the platform and the ledger, which many states share (differing in
        operations in flight or faults left): each pair is checked once."""
        key = (state.platform, state.ledger)
        found = self._checked.get(key)
        if found is None:
            found = self._checked[key] = self._judge(state, before)
        return list(found.violations)

    def _judge(self, state: State, before: State | None = None) -> Verdict:
        """The invariants over ``state``, unit by unit (a device, a group, a guest): a
        unit's verdict is remembered by the cells it read, like a transition's outcome,
        and the state is restored only to judge a unit no state agreeing with it had.
        A unit whose cells all have the values they had in a pair judged already
        (``before``'s, or one with the same records: ``_judged_beside``) keeps the
        verdict it had there."""
        if self.memo is None:
            self.load(state)
            return Verdict(self._shared(tuple(check_all(self.toolstack, self.platform))), None, ())
        names = frozenset(d.name for d in state.platform.domains)
        judged = self._judged.get(names)
        if judged is None:
            judged = self._judged[names] = [
                ("judge", unit) for unit in units(self.platform, guests_of(names))
            ]
        lens = self._lens(state)
        kept: tuple[Outcome, ...] = ()
        changed: set[Cell] = set()
        for pair in self._judged_beside(state, before):
            earlier = self._checked.get(pair)
            if earlier is not None and earlier.judged is judged:
                kept = earlier.outcomes
                changed = self.memo.differ(self.memo.lens(*pair), lens)
                break
        self._judged_with[state.ledger.records] = (state.platform, state.ledger)
        outcomes = []
        for index, key in enumerate(judged):
            outcome = kept[index] if kept and changed.isdisjoint(kept[index].reads) else None
            if outcome is None:
                outcome = self.memo.find(key, lens)
            if outcome is None:
                self.load(state)
                log = Log()
                with watching(self.platform, self.toolstack, log):
                    broken = check_unit(self.toolstack, self.platform, key[1])
                outcome = self.memo.store(key, log, lens, None, tuple(broken))
            outcomes.append(outcome)
        found = in_order([v for outcome in outcomes for v in outcome.result])
        if self.check_memo:
            self.load(state)
            if found != check_all(self.toolstack, self.platform):
                raise Undetermined("the remembered verdicts differ from judging the state")
        return Verdict(self._shared(tuple(found)), judged, tuple(outcomes))

    def _judged_beside(self, state: State, before: State | None) -> list[tuple[Any, Any]]:
        """Pairs judged already that ``state``'s likely shares most cells with: the pair
        of the state it was reached from, then the last one judged with the same ledger
        records (a worker owns states by their records, and a state another worker
        reached comes without the state before it). Any judged pair would be exact:
        these are the near ones."""
        near = [] if before is None else [(before.platform, before.ledger)]
        same_records = self._judged_with.get(state.ledger.records)
        if same_records is not None:
            near.append(same_records)
        return near

    def _canonical(self, state: State) -> tuple[State, Renaming]:
        if self.symmetry is None:
            return state, NO_RENAMING
        return self.symmetry.canonical(state)

    def _trace(
        self, parent_of: Callable[[int], int | None], last: int, then: Action | None = None
    ) -> list[Action]:
        """The actions from the initial state to ``last`` (and ``then``, taken from it),
        renamed back into concrete names; ``parent_of`` looks up the fingerprint of the
        state another was first reached from. The search keeps no more than that for
        each state: the action and renaming of each step are found again by expanding
        the states on the way, which are as they were (a transition is deterministic)."""
        chain = [last]
        before = parent_of(last)
        while before is not None:
            chain.append(before)
            before = parent_of(before)
        state, _ = self._canonical(self.initial)
        path: list[tuple[Action, Renaming]] = []
        for fingerprint in reversed(chain[:-1]):
            step = next((s for s in self.successors(state) if s.fingerprint == fingerprint), None)
            if step is None:
                raise Undetermined("a state on a trace no longer leads to the next one")
            path.append((step.action, step.renaming))
            state = step.state
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


def _faults_spent(action: Action) -> int:
    """An injected failure spends one of the faults left; a reset that may fail, none."""
    return 1 if action.kind == "fail" and not action.free else 0


def _overlaps(footprint: frozenset[Any], busy: list[frozenset[Any]]) -> bool:
    """Whether ``footprint`` touches what one of the operations in flight touches."""
    return any(not footprint.isdisjoint(other) for other in busy)


@contextmanager
def rare_collections() -> Iterator[None]:
    """The search makes millions of objects that live until it ends, and almost no
    cycles (none in a million transitions): every pass of the cycle collector over them
    is wasted (4-7% of the time with a pass every 200,000 allocations, 10-15% at the
    default thresholds). During a search it runs only now and then, as the search
    trims its caches (``Explorer._trim``); what exists before the search, and what
    survives each pass, is frozen, never scanned again (which also spares forked
    workers copying those pages). Afterwards it all joins the oldest generation
    unscanned: a pass over everything the search made, as the collector resumes, took
    a twentieth of a search's time."""
    enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if enabled:
            gc.enable()


def collect_cycles() -> None:
    """One pass of the cycle collector over what the search made since the last (a
    bound on what cycles may hold), and what survives it frozen."""
    gc.collect()
    gc.freeze()


def _then_undo(to_concrete: Renaming, renaming: Renaming) -> Renaming:
    """x -> to_concrete(renaming^-1(x)), as a dict (absent keys map to themselves)."""
    inverse = {canonical: raw for raw, canonical in renaming.items()}
    names = set(inverse) | set(to_concrete)
    composed = {x: to_concrete.get(inverse.get(x, x), inverse.get(x, x)) for x in names}
    return {x: y for x, y in composed.items() if x != y}


# -- symmetry ---------------------------------------------------------------------------
def shared_flights(cursors: Iterable[Cursor], intern: Callable[[Any], Any]) -> frozenset[Cursor]:
    """A set of operations in flight made of the one object equal cursors share (as
    ``Explorer._kept`` makes them), itself the one object equal sets share."""
    flights: frozenset[Cursor] = intern(frozenset(map(intern, cursors)))
    return flights


def rename(value: Any, mapping: Renaming) -> Any:
    """``value`` with every BDF and VM name in ``mapping`` replaced, however deep."""
    if not mapping:
        return value
    kind = type(value)  # the common kinds first, by type: ``hasattr`` costs a raised error
    if kind is Bdf or kind is str:
        return mapping.get(value, value)
    if kind is tuple:
        return tuple(rename(v, mapping) for v in value)
    if kind is frozenset:
        return frozenset(rename(v, mapping) for v in value)
    if value is None or kind is int or kind is bool:
        return value
    if isinstance(value, (Bdf, str)):
        return mapping.get(value, value)
    if isinstance(value, tuple):
        items = tuple(rename(v, mapping) for v in value)
        return value._make(items) if hasattr(value, "_make") else items  # named tuples stay named
    if isinstance(value, frozenset):
        return frozenset(rename(v, mapping) for v in value)
    if isinstance(value, (Cursor, Plan, Step, Action, Decision)) and is_dataclass(value):
        changes = {f.name: rename(getattr(value, f.name), mapping) for f in fields(value) if f.init}
        return replace(value, **changes)
    return value


@dataclass
class Symmetry:
    """Classes of interchangeable devices and VMs, and the canonical renaming of a state."""

    scenario: Scenario
    devices: tuple[Bdf, ...]
    intern: Callable[[Any], Any] = lambda value: value
    device_classes: list[list[Bdf]] = field(default_factory=list)
    vm_classes: list[list[str]] = field(default_factory=list)
    _memo: dict[frozenset[Any], dict[Any, Any]] = field(default_factory=dict)
    _vm_memo: dict[tuple[Any, ...], dict[str, str]] = field(default_factory=dict)
    _part_memo: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)
    _holdings_memo: dict[tuple[Any, Any], dict[str, tuple[str, str]]] = field(default_factory=dict)
    _flights_memo: dict[frozenset[Cursor], dict[str, str]] = field(default_factory=dict)
    _placeholder: Renaming = field(default_factory=dict)
    _device_memo: dict[tuple[Any, ...], tuple[str, ...]] = field(default_factory=dict)
    _flights_words: dict[tuple[Any, ...], str] = field(default_factory=dict)
    _erase_memo: dict[tuple[Bdf, frozenset[Any]], Renaming] = field(default_factory=dict)
    _local_memo: dict[tuple[Any, ...], str] = field(default_factory=dict)
    _words: dict[tuple[int, Any, str], str] = field(default_factory=dict)
    _part_words_memo: dict[tuple[int, frozenset[Any], str], tuple[str, ...]] = field(default_factory=dict)

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
        self._placeholder = {vm: "·" for c in self.vm_classes for vm in c}

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
            return state, NO_RENAMING
        renaming: Renaming = {}
        if self.vm_classes:
            held = self._vm_holdings(state)
            flights = self._vm_flights(state.in_flight)
            for vms in self.vm_classes:
                by_vm = sorted(vms, key=lambda vm: (*held[vm], flights[vm]))
                renaming.update({raw: canon for raw, canon in zip(by_vm, vms, strict=True) if raw != canon})
        for devices in self.device_classes:
            names_key = frozenset(renaming.items())
            by_dev = sorted(devices, key=lambda d: self._device_signature(state, d, renaming, names_key))
            renaming.update({raw: canon for raw, canon in zip(by_dev, devices, strict=True) if raw != canon})
        if not renaming:
            return state, NO_RENAMING
        # ``rename``, remembered: the same platforms, ledgers, parts and cursors recur in
        # state after state.
        memo, intern = self._memo.setdefault(frozenset(renaming.items()), {}), self.intern

        def renamed(value: Any) -> Any:
            found = memo.get(value)
            if found is None:
                found = memo[value] = intern(rename(value, renaming))
            return found

        platform = memo.get(state.platform)
        if platform is None:
            platform = memo[state.platform] = intern(
                SimSnapshot._make(renamed(part) for part in state.platform)
            )
        ledger = memo.get(state.ledger)
        if ledger is None:
            records = frozenset(renamed(entry) for entry in state.ledger.records)
            ledger = memo[state.ledger] = intern(
                LedgerSnapshot(intern(records), renamed(state.ledger.torn_down))
            )
        in_flight = memo.get(state.in_flight)
        if in_flight is None:
            in_flight = memo[state.in_flight] = shared_flights(rename(state.in_flight, renaming), intern)
        return State(platform, ledger, in_flight, state.faults), renaming

    def _vm_holdings(self, state: State) -> dict[str, tuple[str, str]]:
        """Each symmetric VM's domain and what points at it (``_vm_held``), for a
        platform-and-ledger pair (remembered)."""
        key = (state.platform, state.ledger)
        found = self._holdings_memo.get(key)
        if found is None:
            domains, pointers = self._vm_held(state)
            found = self._holdings_memo[key] = {vm: (domains[vm], pointers[vm]) for vm in domains}
        return found

    def _vm_flights(self, cursors: frozenset[Cursor]) -> dict[str, str]:
        """Each symmetric VM's operations in flight, as words (remembered)."""
        found = self._flights_memo.get(cursors)
        if found is None:
            found = self._flights_memo[cursors] = {
                vm: repr(
                    sorted(
                        repr((c.plan.operation, c.plan.devices, c.phase.value, c.index))
                        for c in cursors
                        if c.plan.vm == vm
                    )
                )
                for c in self.vm_classes
                for vm in c
            }
        return found

    def caches(self) -> list[dict[Any, Any]]:
        """The memos of renamings and signatures: any may be cleared at any time."""
        return [
            self._memo,
            self._vm_memo,
            self._part_memo,
            self._holdings_memo,
            self._flights_memo,
            self._device_memo,
            self._flights_words,
            self._erase_memo,
            self._local_memo,
            self._words,
            self._part_words_memo,
        ]

    def _device_signature(
        self, state: State, d: Bdf, names: Renaming, names_key: frozenset[Any]
    ) -> tuple[tuple[str, ...], str]:
        """Everything about ``d`` in ``state``, with device names erased ("self" for
        ``d``, "other" for the rest of its class) and VM names mapped by ``names``
        (``names_key`` is ``names`` as a key): per part of the platform the entries
        naming ``d``, its ledger record, its operations in flight. Each is remembered by
        the part it comes from; they are compared as they are, never printed whole."""
        key = (state.platform, state.ledger, d, names_key)
        held = self._device_memo.get(key)
        if held is None:
            erase = self._erasing(d, names, names_key)
            held = self._device_memo[key] = (
                *(self._local(part, d, names_key, erase) for part in state.platform),
                self._local(state.ledger.records, d, names_key, erase, own=True),
            )
        flights_key = (state.in_flight, d, names_key)
        flights = self._flights_words.get(flights_key)
        if flights is None:
            flights = self._flights_words[flights_key] = repr(
                sorted(
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
            )
        return (held, flights)

    def _erasing(self, d: Bdf, names: Renaming, names_key: frozenset[Any]) -> Renaming:
        key = (d, names_key)
        found = self._erase_memo.get(key)
        if found is None:
            found = self._erase_memo[key] = (
                names | {o: "other" for c in self.device_classes for o in c} | {d: "self"}
            )
        return found

    def _local(
        self, part: frozenset[Any], d: Bdf, names_key: frozenset[Any], erase: Renaming, own: bool = False
    ) -> str:
        """The entries of ``part`` naming ``d`` (``own``: the ledger's record of ``d``
        alone), erased, as one word."""
        key = (part, d, names_key)
        found = self._local_memo.get(key)
        if found is None:
            entries = [e for e in part if e[0] is d] if own else self._mentioning(part, d)
            found = self._local_memo[key] = repr(sorted(repr(rename(e, erase)) for e in entries))
        return found

    def _mentioning(self, part: frozenset[Any], d: Bdf) -> tuple[Any, ...]:
        """The entries of a state part that name ``d`` (parts recur: remembered)."""
        key = (part, d)
        found = self._part_memo.get(key)
        if found is None:
            found = self._part_memo[key] = tuple(e for e in part if _mentions(e, d))
        return found

    def _vm_held(self, state: State) -> tuple[dict[str, str], dict[str, str]]:
        """Each symmetric VM's domain, and everything that points at it, with VM names
        erased. Each is remembered by the state parts it comes from, and each entry's
        word by the entry: they recur in state after state."""
        sim, ledger = state.platform, state.ledger
        memo, vms = self._vm_memo, [vm for c in self.vm_classes for vm in c]
        key: tuple[Any, ...] = (sim.domains,)
        domains = memo.get(key)
        if domains is None:
            domains = memo[key] = {vm: repr([d[1:] for d in sim.domains if d.name == vm]) for vm in vms}
        parts = [getattr(sim, name) for name in POINTER_FIELDS]
        key = (*parts, ledger)  # parts are interned: cheap keys
        pointers = memo.get(key)
        if pointers is None:
            pointers = memo[key] = {}
            for vm in vms:
                entries = sorted(w for i, part in enumerate(parts) for w in self._part_words(i, part, vm))
                records = sorted(self._part_words(-1, ledger.records, vm))
                pointers[vm] = repr((entries, records, vm in ledger.torn_down))
        return domains, pointers

    def _part_words(self, index: int, part: frozenset[Any], vm: str) -> tuple[str, ...]:
        """The words (``_vm_word``) of the entries of one part that name ``vm``,
        remembered by the part: a new state changes a few parts and keeps the rest."""
        key = (index, part, vm)
        found = self._part_words_memo.get(key)
        if found is None:
            word = self._vm_word
            found = self._part_words_memo[key] = tuple(w for e in part if (w := word(index, e, vm)))
        return found

    def _vm_word(self, index: int, entry: Any, vm: str) -> str:
        """A pointer entry (BDF or page, domain or domains) of the platform part at
        ``index``, or a ledger record (-1), as a word with VM names erased; "" if it does
        not name ``vm``. Remembered: an entry recurs in part after part."""
        key = (index, entry, vm)
        found = self._words.get(key)
        if found is None:
            named = _record_names(entry[1], vm) if index < 0 else _names(entry[1], vm)
            erased = rename(entry if index < 0 else (index, entry), self._placeholder)
            found = self._words[key] = repr(erased) if named else ""
        return found


def _names(held: Any, vm: str) -> bool:
    """Whether a pointer table's value (a domain, or domains) names ``vm``."""
    return held == vm or (isinstance(held, (tuple, frozenset)) and vm in held)


def _record_names(record: Any, vm: str) -> bool:
    """Whether a ledger record points at ``vm`` (its owner, context, MSIs or exposure)."""
    return vm in (record.vm, record.context, record.msi, record.exposed)


def _mentions(entry: Any, d: Bdf) -> bool:
    if entry == d:
        return True
    if isinstance(entry, tuple):
        return any(_mentions(e, d) for e in entry)
    if isinstance(entry, frozenset):
        return any(_mentions(e, d) for e in entry)
    return False
