"""``pciguard snapshot OUT.tar.gz``: what the audit reads, packed for a bug report."""

from __future__ import annotations

from pathlib import Path

import typer

from pciguard.cli.common import input_errors, out
from pciguard.platforms.linux.snapshot import take_snapshot


def command(
    output: Path = typer.Argument(
        ..., help="Where to write the snapshot (.tar.gz).", dir_okay=False, metavar="OUTPUT"
    ),
    root: Path = typer.Option(
        Path("/"), "--root", help="Read the sysfs and /proc tree under this directory.", metavar="DIR"
    ),
) -> None:
    """Capture the sysfs, /proc and ACPI files the audit reads, without serial numbers,
    so that `pciguard audit --snapshot FILE` gives the same report elsewhere."""
    with input_errors():
        summary = take_snapshot(str(root), output)
    out.print(
        f"wrote {summary.path}: {summary.functions} PCI functions, {summary.files} files, "
        f"{summary.links} links; left out or zeroed: {len(summary.scrubbed)} serial number(s)"
    )
    out.print(f"reproduce the report with: pciguard audit --snapshot {summary.path}")
