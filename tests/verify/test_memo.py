"""Transitions remembered by what they read: the search with them reaches exactly the
states the search without them reaches, every remembered outcome is the outcome of a
run, every table of the platform and the toolstack is seen by the recorder, and a step
that reads something the recorder cannot see is caught."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import EXAMPLES
from pciguard.errors import Undetermined
from pciguard.formats.scenario_file import load_scenario
from pciguard.platforms.sim import SimPlatform
from pciguard.toolstack import LedgerSnapshot
from pciguard.verify.explorer import Explorer
from pciguard.verify.memo import ALL, KEYS, TABLES, TORN_DOWN, Lens, Log, Memo, watching

VERIFY = EXAMPLES / "verify"
REFERENCE = sorted(VERIFY.glob("ref-*.yaml"))
LEGACY = sorted((VERIFY / "legacy").glob("*.yaml"))
PREFIX = 4_000  # states: the searches are compared on the same breadth-first prefix


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: p.stem)
def test_remembered_outcomes_are_those_of_runs_and_reach_the_same_states(path: Path) -> None:
    """Every outcome taken from the memo is checked against a run of the same action
    (``check_memo``), and both searches count the same states and transitions."""
    scenario = load_scenario(path)
    checked = Explorer(scenario, check_memo=True, max_states=PREFIX)
    remembered = checked.run()
    run = Explorer(scenario, memo=False, max_states=PREFIX).run()
    assert (remembered.verdict, remembered.stats.states, remembered.stats.transitions) == (
        run.verdict,
        run.stats.states,
        run.stats.transitions,
    )
    assert remembered.stats.depth == run.stats.depth
    assert checked.memo is not None and checked.memo.hits > 0  # outcomes were taken from it, and checked


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_each_legacy_flaw_is_caught_through_remembered_outcomes_checked_against_runs(path: Path) -> None:
    scenario = load_scenario(path)
    remembered = Explorer(scenario, check_memo=True).run()
    run = Explorer(scenario, memo=False).run()
    assert remembered.verdict == run.verdict == "violation"
    assert remembered.counterexample is not None and run.counterexample is not None
    assert [str(a) for a in remembered.counterexample.actions] == [str(a) for a in run.counterexample.actions]


def test_every_attribute_that_holds_state_is_a_watched_table() -> None:
    """What a step may read lives in the tables the recorder watches (and the
    toolstack's torn-down VMs, read whole by every step). An attribute added to the
    platform or the toolstack must be made a table, or named here as holding no
    state a step reads."""
    explorer = Explorer(load_scenario(VERIFY / "ref-workstation.yaml"), max_states=300)
    explorer.run()
    watched = {t.attribute for t in TABLES}
    not_state = {"_host", "quarantine_mode", "_taken", "faults", "log", "observers", "flaws"}
    assert set(vars(explorer.platform)) - not_state == watched - {"ledger"}
    assert set(vars(explorer.toolstack)) - {"notes", "observers", "options", "platform", "policy"} == {
        "ledger",
        "torn_down",
    }


def test_the_recorder_notes_reads_in_order_and_what_may_change() -> None:
    explorer = Explorer(load_scenario(VERIFY / "ref-workstation.yaml"))
    platform, toolstack = explorer.platform, explorer.toolstack
    context = next(t for t in TABLES if t.attribute == "_context")
    domains = next(t for t in TABLES if t.attribute == "_domains")
    present = next(t for t in TABLES if t.attribute == "_present")
    rid = next(iter(platform._context))
    log = Log()
    with watching(platform, toolstack, log):
        platform._context.get(rid)  # a read
        platform._context[rid] = "vm1"  # a write of what was read
        platform._context["fresh"] = "vm2"  # a write first: not a read
        assert platform._context.get("fresh") == "vm2"  # ... read after, its value came from the run
        len(platform._domains)  # the set of keys
        list(platform._domains.values())  # domains are changed in place: every one may change
        assert rid in platform._present  # membership of one device: a read, nothing changes
    assert log.reads == [
        (context.position, rid),
        (domains.position, KEYS),
        (domains.position, ALL),
        (present.position, rid),
    ]
    assert log.touched == {
        (context.position, rid),
        (context.position, "fresh"),
        (domains.position, ALL),
    }
    assert isinstance(platform._context, dict)  # the tables themselves are back


def test_the_torn_down_vms_are_one_cell_read_by_any_use_and_changed_by_assigning_them() -> None:
    explorer = Explorer(load_scenario(VERIFY / "ref-workstation.yaml"))
    platform, toolstack = explorer.platform, explorer.toolstack
    log = Log()
    with watching(platform, toolstack, log):
        pass
    assert log.reads == [] and log.touched == set() and toolstack.torn_down == frozenset()
    with watching(platform, toolstack, log):
        assert "vm1" not in toolstack.torn_down
    assert log.reads == [(TORN_DOWN, ALL)] and log.touched == set()
    assert isinstance(toolstack.torn_down, frozenset)  # put back
    log = Log()
    with watching(platform, toolstack, log):
        toolstack.torn_down |= {"vm1"}
    assert log.reads == [(TORN_DOWN, ALL)] and log.touched == {(TORN_DOWN, ALL)}
    assert toolstack.torn_down == frozenset({"vm1"})  # the step's value is kept


def test_a_step_that_reads_what_the_recorder_cannot_see_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash that depends on something outside the tables (here a count of calls)
    gives different outcomes for the same values read: the check against runs says so."""
    crash = SimPlatform.crash_domain
    calls = {"n": 0}

    def crash_every_other_time(self: SimPlatform, name: str) -> None:
        calls["n"] += 1
        if calls["n"] % 2:
            crash(self, name)

    monkeypatch.setattr(SimPlatform, "crash_domain", crash_every_other_time)
    with pytest.raises(Undetermined, match="crashes: the remembered outcome differs from a run"):
        Explorer(load_scenario(VERIFY / "ref-workstation.yaml"), check_memo=True).run()


def test_runs_that_read_the_same_cells_in_another_order_are_found_either_way() -> None:
    """A table's entries are walked in the order they were made: two runs may read the
    same cells in another order. Either is found; the same reads must end the same way."""
    memo = Memo()
    context = next(t for t in TABLES if t.attribute == "_context").position
    empty = tuple(frozenset() for _ in range(TORN_DOWN + 1))

    def state(b: str) -> tuple[frozenset[object], ...]:
        return (*empty[:context], frozenset({("a", "vm1"), ("b", b)}), *empty[context + 1 :])

    def lens(parts: tuple[frozenset[object], ...]) -> Lens:
        return memo.lens(parts[:-2], LedgerSnapshot(parts[-2], parts[-1]))

    first, second = Log(), Log()
    for log, order in ((first, ("a", "b")), (second, ("b", "a"))):
        for key in order:
            log.read((context, key))
    kept = memo.store("act", first, lens(state("vm2")), state("vm2"), result="done")
    assert memo.find("act", lens(state("vm2"))) == kept
    assert memo.store("act", second, lens(state("vm2")), state("vm2"), result="done") == kept
    assert memo.find("act", lens(state("vm3"))) is None  # b differs: no run read that
    with pytest.raises(Undetermined, match="ended differently"):
        memo.store("act", first, lens(state("vm2")), state("vm2"), result="another end")


def test_caches_cleared_and_outcomes_forgotten_along_the_way_change_no_state() -> None:
    """A long search keeps its caches and remembered outcomes within bounds by clearing
    them; with bounds so small that it clears them again and again, it still reaches
    exactly the same states."""
    scenario = load_scenario(VERIFY / "ref-hotplug-race.yaml")
    keeping = Explorer(scenario)
    kept = keeping.run()
    clearing = Explorer(scenario, check_memo=True)
    clearing.cache_entries, clearing.memo_reads = 50, 200
    cleared = clearing.run()
    assert (cleared.verdict, cleared.stats.states, cleared.stats.transitions) == (
        kept.verdict,
        kept.stats.states,
        kept.stats.transitions,
    )
    assert clearing.memo is not None and keeping.memo is not None
    assert clearing.memo.runs > keeping.memo.runs  # what it forgot, it ran again
