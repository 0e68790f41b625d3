"""The search split by fingerprint over workers finds what the plain search finds: the
same states, transitions and depth, the same verdicts, shortest counterexamples that
replay, and the limits still stop it."""

from __future__ import annotations

import copy
import multiprocessing
import os
import time
from functools import partial
from pathlib import Path

import pytest
from test_explorer import CONCURRENT, LEGACY, TINY, counterexample_replays

from conftest import EXAMPLES
from pciguard.formats.scenario_file import Scenario, load_scenario, parse_scenario
from pciguard.verify.explorer import Explorer, Result, Stats
from pciguard.verify.partitioned import (
    Arrival,
    Channel,
    Handover,
    InProcess,
    Partition,
    WorkerFailed,
    in_forked_processes,
    run_partitioned,
)

VERIFY = EXAMPLES / "verify"
SMALL = [
    parse_scenario(TINY, "tiny.yaml", VERIFY),
    parse_scenario(CONCURRENT, "concurrent.yaml", VERIFY),
    load_scenario(VERIFY / "ref-symmetric.yaml"),
    load_scenario(VERIFY / "ref-rmrr-relaxed.yaml"),
    load_scenario(VERIFY / "ref-teardown-race.yaml"),
]


def figures(result: Result) -> tuple[object, ...]:
    return result.verdict, result.stats.states, result.stats.transitions, result.stats.depth


@pytest.mark.parametrize("scenario", SMALL, ids=lambda s: s.name)
def test_partitions_reach_exactly_the_states_of_the_plain_search(scenario: Scenario) -> None:
    plain = figures(Explorer(scenario).run())
    assert plain[0] == "pass"
    for partitions in (1, 2, 3):
        assert figures(run_partitioned(Explorer(scenario), InProcess, partitions)) == plain, partitions
    assert figures(Explorer(scenario, workers=2).run()) == plain, "forked"


@pytest.mark.parametrize("scenario", SMALL, ids=lambda s: s.name)
def test_a_search_handed_over_to_forked_workers_reaches_exactly_the_states_of_the_plain_search(
    scenario: Scenario,
) -> None:
    plain = figures(Explorer(scenario).run())
    handed = Explorer(scenario, workers=2, hand_over_after=0.0).run()  # after the first level
    assert figures(handed) == plain
    assert handed.stats.workers == 2


def levels_explored(explorer: Explorer, levels: int) -> Handover:
    """The plain search's first ``levels`` levels, as it would hand them over."""
    initial, _ = explorer.start()
    parents: dict[int, int | None] = {hash(initial): None}
    level, stats = [(initial, hash(initial))], Stats(states=1)
    for depth in range(levels):
        following = []
        for state, fingerprint in level:
            for step in explorer.successors(state):
                stats.transitions += 1
                if step.fingerprint not in parents and not explorer._spared(step.state, parents):
                    parents[step.fingerprint] = fingerprint
                    following.append((step.state, step.fingerprint))
        spared = explorer._unspared(following, parents)  # by a twin that came later in the level
        level = [(s, f) for s, f in following if f not in spared]
        stats.states, stats.depth = len(parents), depth + 1
    return Handover(level, parents, stats, time.perf_counter())


@pytest.mark.parametrize("levels", [2, 5])
@pytest.mark.parametrize("partitions", [1, 3])
def test_partitions_take_a_search_over_from_any_level_and_reach_what_it_would(
    levels: int, partitions: int
) -> None:
    scenario = load_scenario(VERIFY / "ref-teardown-race.yaml")
    plain = figures(Explorer(scenario).run())
    explorer = Explorer(scenario)
    handover = levels_explored(explorer, levels)
    assert figures(run_partitioned(explorer, InProcess, partitions, handover)) == plain


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_workers_a_search_is_handed_to_catch_each_legacy_flaw_with_a_shortest_trace(
    path: Path, tmp_path: Path
) -> None:
    """A trace that crosses the handover: its first states are the first process's."""
    counterexample_replays(path, tmp_path, workers=2, hand_over_after=0.0)
    scenario = load_scenario(path)
    plain, handed = Explorer(scenario).run(), Explorer(scenario, workers=2, hand_over_after=0.0).run()
    assert plain.counterexample is not None and handed.counterexample is not None
    assert len(handed.counterexample.actions) == len(plain.counterexample.actions)


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_forked_workers_catch_each_legacy_flaw_with_a_shortest_trace(path: Path, tmp_path: Path) -> None:
    counterexample_replays(path, tmp_path, workers=2)
    scenario = load_scenario(path)
    plain, split = Explorer(scenario).run(), Explorer(scenario, workers=2).run()
    assert plain.counterexample is not None and split.counterexample is not None
    assert len(split.counterexample.actions) == len(plain.counterexample.actions)


@pytest.mark.parametrize("path", [VERIFY / "ref-teardown-race.yaml", *LEGACY[:2]], ids=lambda p: p.stem)
def test_a_state_from_another_worker_is_judged_beside_one_with_its_records_as_judging_it_would(
    path: Path,
) -> None:
    """A state another worker reached comes without the state before it: the verdicts
    it keeps from a pair judged with the same ledger records are checked against
    judging it whole (``check_memo``), and the search finds what the plain one does."""
    scenario = load_scenario(path)
    plain = figures(Explorer(scenario).run())
    assert figures(run_partitioned(Explorer(scenario, check_memo=True), InProcess, 3)) == plain


def test_the_pairs_a_state_is_judged_beside_are_its_parents_then_one_with_its_records() -> None:
    explorer = Explorer(load_scenario(VERIFY / "ref-teardown-race.yaml"))
    initial, _ = explorer.start()
    explorer._check(initial)
    steps = list(explorer.successors(initial))
    same_records = [s.state for s in steps if s.state.ledger.records == initial.ledger.records]
    assert same_records, "a crash changes the platform alone"
    pair = (initial.platform, initial.ledger)
    assert explorer._judged_beside(same_records[0], None) == [pair]
    other = next(s.state for s in steps if s.state.ledger.records != initial.ledger.records)
    assert explorer._judged_beside(other, None) == []
    assert explorer._judged_beside(other, initial) == [pair]


def test_the_limits_stop_forked_workers() -> None:
    scenario = load_scenario(VERIFY / "ref-workstation.yaml")
    by_states = Explorer(scenario, workers=2, max_states=500).run()
    assert by_states.verdict == "incomplete" and by_states.stats.states >= 500
    assert "--max-states" in by_states.reason
    by_time = Explorer(scenario, workers=2, time_limit=0.5).run()
    assert by_time.verdict == "incomplete" and "--time-limit" in by_time.reason
    assert by_time.stats.seconds < 10
    handed = Explorer(scenario, workers=2, hand_over_after=0.2, time_limit=0.6).run()
    assert handed.verdict == "incomplete" and handed.stats.workers == 2
    assert 0.6 <= handed.stats.seconds < 1.5  # counted from the search's start, not the handover


def test_a_state_crosses_between_workers_as_numbers_once_its_parts_are_known() -> None:
    explorer = Explorer(parse_scenario(TINY, "tiny.yaml", VERIFY))
    initial, _ = explorer.start()
    arrivals = [Arrival(step.fingerprint, step.state, hash(initial)) for step in explorer.successors(initial)]
    sender, receiver = Channel(), Channel()
    first = sender.encode(arrivals)
    again = sender.encode(arrivals)
    assert receiver.decode(first) == arrivals
    assert receiver.decode(again) == arrivals
    assert len(again) < len(first) / 3  # the parts crossed with the first batch


def test_a_worker_takes_in_the_parts_it_already_holds_as_its_own_objects() -> None:
    """Caches and the memo compare parts by identity: an equal copy would miss them."""
    sender, receiver = (Explorer(parse_scenario(TINY, "tiny.yaml", VERIFY)) for _ in range(2))
    arrivals = []
    for explorer in (sender, receiver):
        initial, _ = explorer.start()
        arrivals.append(
            [Arrival(step.fingerprint, step.state, hash(initial)) for step in explorer.successors(initial)]
        )
    sent, held = arrivals
    received = Channel(receiver._shared).decode(Channel().encode(sent))
    assert received == sent == held
    for came, own in zip(received, held, strict=True):
        assert came.state.platform is own.state.platform
        assert came.state.ledger is own.state.ledger
        assert came.state.in_flight is own.state.in_flight


def test_a_worker_takes_in_each_cursor_in_flight_as_its_own_object_in_a_set_it_never_made() -> None:
    """The memo tells an operation in flight by its cursor's identity: a set of
    operations the receiver has not met is made of the cursors it holds."""
    sender, receiver = (Explorer(parse_scenario(TINY, "tiny.yaml", VERIFY)) for _ in range(2))
    for explorer in (sender, receiver):
        explorer.start()
    held = {c: c for s in receiver.successors(receiver.start()[0]) for c in s.state.in_flight}
    assert len(held) > 1
    state = next(iter(sender.successors(sender.start()[0]))).state
    together = state._replace(in_flight=frozenset(copy.deepcopy(list(held))))
    assert together.in_flight not in {s.state.in_flight for s in receiver.successors(receiver.start()[0])}
    (came,) = Channel(receiver._shared).decode(Channel().encode([Arrival(1, together, 0)]))
    assert came.state == together
    for cursor in came.state.in_flight:
        assert cursor is held[cursor]


@pytest.mark.parametrize("failing", [{0, 1}, {0}], ids=["every-worker", "the-first"])
def test_a_worker_that_fails_is_named_and_the_others_stop(
    monkeypatch: pytest.MonkeyPatch, failing: set[int]
) -> None:
    expand = Partition.expand

    def broken(self: Partition, deadline: float | None) -> object:
        if self.index in failing:
            raise MemoryError("no room for the frontier")
        return expand(self, deadline)

    monkeypatch.setattr(Partition, "expand", broken)
    with pytest.raises(WorkerFailed, match="a verifier worker failed: MemoryError: no room for the frontier"):
        Explorer(parse_scenario(TINY, "tiny.yaml", VERIFY), workers=2).run()
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def _job(seconds: float, mark: Path) -> tuple[int, float, float]:
    began = time.monotonic()
    time.sleep(seconds)
    mark.write_text(str(os.getpid()))
    return os.getpid(), began, time.monotonic()


def test_jobs_run_in_processes_of_their_own_at_most_so_many_at_once_and_answer_in_order(
    tmp_path: Path,
) -> None:
    seconds = [0.4, 0.05, 0.05, 0.2]  # the first ends last
    jobs = [partial(_job, s, tmp_path / str(i)) for i, s in enumerate(seconds)]
    answers = list(in_forked_processes(jobs, 2))
    assert [pid for pid, _, _ in answers] == [int((tmp_path / str(i)).read_text()) for i in range(4)]
    assert len({pid for pid, _, _ in answers} | {os.getpid()}) == 5
    for moment in sorted(began for _, began, _ in answers):
        assert sum(began <= moment < ended for _, began, ended in answers) <= 2
    assert answers[2][1] < answers[0][2]  # it did not wait for the first to end


def _failing() -> None:
    raise ValueError("no such device")


def test_a_job_that_fails_is_named_and_the_rest_are_stopped(tmp_path: Path) -> None:
    jobs = [partial(_job, 5, tmp_path / "slow"), _failing, partial(_job, 0, tmp_path / "never")]
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match="ValueError: no such device"):
        list(in_forked_processes(jobs, 2))
    assert time.monotonic() - started < 4  # the slow one was not waited for
    time.sleep(0.2)
    assert not (tmp_path / "never").exists() and not (tmp_path / "slow").exists()
