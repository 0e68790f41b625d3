"""``pciguard quarantine``, ``unquarantine`` and ``journal``: change a Linux host."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.text import Text

from pciguard.cli.common import Exit, err, input_errors, out
from pciguard.errors import RefusedError, StepFailed
from pciguard.model import Bdf
from pciguard.platforms.linux.enforce import Enforcer, Result
from pciguard.platforms.linux.journal import DEFAULT_STATE_DIR, Journal, JournalError

ROOT = typer.Option(Path("/"), "--root", help="Act on the sysfs tree under this directory.")
STATE_DIR = typer.Option(
    DEFAULT_STATE_DIR, "--state-dir", envvar="PCIGUARD_STATE_DIR", help="Where the journal lives."
)
DEVICE = typer.Argument(..., help="The device: DOMAIN:BUS:DEVICE.FUNCTION or BUS:DEVICE.FUNCTION.")
DRY_RUN = typer.Option(False, "--dry-run", help="Print each sysfs write, in order, without making it.")


@contextmanager
def refusals() -> Iterator[None]:
    """A refusal or a failed (and unwound) step: one clear line on stderr, exit code 5."""
    try:
        yield
    except (RefusedError, StepFailed, JournalError) as exc:
        label = "refused: " if isinstance(exc, RefusedError) else "failed: "
        err.print(Text.assemble((label, "bold red"), str(exc)))
        raise typer.Exit(Exit.REFUSED) from None


def _device(text: str) -> Bdf:
    with input_errors():
        return Bdf.parse(text)


def _show(result: Result) -> None:
    for note in result.recovered:
        out.print(Text.assemble(("recovered ", "yellow"), note))
    for warning in result.warnings:
        out.print(Text.assemble(("warning ", "yellow"), warning))
    devices = ", ".join(map(str, result.devices))
    if result.dry_run:
        out.print(f"{result.operation} {devices} would write, in order:")
    else:
        done = "quarantined" if result.operation == "quarantine" else "given back to the host"
        out.print(f"{done}: {devices}")
    for write in result.writes:
        out.print(f"  {write}")


def quarantine(
    device: str = DEVICE,
    dry_run: bool = DRY_RUN,
    root: Path = ROOT,
    state_dir: Path = STATE_DIR,
) -> None:
    """Make a device assignable: release it, and every group sibling that must go with
    it, from host drivers and bind them to vfio-pci (their DMA is then blocked)."""
    with refusals():
        _show(Enforcer(str(root), state_dir).quarantine(_device(device), dry_run))


def unquarantine(
    device: str = DEVICE,
    dry_run: bool = DRY_RUN,
    root: Path = ROOT,
    state_dir: Path = STATE_DIR,
) -> None:
    """Give a quarantined device back to the host: reset it, then rebind the host driver
    it had before quarantine."""
    with refusals():
        _show(Enforcer(str(root), state_dir).unquarantine(_device(device), dry_run))


def recover(root: Path = ROOT, state_dir: Path = STATE_DIR) -> None:
    """Bring the devices of any operation a killed pciguard left half-done back to
    quarantine (every quarantine and unquarantine does this first, too)."""
    with refusals():
        notes = Enforcer(str(root), state_dir).recover_interrupted()
    for note in notes:
        out.print(Text.assemble(("recovered ", "yellow"), note))
    if not notes:
        out.print("nothing to recover: every operation in the journal ended")


def journal(state_dir: Path = STATE_DIR) -> None:
    """Show what pciguard did to this host: devices it holds, and every operation with its steps."""
    with refusals():
        book = Journal(state_dir)
        try:
            for bdf, row in sorted(book.devices().items()):
                driver = f" (host driver {row.host_driver})" if row.host_driver else ""
                out.print(f"{bdf}: {row.state}{driver}")
            for op in book.operations():
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(op.started))
                out.print(f"#{op.id} {when} {op.name} {' '.join(op.devices)}: {op.outcome or 'IN FLIGHT'}")
                for description, status in op.steps:
                    out.print(f"    {status:8} {description}")
        finally:
            book.close()
