"""The search split over workers, level by level.

Each worker owns the states whose ledger records hash into its partition
(``owner_of``): it alone keeps their fingerprints and parents, judges and expands
them. A level runs in two rounds: every worker expands its frontier, keeping what it
owns and addressing the rest to their owners; then every worker takes in what was
addressed to it, keeping what it has not seen. The coordinator only routes, counts and
decides; it holds no state but the fingerprints and parents of what a search in one
process reached before it handed over to the workers (``Handover``), which every
worker knows too. A worker is a ``Partition``; an executor runs them: in this
process (``InProcess``) or one forked process per worker (``Forked``). Running them on
many machines needs only another executor (docs/verifier.md).

Level by level, every state of one depth is judged before any of the next: the first
level with a violation yields a shortest trace.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple, Protocol, TypeVar

from pciguard.platforms.sim import SimSnapshot
from pciguard.verify.explorer import (
    Action,
    Counterexample,
    Explorer,
    Result,
    State,
    Stats,
    shared_flights,
)


class Arrival(NamedTuple):
    """A successor addressed to the worker that owns it, and the fingerprint of the
    state it was reached from."""

    fingerprint: int
    state: State
    parent: int


class Found(NamedTuple):
    """A violation a level met: the new state that breaks an invariant, or the state a
    platform misuse was taken from, with the action."""

    fingerprint: int
    then: Action | None = None


@dataclass
class Level:
    """What one worker did in one level."""

    transitions: int = 0
    new: int = 0  # states it had not seen (less those spared: ``Partition.receive``)
    found: Found | None = None
    outboxes: dict[int, list[Arrival]] = field(default_factory=dict)  # worker -> arrivals


class Owned(NamedTuple):
    """A worker's answer to where a state came from."""

    owned: bool
    parent: int | None  # the fingerprint of the state before (None: the initial state)


class Waiting(NamedTuple):
    """A state of the frontier, and the state this worker reached it from (None if
    another worker did): judged against it, the invariants that read only what the
    step left alone keep their verdicts."""

    state: State
    fingerprint: int
    before: State | None


class Partition:
    """One worker's share of the search. ``explored``: the states a search in one
    process reached before it handed its frontier over (``Handover``), known to every
    worker and owned by none."""

    def __init__(self, explorer: Explorer, index: int, count: int, explored: dict[int, int | None]) -> None:
        self.explorer, self.index, self.count = explorer, index, count
        self.parents: dict[int, int | None] = {}  # fingerprint -> the state's before it
        self.explored = explored
        self.frontier: list[Waiting] = []

    def seed(self, state: State, fingerprint: int) -> None:
        """A state of the first level this worker expands: the initial state, or one a
        search in one process reached (whose parent ``explored`` holds)."""
        if fingerprint not in self.explored:
            self.parents[fingerprint] = None
        self.frontier.append(Waiting(state, fingerprint, None))

    def expand(self, deadline: float | None) -> Level:
        """Judge each state of the frontier, then expand it: successors this worker owns
        join the next frontier if new, the others go into the level's outboxes. States
        are judged when expanded, not when reached, so each worker judges only states it
        owns (its caches of invariants and plans then hold its own share); a level still
        judges every state of one depth before any of the next. Stops past ``deadline``."""
        level = Level()
        frontier, self.frontier = self.frontier, []
        explorer, count = self.explorer, self.count
        for state, fingerprint, before in frontier:
            if deadline is not None and time.monotonic() >= deadline:
                break
            if explorer._check(state, before):
                level.found = Found(fingerprint)
                return level
            for step in explorer.successors(state):
                level.transitions += 1
                if step.misuse:
                    level.found = Found(fingerprint, step.action)
                    return level
                if step.fingerprint in self.explored or explorer._spared(step.state, self.explored):
                    continue
                arrival = Arrival(step.fingerprint, step.state, fingerprint)
                owner = owner_of(step.state, count)
                if owner == self.index:
                    self._keep(arrival, level, state)
                else:
                    level.outboxes.setdefault(owner, []).append(arrival)
        return level

    def receive(self, arrivals: list[Arrival]) -> Level:
        """Take in the successors other workers reached that this one owns, which ends
        the level: the next frontier is whole, and its states whose twin with more
        faults left came later in the level are left out, as the search in one process
        leaves them (``Explorer._unspared``; a state and its twin have one owner)."""
        level = Level()
        for arrival in arrivals:
            self._keep(arrival, level)
        if self.explorer.budget:
            spared = self.explorer._unspared(((w.state, w.fingerprint) for w in self.frontier), self.parents)
            self.frontier = [w for w in self.frontier if w.fingerprint not in spared]
            level.new -= len(spared)
        return level

    def _keep(self, arrival: Arrival, level: Level, before: State | None = None) -> None:
        # ``expand`` left out what the states before a handover spare; these, what this one holds.
        if arrival.fingerprint not in self.parents and not self.explorer._spared(arrival.state, self.parents):
            self.parents[arrival.fingerprint] = arrival.parent
            self.frontier.append(Waiting(arrival.state, arrival.fingerprint, before))
            level.new += 1

    def parent(self, fingerprint: int) -> Owned:
        """Whether this worker owns the state, and the fingerprint of the state it came
        from (None: it is the initial state)."""
        if fingerprint not in self.parents:
            return Owned(False, None)
        return Owned(True, self.parents[fingerprint])


def owner_of(state: State, count: int) -> int:
    """The partition a state belongs to: by the ledger's records (who holds each device),
    so the states that share them stay with one worker, and with them every
    platform-and-ledger pair (judged, planned and renamed once) and most runs of the
    toolstack, which read the records: a successor keeps its parent's records more often
    than its pair, and the worker that learnt an outcome meets it again."""
    return hash(state.ledger.records) % count


class Executor(Protocol):
    """Runs the partitions (seeded before it starts). Each call runs on every partition
    at once and returns each one's answer, in partition order."""

    count: int

    def level(self, deadline: float | None) -> list[Level]: ...
    def parent(self, fingerprint: int) -> int | None: ...  # the fingerprint before, or None
    def close(self) -> float: ...  # the workers' peak memory, MiB in all


def route(expanded: list[Level], count: int) -> list[list[Arrival]]:
    """Every outbox of a level's expansion, gathered by the worker it is addressed to."""
    inboxes: list[list[Arrival]] = [[] for _ in range(count)]
    for level in expanded:
        for owner, arrivals in level.outboxes.items():
            inboxes[owner].extend(arrivals)
        level.outboxes = {}
    return inboxes


def merged(expanded: Level, received: Level) -> Level:
    """One worker's level: what it expanded and what it took in."""
    return Level(
        expanded.transitions + received.transitions,
        expanded.new + received.new,
        expanded.found or received.found,
    )


def _owned(answers: list[Owned]) -> int | None:
    """The answer of the one partition that holds a state (traces are rare: every
    partition is asked)."""
    (found,) = [a for a in answers if a.owned]
    return found.parent


class InProcess:
    """Every partition in this process, one after the other: the partitioning without
    the parallelism (tests compare it with the plain search)."""

    def __init__(self, partitions: list[Partition]) -> None:
        self.count = len(partitions)
        self.partitions = partitions

    def level(self, deadline: float | None) -> list[Level]:
        expanded = [p.expand(deadline) for p in self.partitions]
        inboxes = route(expanded, self.count)
        return [
            merged(e, p.receive(inbox))
            for e, p, inbox in zip(expanded, self.partitions, inboxes, strict=True)
        ]

    def parent(self, fingerprint: int) -> int | None:
        return _owned([p.parent(fingerprint) for p in self.partitions])

    def close(self) -> float:
        return 0.0


class Channel:
    """One direction between two workers. A state is made of parts that recur in state
    after state (platform tables, the ledger, the operations in flight), so each part
    crosses once and is named by its number after that: a state travels as a row of
    small integers, which pickles in microseconds where the whole state takes hundreds.
    The receiver interns what arrives (``intern``): its caches and its memo compare parts
    by identity, and an equal copy of a part it already holds would miss them all. The
    cursors of the operations in flight are interned one by one as well (the states'
    cursors are the one object equal cursors share, ``Explorer._kept``), so the sets of
    them are numbered apart from the other parts."""

    def __init__(self, intern: Callable[[Any], Any] = lambda part: part) -> None:
        self.intern = intern
        self.numbers: dict[Any, int] = {}  # sender: part -> number
        self.parts: list[Any] = []  # receiver: number -> part
        self.flight_numbers: dict[Any, int] = {}  # the same for the sets of operations in flight
        self.flights: list[Any] = []

    @staticmethod
    def number(numbers: dict[Any, int], part: Any, new: list[Any]) -> int:
        found = numbers.get(part)
        if found is None:
            found = numbers[part] = len(numbers)
            new.append(part)
        return found

    def encode(self, arrivals: list[Arrival]) -> bytes:
        new: list[Any] = []
        new_flights: list[Any] = []
        number, numbers, flight_numbers = self.number, self.numbers, self.flight_numbers
        rows = [
            (
                a.fingerprint,
                tuple(number(numbers, part, new) for part in a.state.platform),
                number(numbers, a.state.ledger, new),
                number(flight_numbers, a.state.in_flight, new_flights),
                a.state.faults,
                a.parent,
            )
            for a in arrivals
        ]
        return pickle.dumps((new, new_flights, rows), pickle.HIGHEST_PROTOCOL)

    def decode(self, blob: bytes) -> list[Arrival]:
        new, new_flights, rows = pickle.loads(blob)
        parts, flights, intern = self.parts, self.flights, self.intern
        parts.extend(map(intern, new))
        flights.extend(shared_flights(cursors, intern) for cursors in new_flights)
        return [
            Arrival(
                fingerprint,
                State(
                    intern(SimSnapshot._make(parts[n] for n in platform)),
                    parts[ledger],
                    flights[in_flight],
                    faults,
                ),
                parent,
            )
            for fingerprint, platform, ledger, in_flight, faults, parent in rows
        ]


class WorkerFailed(RuntimeError):
    """A worker process stopped with an error (a bug, or out of memory)."""


def reply(connection: Connection) -> Any:
    """A forked worker's answer, sent as ("ok", value) or ("failed", what went wrong)."""
    try:
        status, value = connection.recv()
    except (EOFError, OSError):
        raise WorkerFailed("a verifier worker exited without answering (killed, or out of memory?)") from None
    if status != "ok":
        raise WorkerFailed(f"a verifier worker failed: {value}")
    return value


Job = TypeVar("Job")


def in_forked_processes(jobs: Sequence[Callable[[], Job]], at_once: int) -> Iterator[Job]:
    """Each job run in a forked process of its own (so its memory and CPU figures are its
    own), ``at_once`` at a time, in the order given; their results in that order, each
    as soon as it and those before it are done."""
    context = multiprocessing.get_context("fork")
    running: dict[Connection, Running] = {}
    done: dict[int, Job] = {}
    started = given = 0
    try:
        while given < len(jobs):
            while started < len(jobs) and len(running) < at_once:
                mine, theirs = context.Pipe(duplex=False)
                process = context.Process(target=_run_job, args=(jobs[started], theirs), daemon=True)
                process.start()
                theirs.close()
                running[mine] = Running(started, process)
                started += 1
            for ready in wait(list(running)):
                assert isinstance(ready, Connection)
                done[running[ready].job] = reply(ready)
                running.pop(ready).process.join()
            while given in done:
                yield done.pop(given)
                given += 1
    finally:
        for unfinished in running.values():
            unfinished.process.terminate()


class Running(NamedTuple):
    """A job in flight: its place among the jobs, and the process running it."""

    job: int
    process: multiprocessing.process.BaseProcess


def _run_job(job: Callable[[], Any], connection: Connection) -> None:
    _failures_reported(lambda: connection.send(("ok", job())), connection)


def _serve(partition: Partition, connection: Connection) -> None:
    """A forked worker: answer the coordinator's requests until told to stop, each
    answer ("ok", value) or ("failed", what went wrong)."""
    _failures_reported(lambda: _answer(partition, connection), connection)


def _failures_reported(work: Callable[[], None], connection: Connection) -> None:
    """Do a forked process's ``work``, sending ("failed", what went wrong) if it raises."""
    try:
        work()
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM reached the parent too, which says so
    except Exception as exc:
        connection.send(("failed", f"{type(exc).__name__}: {exc}"))


def _answer(partition: Partition, connection: Connection) -> None:
    """Outboxes travel as one blob per receiving worker, which the coordinator forwards
    unread."""
    sending = [Channel() for _ in range(partition.count)]
    receiving = [Channel(partition.explorer._shared) for _ in range(partition.count)]
    while True:
        request, argument = connection.recv()
        answer: Any = None
        if request == "expand":
            level = partition.expand(argument)
            blobs = {owner: sending[owner].encode(arrivals) for owner, arrivals in level.outboxes.items()}
            level.outboxes = {}
            answer = (level, blobs)
        elif request == "receive":
            answer = partition.receive(
                [a for source, blob in argument for a in receiving[source].decode(blob)]
            )
        elif request == "parent":
            answer = partition.parent(argument)
        elif request == "stop":
            connection.send(("ok", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
            return
        connection.send(("ok", answer))


class Forked:
    """One forked process per partition, each with its own copy of the explorer (the
    toolstack, the platform and their caches), talking over pipes. Forking keeps one hash
    seed across workers, so a state names the same owner in each."""

    def __init__(self, partitions: list[Partition]) -> None:
        self.count = len(partitions)
        context = multiprocessing.get_context("fork")
        self.connections: list[Connection] = []
        self.processes = []
        for partition in partitions:  # forked as seeded: each takes its frontier along
            mine, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(partition, theirs), daemon=True)
            process.start()
            theirs.close()
            self.connections.append(mine)
            self.processes.append(process)

    def _ask(self, index: int, request: str, argument: Any = None) -> Any:
        self.connections[index].send((request, argument))
        return reply(self.connections[index])

    def level(self, deadline: float | None) -> list[Level]:
        for connection in self.connections:
            connection.send(("expand", deadline))
        answers = [reply(connection) for connection in self.connections]
        inboxes: list[list[tuple[int, bytes]]] = [[] for _ in range(self.count)]
        for source, (_, blobs) in enumerate(answers):
            for owner, blob in blobs.items():
                inboxes[owner].append((source, blob))
        for connection, inbox in zip(self.connections, inboxes, strict=True):
            connection.send(("receive", inbox))
        received = [reply(connection) for connection in self.connections]
        return [merged(expanded, got) for (expanded, _), got in zip(answers, received, strict=True)]

    def parent(self, fingerprint: int) -> int | None:
        return _owned([self._ask(i, "parent", fingerprint) for i in range(self.count)])

    def close(self) -> float:
        """Stop every worker; their peak memory, in MiB, summed (what a failed one used
        is not known)."""
        peaks = 0.0
        for connection in self.connections:
            with contextlib.suppress(WorkerFailed, OSError, EOFError):
                connection.send(("stop", None))
                # A worker that answered a level another one failed in still has that
                # answer pending: the last reply is the one to "stop".
                for _ in range(3):
                    answer = reply(connection)
                    if isinstance(answer, float):
                        peaks += answer
                        break
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
        return peaks


class Handover(NamedTuple):
    """A search begun in one process, handed to the workers at the end of a level: the
    next level's states, every state reached so far with the one it was reached from,
    and the figures and clock so far."""

    frontier: list[tuple[State, int]]  # (state, fingerprint)
    parents: dict[int, int | None]
    stats: Stats
    started: float


def run_partitioned(
    explorer: Explorer,
    executor_of: Callable[[list[Partition]], Executor],
    workers: int,
    handover: Handover | None = None,
) -> Result:
    """The search, split over ``workers`` partitions run by the executor ``executor_of``
    builds, from the initial state or from where a search in one process left off
    (``handover``). The explorer's limits apply between levels and, for time, within one."""
    if handover is None:
        started = time.perf_counter()
        stats = Stats(states=1)
        initial, first = explorer.start()
        if first:
            return explorer._done("violation", stats, started, Counterexample([], first))
        handover = Handover([(initial, hash(initial))], {}, stats, started)
    started, stats, explored = handover.started, handover.stats, handover.parents
    stats.workers = workers
    partitions = [Partition(explorer, i, workers, explored) for i in range(workers)]
    for state, fingerprint in handover.frontier:
        partitions[owner_of(state, workers)].seed(state, fingerprint)
    executor = executor_of(partitions)

    def parent_of(fingerprint: int) -> int | None:
        return explored[fingerprint] if fingerprint in explored else executor.parent(fingerprint)

    try:
        remaining = (
            None if explorer.time_limit is None else explorer.time_limit - (time.perf_counter() - started)
        )
        deadline = None if remaining is None else time.monotonic() + remaining
        while True:
            levels = executor.level(deadline)
            stats.transitions += sum(level.transitions for level in levels)
            new = sum(level.new for level in levels)
            stats.states += new
            stats.depth += 1 if new else 0
            found = [level.found for level in levels if level.found is not None]
            if found:
                chosen = min(found, key=lambda f: f.fingerprint)  # the same one every run
                trace = explorer._trace(parent_of, chosen.fingerprint, chosen.then)
                return explorer._violation(stats, started, trace)
            if deadline is not None and time.monotonic() >= deadline:  # the level may be cut short
                reason = f"--time-limit {explorer.time_limit:g}s"
                return explorer._done("incomplete", stats, started, reason=reason)
            if not new:
                return explorer._done("pass", stats, started)
            if explorer.max_states is not None and stats.states >= explorer.max_states:
                return explorer._done(
                    "incomplete", stats, started, reason=f"--max-states {explorer.max_states}"
                )
            if explorer.on_progress is not None:
                stats.seconds = time.perf_counter() - started
                explorer.on_progress(stats)
    finally:  # the result holds ``stats``: the workers' memory is added to the coordinator's
        stats.peak_rss_mib += executor.close()


__all__ = [
    "Arrival",
    "Channel",
    "Forked",
    "Handover",
    "InProcess",
    "Partition",
    "WorkerFailed",
    "in_forked_processes",
    "run_partitioned",
]
