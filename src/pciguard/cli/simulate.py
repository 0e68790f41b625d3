"""``pciguard simulate``: replay a scenario and print its timeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.text import Text

from pciguard.cli.common import Exit, emit_json, input_errors, out

if TYPE_CHECKING:  # imported when the command runs: every pciguard start would pay for it
    from pciguard.simulate import SimulationResult

STATUS_STYLE = {
    "ok": "green",
    "refused": "yellow",
    "failed": "red",
    "misuse": "bold red",
    "landed": "bold magenta",
    "blocked": "green",
    "delivered": "bold magenta",
}


def command(
    scenario: Path = typer.Argument(..., help="A scenario file (YAML).", dir_okay=False, metavar="SCENARIO"),
    json_output: bool = typer.Option(False, "--json", help="Print the timeline as JSON."),
    show_calls: bool = typer.Option(False, "--calls", help="Show every platform call."),
) -> None:
    """Replay a scenario on the simulated platform, checking every invariant after
    every platform call.
    """
    from pciguard.formats.scenario_file import load_scenario
    from pciguard.simulate import run

    with input_errors():
        loaded = load_scenario(scenario)
    result = run(loaded)
    if json_output:
        emit_json(json.dumps(as_json(result), indent=2))
    else:
        render(result, show_calls)
    expected = result.scenario.expect_violations or frozenset()
    if result.broken_invariants - expected:
        raise typer.Exit(Exit.FINDINGS)
    if not result.as_expected:
        raise typer.Exit(Exit.UNMET)


def as_json(result: SimulationResult) -> dict[str, object]:
    return {
        "scenario": result.scenario.name,
        "platform": result.scenario.host.name,
        "flaws": sorted(f.value for f in result.scenario.options.flaws),
        "unsafe_overrides": result.unsafe,
        "timeline": [
            {
                "index": e.index,
                "step": str(e.step),
                "line": e.step.line,
                "status": e.status,
                "outcome": e.outcome,
                "expectation_met": e.expectation_met,
                "calls": [str(c) for c in e.calls],
                "violations": [
                    {"invariant": v.invariant, "device": str(v.device), "message": v.message}
                    for v in e.violations
                ],
            }
            for e in result.timeline
        ],
        "violations": len(result.violations),
        "broken_invariants": sorted(result.broken_invariants),
        "expected_violations": sorted(result.scenario.expect_violations or ()),
        "unmet_expectations": len(result.unmet),
        "as_expected": result.as_expected,
    }


def render(result: SimulationResult, show_calls: bool) -> None:
    sc = result.scenario
    flaws = ", ".join(sorted(f.value for f in sc.options.flaws)) or "none (secure)"
    out.print(
        Text.assemble(
            ("pciguard simulate", "bold"),
            f" {sc.name} on {sc.host.name}; quarantine {sc.quarantine_mode}; legacy flaws: {flaws}",
        )
    )
    for e in result.timeline:
        mark = {True: " ✓ expected", False: " ✗ NOT AS EXPECTED", None: ""}[e.expectation_met]
        out.print(
            Text.assemble(
                f"{e.index:>3}  {e.step}  ",
                (e.status.upper(), STATUS_STYLE[e.status]),
                f"  {e.outcome}",
                (mark, "red" if e.expectation_met is False else "green"),
            )
        )
        if show_calls:
            for c in e.calls:
                out.print(f"       · {c}", style="dim")
        for v in e.violations:
            out.print(Text(f"       VIOLATION {v}", "bold red"))
    for u in result.unsafe:
        out.print(Text(f"UNSAFE: {u}", "bold red"))
    n = len(result.violations)
    summary = f"{n} invariant violation(s), {len(result.unmet)} unmet expectation(s)"
    if result.scenario.expect_violations is not None:
        expected = ", ".join(sorted(result.scenario.expect_violations)) or "none"
        summary += f"; expected to break: {expected}"
    verdict = "as expected" if result.as_expected else "NOT as expected"
    out.print(Text(f"{summary} -> {verdict}", "bold" if result.as_expected else "bold red"))
