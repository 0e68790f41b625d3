"""``pciguard audit``: what can be safely given to a VM, group by group, and why."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from pciguard.checks import HOST_CRITICAL, Options, RmrrPolicy
from pciguard.cli.common import STATE_DIR, Exit, emit_json, err, error, input_errors, linux_reading, out
from pciguard.model.pci import UNKNOWN_IDS
from pciguard.pciids import name_devices, short_name
from pciguard.report import (
    BRIDGE_KINDS,
    REASON_LABELS,
    AuditReport,
    DeviceEntry,
    GroupEntry,
    ReasonEntry,
    Severity,
    Verdict,
    audit,
    audit_host,
    first_clause,
    linux_holder,
    report_json,
)

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
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Every reason and note in full, and what each unread source hides."
    ),
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
            from pciguard.toolstack import Toolstack

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
        emit_json(report_json(report))
    else:
        render(report, show_all, verbose)
    if report.critical:
        raise typer.Exit(Exit.FINDINGS)


def render(report: AuditReport, show_all: bool = False, verbose: bool = False) -> None:
    """The report for a person: host-wide findings once at the top, then one short row
    per group. ``verbose`` gives every reason and note in full."""
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
    _render_limitations(report, verbose)
    shown = [g for g in report.groups if show_all or g.verdict is not Verdict.BRIDGES_ONLY]
    short = _short_bdfs(report) if not verbose else str
    host_wide = set() if verbose else _host_wide(shown)
    if host_wide:
        out.print()
        for template in sorted(host_wide):
            out.print(
                Text.assemble(("EVERY   ", "bold red"), short(template.replace(_DEVICE, "each device")))
            )
    title = "IOMMU groups"
    if any(g.planned for g in report.groups):
        title = "IOMMU groups if the IOMMU were on (planning: derived by pciguard)"
    table = Table(
        title=title,
        title_justify="left",
        show_lines=verbose,
        box=box.HEAVY_HEAD if verbose else box.SIMPLE_HEAD,
        show_edge=verbose,
        padding=(0, 1),
    )
    table.add_column("group", justify="right")
    if verbose:
        table.add_column("devices (owner)")
        table.add_column("verdict")
        table.add_column("why / what must go with it")
    else:  # the verdict heads its reasons, which are short: the width goes to the names
        table.add_column("devices (owner, if not the host)")
        table.add_column("verdict: why", max_width=max(40, out.width * 2 // 5))
    for run in _vf_runs(shown):
        g = run[0]
        if len(run) == 1:
            devices = "\n".join(_device_line(m, short, verbose) for m in g.members)
            number = "none" if g.number is None else str(g.number)
        else:  # a PF's virtual functions in groups of their own, all judged alike: one row
            first, last = run[0].members[0], run[-1].members[0]
            devices = (
                f"{len(run)} virtual functions of {short(first.physfn or '')}: "
                f"{short(first.bdf)} ... {short(last.bdf)}\n" + _device_line(first, short, verbose, bdf=False)
            )
            number = f"{g.number}-{run[-1].number}"
        why = _why(g, verbose, host_wide, short)
        if len(run) > 1 and why:
            why += f"\n(shown for {short(first.bdf)}; the same holds for each)"
        if g.domain:
            number += f"\n{g.domain}"
        verdict = Text(g.verdict.value.replace("-", " "), VERDICT_STYLE[g.verdict])
        if verbose:
            table.add_row(number, devices, verdict, why)
        else:
            table.add_row(number, devices, Text.assemble(verdict, "\n" + why if why else ""))
    out.print()
    out.print(table)
    counts = {v: sum(g.verdict is v for g in report.groups) for v in Verdict}
    out.print(
        ", ".join(f"{n} {v.value}" for v, n in counts.items() if n)
        + ("" if show_all else " (groups of bridges only: --all)")
        + ("" if verbose else "; every reason in full: --verbose")
    )
    if report.unsafe_overrides:
        err.print(Text("UNSAFE overrides in force: " + "; ".join(report.unsafe_overrides), "bold red"))


def _render_limitations(report: AuditReport, verbose: bool) -> None:
    """What could not be read: each with what it hides (verbose), or one line per cause."""
    if not report.limitations:
        return
    out.print()
    if verbose:
        for lim in report.limitations:
            out.print(Text.assemble(("UNREAD  ", "magenta"), f"{lim.path} ({lim.why}): hides {lim.hides}"))
        return
    causes: dict[tuple[str, str], list[str]] = {}
    for lim in report.limitations:
        causes.setdefault((lim.path, lim.why), []).append(lim.hides.split(": ")[0])
    for (path, why), hidden in causes.items():
        out.print(Text.assemble(("UNREAD  ", "magenta"), f"{path} ({why}): hides {'; '.join(hidden)}"))


# A reason names the device it is about; with that name taken out, the same words for
# every device shown are one host-wide reason, said once above the table.
_DEVICE = "\x00device\x00"


def _template(reason: ReasonEntry, members: list[DeviceEntry]) -> tuple[str, str | None]:
    """The reason's words with the member it is about taken out, and that member."""
    for m in members:
        if m.bdf in reason.message:
            return reason.message.replace(m.bdf, _DEVICE), m.bdf
    return reason.message, None


def _host_wide(groups: list[GroupEntry]) -> set[str]:
    """Reasons given, in the same words, for every device of every group shown."""
    endpoints = [m for g in groups for m in g.members if m.kind not in BRIDGE_KINDS]
    if len(endpoints) < 2:
        return set()
    common: set[str] | None = None
    for m in endpoints:
        mine = {t for r in m.reasons for t, subject in [_template(r, [m])] if subject is not None}
        common = mine if common is None else common & mine
        if not common:
            return set()
    return common or set()


def _why(g: GroupEntry, verbose: bool, host_wide: set[str], short: Callable[[str], str]) -> str:
    lines = []
    if g.verdict is Verdict.NOT_ASSIGNABLE:
        lines = [f"- {r.message}" for r in g.reasons] if verbose else _short_reasons(g, host_wide, short)
    elif g.must_quarantine:
        lines = ["quarantine together: " + ", ".join(map(short, g.must_quarantine))]
    # A missing-ACS note's first clause says it all ("00:14 is a multi-function device
    # without ACS"); other notes need their whole sentence.
    for n in g.notes:
        said = n.message if verbose else short(first_clause(n.message) if n.code == "no-acs" else n.message)
        lines.append(f"note: {said}")
    return "\n".join(lines)


def _short_reasons(g: GroupEntry, host_wide: set[str], short: Callable[[str], str]) -> list[str]:
    """Each kind of reason once, with the devices it holds for ("no reset method: 00:14.0,
    00:14.2"); those said above the table for every device, left out."""
    said: dict[str, list[str]] = {}
    for r in g.reasons:
        template, subject = _template(r, g.members)
        if template in host_wide:
            continue
        if r.code in REASON_LABELS:
            said.setdefault(REASON_LABELS[r.code], []).extend([short(subject)] if subject else [])
        else:  # its own words, shortened (a host-critical device's reason is its whole point)
            words = template if r.code == HOST_CRITICAL else first_clause(template)
            said.setdefault(short(words.replace(_DEVICE, subject or "")), [])
    lines = [f"- {label}" + (f": {', '.join(who)}" if who else "") for label, who in said.items()]
    return lines or (["- see EVERY above"] if g.reasons else [])


def _short_bdfs(report: AuditReport) -> Callable[[str], str]:
    """Addresses without the PCI domain when every device is in domain 0000, as lspci prints them."""
    if all(m.bdf.startswith("0000:") for g in report.groups for m in g.members):
        return lambda text: text.replace("0000:", "")
    return lambda text: text


def _device_line(m: DeviceEntry, short: Callable[[str], str], verbose: bool, bdf: bool = True) -> str:
    name = (m.name if verbose else short_name(m.name)) or m.kind
    ids = "" if m.ids == UNKNOWN_IDS or m.ids in name else f" [{m.ids}]"
    owner = f" ({_owner(m)})" if verbose or m.state != "host" else ""  # the host's drivers: --verbose
    return f"{short(m.bdf) + ' ' if bdf else ''}{name}{ids}{owner}"


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
