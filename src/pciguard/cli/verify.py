"""``pciguard verify``: explore every interleaving a scenario allows; print the
shortest trace to a violation and write it as a scenario ``simulate`` replays."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import typer
from rich.live import Live
from rich.text import Text

from pciguard.cli.common import Exit, emit_json, err, error, input_errors, out

if TYPE_CHECKING:  # imported when the command runs: every pciguard start would pay for them
    from pciguard.formats.scenario_file import Scenario
    from pciguard.verify.explorer import Result, Stats

#: ``--workers auto``: how long a search runs in this process before it hands over to the
#: workers. Forking and warming them up costs about a tenth of a second: a scenario that
#: finishes sooner (every legacy flaw, the small reference ones) never pays it.
HAND_OVER_AFTER = 0.2
MAX_WORKERS = 64
#: ``--workers auto`` takes at most so many cores: each worker keeps caches of its own
#: (up to about 600 MiB on a long search), and more were never measured.
AUTO_WORKERS = 4


def command(
    scenarios: list[Path] = typer.Argument(
        ...,
        help="Scenario files with an 'explore' section; several are explored one per core at once "
        "(--workers N: N at a time; --workers 1: one after another).",
        dir_okay=False,
        metavar="SCENARIO",
    ),
    symmetry: bool = typer.Option(
        True,
        "--symmetry/--no-symmetry",
        help="Merge states that differ only by interchangeable devices or VMs.",
    ),
    independence: bool = typer.Option(
        True,
        "--independence/--no-independence",
        help="Advance only one of several operations that touch disjoint devices and VMs.",
    ),
    messages: bool = typer.Option(
        True,
        "--messages/--no-messages",
        help="Merge states whose operations in flight differ only in the words of a failure.",
    ),
    budget: bool = typer.Option(
        True,
        "--budget/--no-budget",
        help="Leave out a state whose twin with more faults left is reached at its depth or nearer.",
    ),
    memo: bool = typer.Option(
        True,
        "--memo/--no-memo",
        help="Run a transition once for each set of values it reads; others reuse its outcome (exact).",
    ),
    max_states: int | None = typer.Option(
        None, "--max-states", min=1, help="Stop after this many states (each scenario).", metavar="N"
    ),
    time_limit: float | None = typer.Option(
        None, "--time-limit", min=0.1, help="Stop after this many seconds (each scenario).", metavar="SECONDS"
    ),
    workers: str = typer.Option(
        "auto",
        "--workers",
        help="Explore with this many processes (Linux: forked): one scenario's states shared among "
        "them, or, with several scenarios, one scenario each. auto: one per core (at most "
        f"{AUTO_WORKERS}), a scenario handed to them once its search has run {HAND_OVER_AFTER:g} s "
        "(small ones finish first).",
        metavar="N|auto",
    ),
    out_file: Path | None = typer.Option(
        None,
        "--out",
        help="Where to write a counterexample (default: NAME-counterexample.yaml here); "
        "with several scenarios, a directory to write them in.",
        metavar="FILE|DIR",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print the verdict as JSON (several scenarios: a list, one each)."
    ),
) -> None:
    """Explore every interleaving of operations, failures, crashes and hot-plugs."""
    from pciguard.formats.scenario_file import load_scenario

    if len(scenarios) > 1 and out_file is not None and not out_file.is_dir():
        raise typer.BadParameter(
            f"{out_file} is not a directory: with several scenarios, --out names where to write "
            "their counterexamples",
            param_hint="--out",
        )
    processes, hand_over_after = _workers(workers)
    from pciguard.verify import NOT_COMPILED
    from pciguard.verify.compiled import required

    refusal = required(NOT_COMPILED)
    if refusal is not None:
        error(refusal)
        raise typer.Exit(Exit.BAD_INPUT)
    loaded = []
    with input_errors():  # every file is read before any search: a typo fails at once
        for path in scenarios:
            scenario = load_scenario(path)
            if scenario.explore is None:
                raise typer.BadParameter(f"{path} has no 'explore' section", param_hint="SCENARIO")
            loaded.append(scenario)
    settings = Settings(
        symmetry, independence, messages, budget, memo, max_states, time_limit, processes, hand_over_after
    )
    codes, reports = [], []
    several = len(scenarios) > 1
    explored = _explored(loaded, settings, progress=err.is_terminal and not json_output)
    for path, scenario, found in zip(scenarios, loaded, explored, strict=True):
        result, document = found
        if several and not json_output:
            out.print(Text(f"{path}:", "bold"))
        written = None
        if document is not None:
            written = (
                (out_file or Path()) / f"{scenario.name}-counterexample.yaml"
                if several
                else out_file or Path(f"{scenario.name}-counterexample.yaml")
            )
            written.write_text(document, encoding="utf-8")
        used = 1 if several else result.stats.workers  # several scenarios: one process each
        if not json_output:
            _render(found, written, settings, used)
        reports.append({"scenario": str(path), **_as_json(result, written, used)})
        codes.append(_exit_code(result, scenario.expect_violations))
    if json_output:
        emit_json(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    elif several:
        verdicts = [str(r["verdict"]) for r in reports]
        tally = ", ".join(
            f"{verdicts.count(v)} {v}" for v in ("pass", "violation", "incomplete") if v in verdicts
        )
        out.print(f"{len(scenarios)} scenarios: {tally}")
    raise typer.Exit(_worst(codes))


class Settings(NamedTuple):
    """How every scenario of one ``pciguard verify`` is explored: the explorer's
    keyword arguments."""

    symmetry: bool
    independence: bool
    messages: bool
    budget: bool
    memo: bool
    max_states: int | None
    time_limit: float | None
    workers: int
    hand_over_after: float | None  # with workers: seconds in this process first (None: none)


def _workers(value: str) -> tuple[int, float | None]:
    """``--workers``: how many processes, and how long a search runs in this one before
    it hands over to them (auto: one per core this process may run on, at most
    ``AUTO_WORKERS``, after ``HAND_OVER_AFTER``; a number: from the start)."""
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    if value == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        count = min(cores, AUTO_WORKERS) if can_fork else 1
        return count, HAND_OVER_AFTER if count > 1 else None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise typer.BadParameter(
            f"{value!r} is neither 'auto' nor a number of processes from 1 to {MAX_WORKERS}",
            param_hint="--workers",
        )
    if count > 1 and not can_fork:
        raise typer.BadParameter(
            "this system cannot fork worker processes; use --workers 1", param_hint="--workers"
        )
    return count, None


class Explored(NamedTuple):
    """One scenario's search: its result, and its counterexample (if it found one) as a
    scenario ``simulate`` replays."""

    result: Result
    counterexample: str | None


def _explored(scenarios: list[Scenario], settings: Settings, progress: bool) -> Iterator[Explored]:
    """Each scenario's search, in order. Several with more than one worker: each is
    explored by a forked process of its own (its figures its own), ``workers`` at a
    time; otherwise one after another here, a search's workers sharing its states."""
    if len(scenarios) > 1 and settings.workers > 1:
        from pciguard.verify.partitioned import in_forked_processes

        alone = settings._replace(workers=1)
        jobs = [partial(_explore, scenario, alone, progress=False) for scenario in scenarios]
        yield from in_forked_processes(jobs, settings.workers)
        return
    for scenario in scenarios:
        yield _explore(scenario, settings, progress)


def _explore(scenario: Scenario, settings: Settings, progress: bool) -> Explored:
    """Explore one scenario (with a live progress line on the terminal, if ``progress``)."""
    from pciguard.verify.counterexample import dump, scenario_document
    from pciguard.verify.explorer import Explorer

    explorer = Explorer(scenario, **settings._asdict())
    # Refreshed by the search itself: a refreshing thread would be running when workers fork.
    live = Live(Text(""), console=err, transient=True, auto_refresh=False)
    if progress:
        explorer.on_progress = lambda stats: live.update(Text(_progress(stats)), refresh=True)
        with live:
            result = explorer.run()
    else:
        result = explorer.run()
    if result.counterexample is None:
        return Explored(result, None)
    keys, _ = explorer.replay(result.counterexample.actions)
    return Explored(result, dump(scenario_document(scenario, result.counterexample, keys)))


def _worst(codes: list[int]) -> int:
    """One exit code for several scenarios: an unexpected violation first, then an
    expectation unmet, then a search a limit stopped."""
    for code in (Exit.FINDINGS, Exit.UNMET, Exit.INCOMPLETE):
        if code in codes:
            return code
    return Exit.OK


def _exit_code(result: Result, expected: frozenset[str] | None) -> int:
    if result.verdict == "incomplete":
        return Exit.INCOMPLETE
    broken = {v.invariant for v in result.counterexample.violations} if result.counterexample else set()
    if not expected:
        return Exit.FINDINGS if broken else Exit.OK
    if not broken:
        return Exit.UNMET
    return Exit.OK if broken <= expected else Exit.FINDINGS


def _progress(stats: Stats) -> str:
    return (
        f"exploring: {stats.states:,} states, {stats.transitions:,} transitions, "
        f"depth {stats.depth}, {stats.states_per_second:,.0f} states/s, {stats.seconds:.1f} s"
    )


def _figures(stats: Stats) -> dict[str, float | int]:
    return {
        "states": stats.states,
        "transitions": stats.transitions,
        "depth": stats.depth,
        "seconds": round(stats.seconds, 3),
        "states_per_second": round(stats.states_per_second),
        "peak_rss_mib": round(stats.peak_rss_mib, 1),
    }


def _as_json(result: Result, written: Path | None, workers: int) -> dict[str, object]:
    from pciguard.verify import NOT_COMPILED

    found = result.counterexample
    return {
        "verdict": result.verdict,
        "reason": result.reason,
        **_figures(result.stats),
        "workers": workers,
        "compiled": NOT_COMPILED is None,
        "why_not_compiled": NOT_COMPILED,
        "counterexample": None
        if found is None
        else {
            "file": str(written),
            "trace": [str(a) for a in found.actions],
            "violations": [
                {"invariant": v.invariant, "device": str(v.device), "message": v.message}
                for v in found.violations
            ],
        },
    }


def _render(explored: Explored, written: Path | None, settings: Settings, workers: int) -> None:
    result = explored.result
    stats = result.stats
    reductions_on = {
        "symmetry": settings.symmetry,
        "independence": settings.independence,
        "messages": settings.messages,
        "budget": settings.budget,
    }
    reductions = ", ".join(name for name, on in reductions_on.items() if on)
    from pciguard.verify import NOT_COMPILED

    out.print(
        f"{stats.states:,} distinct states, {stats.transitions:,} transitions, depth "
        f"{stats.depth}, {stats.seconds:.2f} s ({stats.states_per_second:,.0f} states/s), "
        f"peak memory {stats.peak_rss_mib:.0f} MiB; reductions: {reductions or 'none'}"
        + (f"; {workers} workers" if workers > 1 else "")
        + ("" if NOT_COMPILED is None else f"; run as Python: {NOT_COMPILED}")
    )
    if result.verdict == "pass":
        out.print(Text("PASS: every invariant holds in every reachable state", "bold green"))
        return
    if result.verdict == "incomplete":
        out.print(Text(f"INCOMPLETE: stopped by {result.reason}; no violation so far", "bold yellow"))
        return
    assert result.counterexample is not None and explored.counterexample is not None and written is not None
    out.print(Text(f"VIOLATION after {len(result.counterexample.actions)} steps:", "bold red"))
    for v in result.counterexample.violations:
        out.print(Text(f"  {v}", "red"))
    from pciguard.cli.simulate import render as render_timeline
    from pciguard.formats.scenario_file import parse_scenario
    from pciguard.simulate import run as replay

    out.print(f"Counterexample written to {written}; replay it with: pciguard simulate {written}\n")
    with input_errors():
        # replayed from the document as written, not read back: the file may be /dev/null
        replayed = replay(parse_scenario(explored.counterexample, str(written), written.parent))
    render_timeline(replayed, show_calls=True)
