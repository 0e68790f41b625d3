"""``pciguard audit``: what can be safely given to a VM, group by group, and why."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from pciguard.checks import Options, RmrrPolicy
from pciguard.cli.common import Exit, err, input_errors, out
from pciguard.formats.platform_file import load_platform
from pciguard.platforms.sim import SimPlatform
from pciguard.report import AuditReport, DeviceEntry, Severity, Verdict, audit
from pciguard.toolstack import Toolstack

VERDICT_STYLE = {
    Verdict.READY: "bold green",
    Verdict.READY_AFTER_QUARANTINE: "yellow",
    Verdict.NOT_ASSIGNABLE: "bold red",
    Verdict.BRIDGES_ONLY: "dim",
}
SEVERITY_STYLE = {Severity.CRITICAL: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def command(
    platform: Path = typer.Option(
        ...,
        "--platform",
        "-p",
        help="A platform description file (YAML) to audit.",
        exists=False,
        dir_okay=False,
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    show_all: bool = typer.Option(False, "--all", help="Also list groups of bridges only."),
    allow_unsafe_interrupts: bool = typer.Option(
        False,
        "--allow-unsafe-interrupts",
        help="UNSAFE: judge as if assignment without interrupt isolation were allowed.",
    ),
    rmrr: RmrrPolicy = typer.Option(RmrrPolicy.STRICT, "--rmrr", help="Policy for firmware 1:1 regions."),
) -> None:
    """Audit a host: IOMMU findings, then every IOMMU group with its verdict.

    Exit codes: 0 the host can isolate devices; 1 critical findings (no IOMMU, no
    interrupt isolation, an unsafe override in force); 2 malformed input.
    """
    with input_errors():
        host = load_platform(platform)
    options = Options(allow_unsafe_interrupts=allow_unsafe_interrupts, rmrr=rmrr)
    toolstack = Toolstack(SimPlatform(host), options)
    report = audit(toolstack, str(platform))
    if json_output:
        out.print_json(report.model_dump_json())
    else:
        render(report, show_all)
    if report.critical:
        raise typer.Exit(Exit.FINDINGS)


def render(report: AuditReport, show_all: bool = False) -> None:
    out.print(
        Text.assemble(("pciguard audit", "bold"), f" of {report.host} ({report.arch}) from {report.source}")
    )
    if report.findings:
        out.print()
        for f in report.findings:
            out.print(
                Text.assemble((f"{f.severity.value.upper():8}", SEVERITY_STYLE[f.severity]), " ", f.message)
            )
    table = Table(title="IOMMU groups", show_lines=True, title_justify="left")
    table.add_column("group", justify="right")
    table.add_column("devices (owner)")
    table.add_column("verdict")
    table.add_column("why / what must go with it")
    for g in report.groups:
        if g.verdict is Verdict.BRIDGES_ONLY and not show_all:
            continue
        devices = "\n".join(f"{m.bdf} {m.name or m.kind} ({_owner(m)})" for m in g.members)
        if g.verdict is Verdict.NOT_ASSIGNABLE:
            why = "\n".join(f"- {r.message}" for r in g.reasons)
        elif g.must_quarantine:
            why = "quarantine together: " + ", ".join(g.must_quarantine)
        else:
            why = ""
        table.add_row(
            str(g.number), devices, Text(g.verdict.value.replace("-", " "), VERDICT_STYLE[g.verdict]), why
        )
    out.print()
    out.print(table)
    counts = {v: sum(g.verdict is v for g in report.groups) for v in Verdict}
    out.print(
        ", ".join(f"{n} {v.value}" for v, n in counts.items() if n)
        + ("" if show_all else " (groups of bridges only: --all)")
    )
    if report.unsafe_overrides:
        err.print(Text("UNSAFE overrides in force: " + "; ".join(report.unsafe_overrides), "bold red"))


def _owner(m: DeviceEntry) -> str:
    if m.state == "host":
        return f"host: {m.driver}" if m.driver else "host, no driver"
    return f"{m.state} {m.vm}" if m.vm else m.state
