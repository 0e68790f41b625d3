"""The verifier: it catches every legacy flaw with a trace that replays, it finds no
violation in the secure toolstack, and its reductions shrink the search without
hiding anything."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLES
from pciguard.formats.scenario_file import Scenario, load_scenario, parse_scenario
from pciguard.simulate import run as simulate
from pciguard.verify.counterexample import dump, scenario_document
from pciguard.verify.explorer import Action, Explorer, State
from pciguard.verify.invariants import PLATFORM_CONTRACT, Violation
from pciguard.verify.memo import Log

VERIFY = EXAMPLES / "verify"
LEGACY = sorted((VERIFY / "legacy").glob("*.yaml"))
REFERENCE = sorted(VERIFY.glob("ref-*.yaml"))


def counterexample_replays(path: Path, tmp_path: Path, **options: Any) -> set[str]:
    scenario = load_scenario(path)
    explorer = Explorer(scenario, **options)
    result = explorer.run()
    assert result.verdict == "violation", f"{path.name}: the flaw was not caught"
    found = result.counterexample
    assert found is not None
    broken = {v.invariant for v in found.violations}
    assert broken and broken <= (scenario.expect_violations or set())
    keys, at_the_end = explorer.replay(found.actions)
    assert {v.invariant for v in at_the_end} == broken  # the concrete trace gets there too
    written = tmp_path / f"{path.stem}-counterexample.yaml"
    written.write_text(dump(scenario_document(scenario, found, keys)))
    replayed = simulate(parse_scenario(written.read_text(), str(written), written.parent))
    assert replayed.as_expected, [str(v) for v in replayed.violations]
    assert replayed.broken_invariants == broken
    return broken


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_each_legacy_flaw_is_caught_and_its_trace_replays(path: Path, tmp_path: Path) -> None:
    counterexample_replays(path, tmp_path)


REDUCTIONS = ("symmetry", "independence", "messages", "budget")
# Every combination but all on (the test above): each reduction alone, each left out, none.
COMBINATIONS = [c for c in itertools.product((False, True), repeat=len(REDUCTIONS)) if not all(c)]


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
@pytest.mark.parametrize(
    "on", COMBINATIONS, ids=lambda c: "+".join(n for n, o in zip(REDUCTIONS, c, strict=True) if o) or "none"
)
def test_reductions_never_hide_a_violation(path: Path, tmp_path: Path, on: tuple[bool, ...]) -> None:
    counterexample_replays(path, tmp_path, **dict(zip(REDUCTIONS, on, strict=True)))


def test_every_flaw_has_a_verify_scenario() -> None:
    from pciguard.legacy import Flaw

    assert {f for p in LEGACY for f in load_scenario(p).options.flaws} == set(Flaw)


@pytest.mark.slow
@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: p.stem)
def test_secure_toolstack_passes_every_reference_scenario_exhaustively(path: Path) -> None:
    result = Explorer(load_scenario(path)).run()
    found = result.counterexample
    assert result.verdict == "pass", found and [str(v) for v in found.violations]


def test_the_hotplug_race_catches_a_hotplug_plan_that_ignores_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ref-hotplug-race can fail: without the rule that a device plugged into a group a
    guest holds (or is being given) goes to quarantine, the race is found."""
    from pciguard.toolstack import Toolstack

    monkeypatch.setattr(Toolstack, "guests_in_group", lambda self, bdf: [])
    result = Explorer(load_scenario(VERIFY / "ref-hotplug-race.yaml")).run()
    assert result.verdict == "violation" and result.counterexample is not None
    assert "hotplug" in {a.kind for a in result.counterexample.actions}


def test_symmetry_reduces_the_symmetric_scenario_tenfold() -> None:
    scenario = load_scenario(VERIFY / "ref-symmetric.yaml")
    reduced = Explorer(scenario, symmetry=True).run()
    full = Explorer(scenario, symmetry=False).run()
    assert reduced.verdict == full.verdict == "pass"
    assert full.stats.states >= 10 * reduced.stats.states, (full.stats.states, reduced.stats.states)


CONCURRENT = """
name: concurrent
platform: ../symmetric.yaml
vms: [{name: vm1}, {name: vm2}]
steps: [{op: make-assignable, device: 0000:01:00.0}, {op: make-assignable, device: 0000:02:00.0}]
explore: {devices: [0000:01:00.0, 0000:02:00.0], operations: [assign, release, crash],
          faults: 0, concurrency: 2}
"""


def test_independence_reduces_interleavings_of_disjoint_operations() -> None:
    scenario = parse_scenario(CONCURRENT, "concurrent.yaml", VERIFY)
    reduced = Explorer(scenario, symmetry=False, independence=True).run()
    full = Explorer(scenario, symmetry=False, independence=False).run()
    assert reduced.verdict == full.verdict == "pass"
    assert reduced.stats.states < full.stats.states


SET_UP_ELSEWHERE = """
name: set-up-elsewhere
platform: ../symmetric.yaml
vms: [{name: vm1}]
steps: [{op: make-assignable, device: 0000:03:00.0}, {op: assign, device: 0000:03:00.0, vm: vm1}]
explore: {devices: [0000:01:00.0], operations: [make-assignable, assign, release, destroy, crash],
          faults: 1, concurrency: 1}
"""


class WholeLedger(Explorer):
    """Every state holds every device's record."""

    def _tracked(self, replay: object) -> None:
        return None


@pytest.mark.parametrize(
    "scenario",
    [
        *(load_scenario(p) for p in LEGACY),
        load_scenario(VERIFY / "ref-aliases.yaml"),
        load_scenario(VERIFY / "ref-symmetric.yaml"),
        parse_scenario(SET_UP_ELSEWHERE, "set-up-elsewhere.yaml", VERIFY),
    ],
    ids=lambda s: s.name,
)
def test_states_leave_out_only_records_nothing_can_change(scenario: object) -> None:
    """A device neither explored, nor in a group with one, nor moved by the set-up
    (0000:03:00.0 above: the teardown of vm1 moves it) keeps its record: leaving it out
    of the states changes no count and no verdict."""
    slim, whole = Explorer(scenario).run(), WholeLedger(scenario).run()  # type: ignore[arg-type]
    assert (slim.verdict, slim.stats.states, slim.stats.transitions) == (
        whole.verdict,
        whole.stats.states,
        whole.stats.transitions,
    )


TINY = """
name: tiny
platform: ../symmetric.yaml
vms: [{name: vm1}]
steps: [{op: make-assignable, device: 0000:01:00.0}]
explore: {devices: [0000:01:00.0, 0000:02:00.0], operations: [make-assignable, assign, release, crash],
          faults: 1, concurrency: 2}
"""


def brute_force_states(explorer: Explorer) -> set[State]:
    """Every state the explorer's actions reach, compared whole: no fingerprints, and no
    canonical renaming (whatever reductions the explorer applies to its actions)."""
    seen = {explorer.initial}
    todo = deque([explorer.initial])
    while todo:
        state = todo.popleft()
        explorer.load(state)
        for action in explorer.actions(state):
            successor, _ = explorer.apply(state, action)
            if successor not in seen:
                seen.add(successor)
                todo.append(successor)
    return seen


def unreduced(scenario: Scenario) -> Explorer:
    return Explorer(scenario, symmetry=False, independence=False, messages=False, budget=False)


def test_state_count_matches_an_independent_brute_force_count() -> None:
    scenario = parse_scenario(TINY, "tiny.yaml", VERIFY)
    result = unreduced(scenario).run()
    assert result.verdict == "pass"
    expected = len(brute_force_states(unreduced(scenario)))
    assert result.stats.states == expected
    assert expected > 100  # the tiny scenario is not trivial


def test_the_messages_reduction_merges_exactly_the_states_that_differ_in_a_failures_words() -> None:
    """Counted apart: the unreduced states, with each operation in flight told only
    whether it failed and how many of its steps stuck."""
    scenario = parse_scenario(TINY, "tiny.yaml", VERIFY)

    def without_words(state: State) -> tuple[object, ...]:
        cursors = frozenset(
            (c.plan, c.phase, c.steps, c.index, c.undo, c.failure is None, len(c.stuck))
            for c in state.in_flight
        )
        return (state.platform, state.ledger, cursors, state.faults)

    states = brute_force_states(unreduced(scenario))
    merged = Explorer(scenario, symmetry=False, independence=False, messages=True, budget=False).run()
    assert merged.verdict == "pass"
    assert merged.stats.states == len({without_words(s) for s in states}) < len(states)


class Judging(Explorer):
    """The search, noting every platform-and-ledger pair it judges."""

    def __init__(self, scenario: Scenario, **options: Any) -> None:
        super().__init__(scenario, **options)
        self.pairs: set[tuple[object, object]] = set()

    def _check(self, state: State, before: State | None = None) -> list[Violation]:
        self.pairs.add((state.platform, state.ledger))
        return super()._check(state, before)


@pytest.mark.parametrize(("faults", "concurrency"), [(1, 2), (2, 1)])
def test_the_budget_reduction_leaves_out_exactly_the_states_whose_twin_with_more_faults_is_as_near(
    faults: int, concurrency: int
) -> None:
    """Counted apart by a breadth-first brute force with each state's depth: a state is
    left out when the same state with more faults left to inject is reached at its depth
    or nearer, and every platform-and-ledger pair is still judged."""
    scenario = parse_scenario(
        TINY.replace("faults: 1", f"faults: {faults}").replace(
            "concurrency: 2", f"concurrency: {concurrency}"
        ),
        "tiny.yaml",
        VERIFY,
    )
    explorer = unreduced(scenario)
    depth = {explorer.initial: 0}
    todo = deque([explorer.initial])
    while todo:
        state = todo.popleft()
        for action in explorer.actions(state):
            successor, _ = explorer.apply(state, action)
            if successor not in depth:
                depth[successor] = depth[state] + 1
                todo.append(successor)

    def twin_as_near(state: State) -> bool:
        twins = (state._replace(faults=more) for more in range(state.faults + 1, faults + 1))
        return any(depth.get(twin, depth[state] + 1) <= depth[state] for twin in twins)

    kept = [s for s in depth if not twin_as_near(s)]
    budgeted = Judging(scenario, symmetry=False, independence=False, messages=False, budget=True)
    result = budgeted.run()
    assert result.verdict == "pass"
    assert result.stats.states == len(kept) < len(depth)
    assert result.stats.depth == max(depth.values())
    initial = (explorer.initial.platform, explorer.initial.ledger)  # judged by ``start``
    assert budgeted.pairs | {initial} == {(s.platform, s.ledger) for s in depth}


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_the_budget_reduction_keeps_each_counterexample_as_short(path: Path) -> None:
    scenario = load_scenario(path)
    with_budget, without = Explorer(scenario).run(), Explorer(scenario, budget=False).run()
    assert with_budget.counterexample is not None and without.counterexample is not None
    assert len(with_budget.counterexample.actions) == len(without.counterexample.actions)


@pytest.mark.parametrize(
    "scenario",
    [parse_scenario(CONCURRENT, "concurrent.yaml", VERIFY), load_scenario(VERIFY / "ref-teardown-race.yaml")],
    ids=lambda s: s.name,
)
def test_every_state_holds_the_one_cursor_object_of_each_value(scenario: Scenario) -> None:
    """The memo tells an operation in flight by its cursor's identity: whether reached by
    a run, a remembered outcome or a renaming, a state's cursors are the ones equal
    cursors share, so equal operations find the same outcomes."""
    explorer = Explorer(scenario)
    initial, _ = explorer.start()
    seen, todo, cursors = {initial}, deque([initial]), 0
    while todo:
        for step in explorer.successors(todo.popleft()):
            for cursor in step.state.in_flight:
                assert explorer._shared(cursor) is cursor, cursor
                cursors += 1
            if step.state not in seen:
                seen.add(step.state)
                todo.append(step.state)
    assert cursors > len(seen)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_the_independence_reduction_reaches_every_state_with_nothing_in_flight(concurrency: int) -> None:
    """Postponing a disjoint operation or crash reorders steps that commute: every state
    the unreduced search reaches with no operation in flight, the reduced one reaches
    too (and it takes fewer transitions to get there)."""
    scenario = parse_scenario(
        TINY.replace("concurrency: 2", f"concurrency: {concurrency}"), "tiny.yaml", VERIFY
    )

    def settled(states: set[State]) -> set[State]:
        return {s for s in states if not s.in_flight}

    full = unreduced(scenario)
    reduced = Explorer(scenario, symmetry=False, independence=True, messages=False, budget=False)
    assert settled(brute_force_states(reduced)) == settled(brute_force_states(full))
    assert reduced.run().stats.transitions < full.run().stats.transitions


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: p.stem)
def test_each_reduction_keeps_the_verdict_of_the_reference_suite(path: Path) -> None:
    scenario = load_scenario(path)
    every = Explorer(scenario).run().verdict
    assert every == "pass"
    for reduction in REDUCTIONS:
        assert Explorer(scenario, **{reduction: False}).run().verdict == every, reduction


def test_limits_stop_the_search() -> None:
    scenario = load_scenario(VERIFY / "ref-workstation.yaml")
    result = Explorer(scenario, max_states=50).run()
    assert result.verdict == "incomplete" and "--max-states" in result.reason


def test_a_scenario_with_an_unsafe_override_finishes() -> None:
    """Regression: under rmrr: relaxed each assignment grew the device's record, so every
    assign/release cycle was a new state and the search never ended."""
    result = Explorer(load_scenario(VERIFY / "ref-rmrr-relaxed.yaml"), max_states=20_000).run()
    assert result.verdict == "pass", result.reason


class MisuseOnTheThirdRun(Explorer):
    """Its third run goes back to the state it came from, with a misuse caught."""

    runs = 0

    def _run_action(self, state: State, action: Action, log: Log | None = None) -> Any:
        self.runs += 1
        if self.runs == 3:
            return state, [Violation(PLATFORM_CONTRACT, None, "released what it does not own")], None
        return super()._run_action(state, action, log)

    def replay(self, trace: list[Action]) -> Any:
        return [], [Violation(PLATFORM_CONTRACT, None, "x")]


def test_a_platform_misuse_into_a_known_state_is_still_a_violation() -> None:
    """Regression: a platform-contract violation counted only when the state it led to
    was new."""
    result = MisuseOnTheThirdRun(load_scenario(VERIFY / "ref-symmetric.yaml")).run()
    assert result.verdict == "violation"


def test_every_field_of_a_platform_state_is_placed_for_the_vm_symmetry() -> None:
    """A VM's signature reads the fields whose entries may name it; a field added to the
    platform's state must be placed on one side or the other."""
    from pciguard.platforms.sim import POINTER_FIELDS, SimSnapshot

    names_no_vm = {"domains", "present", "driver", "ats"}  # domains: read on their own
    assert set(SimSnapshot._fields) == {*POINTER_FIELDS, *names_no_vm}
