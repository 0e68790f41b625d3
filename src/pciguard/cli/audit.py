"""``pciguard audit``: what can be safely given to a VM, group by group, and why."""

from __future__ import annotations

import gc
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from pciguard.checks import Options, RmrrPolicy
from pciguard.cli.common import STATE_DIR, Exit, emit_json, err, error, input_errors, linux_reading, out
from pciguard.pciids import name_devices
from pciguard.report import (
    AuditReport,
    DeviceEntry,
    GroupEntry,
    Severity,
    Verdict,
    audit,
    audit_host,
    linux_holder,
)
from pciguard.toolstack import Toolstack

VERDICT_STYLE = {
    Verdict.READY: "bold green",
    Verdict.READY_AFTER_QUARANTINE: "yellow",
    Verdict.NOT_ASSIGNABLE: "bold red",
    Verdict.BRIDGES_ONLY: "dim",
}
SEVERITY_STYLE = {Severity.CRITICAL: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def command(
    platform: Path | None = typer.Option(
        None,
        "--platform",
        "-p",
        help="Audit a platform description file (YAML) instead of this host.",
        dir_okay=False,
        metavar="FILE",
    ),
    root: Path | None = typer.Option(
        None,
        "--root",
        help="Audit the sysfs and /proc tree under this directory instead of /.",
        file_okay=False,
        exists=True,
        metavar="DIR",
    ),
    snapshot: Path | None = typer.Option(
        None,
        "--snapshot",
        help="Audit a snapshot taken by `pciguard snapshot` (.tar.gz).",
        dir_okay=False,
        metavar="FILE",
    ),
    lspci: Path | None = typer.Option(
        None,
        "--lspci",
        help="Audit the text of `lspci -vvv` (- for standard input).",
        dir_okay=False,
        metavar="FILE",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    svg: Path | None = typer.Option(
        None, "--svg", help="Also draw the topology, groups coloured by verdict.", metavar="FILE"
    ),
    show_all: bool = typer.Option(False, "--all", help="Also list groups of bridges only."),
    allow_unsafe_interrupts: bool = typer.Option(
        False,
        "--allow-unsafe-interrupts",
        help="UNSAFE: judge as if assignment without interrupt isolation were allowed.",
    ),
    rmrr: RmrrPolicy = typer.Option(
        RmrrPolicy.STRICT, "--rmrr", help="Policy for firmware 1:1 regions.", metavar="POLICY"
    ),
    state_dir: Path = STATE_DIR,
) -> None:
    """Audit this host (or a file describing one): IOMMU findings, then every IOMMU
    group with its verdict and the reasons for it.
    """
    chosen = [
        name
        for name, v in (
            ("--platform", platform),
            ("--root", root),
            ("--snapshot", snapshot),
            ("--lspci", lspci),
        )
        if v
    ]
    if len(chosen) > 1:
        error(f"choose one source to audit, not {' and '.join(chosen)}")
        raise typer.Exit(Exit.BAD_INPUT)
    options = Options(allow_unsafe_interrupts=allow_unsafe_interrupts, rmrr=rmrr)
    # One short pass that allocates an object or more per attribute read and frees
    # nothing early: the cyclic collector would only slow it (10-20% on 10,000 functions).
    gc.disable()
    with input_errors():
        if platform is not None:
            from pciguard.formats.platform_file import load_platform  # only for a simulated host
            from pciguard.platforms.sim import SimPlatform

            host = load_platform(platform)
            report = audit(Toolstack(SimPlatform(host), options), str(platform))
        else:
            reading, source = linux_reading(root, snapshot, lspci)
            if reading.facts.xen is not None and snapshot is None and lspci is None:
                from pciguard.platforms.xen.dom0 import with_journal

                reading = with_journal(reading, state_dir)
            host = name_devices(reading.host)
            holder = linux_holder(host, reading.facts)
            report = audit_host(host, options, source, holder, facts=reading.facts)
        if svg is not None:
            from pciguard.draw import write_svg

            write_svg(report, svg)
            err.print(f"drew the topology to {svg}")  # stderr: the report (JSON too) stays whole
    if json_output:
        emit_json(report.model_dump_json(indent=2))
    else:
        render(report, show_all)
    if report.critical:
        raise typer.Exit(Exit.FINDINGS)


def render(report: AuditReport, show_all: bool = False) -> None:
    out.print(
        Text.assemble(("pciguard audit", "bold"), f" of {report.host} ({report.arch}) from {report.source}")
    )
    facts = [
        f"IOMMU {u.name}: DMA remapping {u.dma_remapping}, interrupt remapping {u.interrupt_remapping}"
        + (f", MSIs through {u.msi_controller}" if u.msi_controller else "")
        for u in report.iommus
    ]
    fw = report.firmware
    if fw and fw.table:
        flags = ", ".join(fw.flags) or "none"
        facts.append(f"firmware {fw.table}: {fw.units} remapping unit(s), flags: {flags}")
    if facts:
        out.print()
        for line in facts:
            out.print(line)
    if report.findings:
        out.print()
        for f in report.findings:
            out.print(
                Text.assemble((f"{f.severity.value.upper():8}", SEVERITY_STYLE[f.severity]), " ", f.message)
            )
    if report.limitations:
        out.print()
        for lim in report.limitations:
            out.print(Text.assemble(("UNREAD  ", "magenta"), f"{lim.path} ({lim.why}): hides {lim.hides}"))
    title = "IOMMU groups"
    if any(g.planned for g in report.groups):
        title = "IOMMU groups if the IOMMU were on (planning: derived by pciguard)"
    table = Table(title=title, show_lines=True, title_justify="left")
    table.add_column("group", justify="right")
    table.add_column("devices (owner)")
    table.add_column("verdict")
    table.add_column("why / what must go with it")
    shown = [g for g in report.groups if show_all or g.verdict is not Verdict.BRIDGES_ONLY]
    for run in _vf_runs(shown):
        g = run[0]
        if len(run) == 1:
            devices = "\n".join(f"{m.bdf} {m.name or m.ids + ' ' + m.kind} ({_owner(m)})" for m in g.members)
            number = "none" if g.number is None else str(g.number)
        else:  # a PF's virtual functions in groups of their own, all judged alike: one row
            first, last = run[0].members[0], run[-1].members[0]
            devices = (
                f"{len(run)} virtual functions of {first.physfn}: {first.bdf} ... {last.bdf}\n"
                f"{first.name or first.ids} ({_owner(first)})"
            )
            number = f"{g.number}-{run[-1].number}"
        if g.verdict is Verdict.NOT_ASSIGNABLE:
            why = "\n".join(f"- {r.message}" for r in g.reasons)
        elif g.must_quarantine:
            why = "quarantine together: " + ", ".join(g.must_quarantine)
        else:
            why = ""
        why = "\n".join([why, *(f"note: {n.message}" for n in g.notes)]).strip()
        if len(run) > 1 and why:
            why += f"\n(shown for {first.bdf}; the same holds for each)"
        if g.domain:
            number += f"\n{g.domain}"
        table.add_row(number, devices, Text(g.verdict.value.replace("-", " "), VERDICT_STYLE[g.verdict]), why)
    out.print()
    out.print(table)
    counts = {v: sum(g.verdict is v for g in report.groups) for v in Verdict}
    out.print(
        ", ".join(f"{n} {v.value}" for v, n in counts.items() if n)
        + ("" if show_all else " (groups of bridges only: --all)")
    )
    if report.unsafe_overrides:
        err.print(Text("UNSAFE overrides in force: " + "; ".join(report.unsafe_overrides), "bold red"))


def _vf_runs(groups: list[GroupEntry]) -> list[list[GroupEntry]]:
    """Consecutive single-VF groups of one PF with the same verdict, reasons and notes."""

    def key(g: GroupEntry) -> tuple[object, ...] | None:
        if len(g.members) != 1 or g.members[0].physfn is None or g.number is None:
            return None
        m = g.members[0]
        return (
            m.physfn,
            m.name,
            m.ids,
            _owner(m),
            g.verdict,
            g.domain,
            [r.code for r in g.reasons],
            [n.code for n in g.notes],
        )

    runs: list[list[GroupEntry]] = []
    for g in groups:
        k = key(g)
        if runs and k is not None and key(runs[-1][-1]) == k:
            runs[-1].append(g)
        else:
            runs.append([g])
    return runs


def _owner(m: DeviceEntry) -> str:
    if m.state == "host":
        return f"host: {m.driver}" if m.driver else "host, no driver"
    return f"{m.state} {m.vm}" if m.vm else m.state
