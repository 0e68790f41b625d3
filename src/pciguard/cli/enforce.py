"""``pciguard quarantine``, ``unquarantine`` and ``journal``: change a Linux host."""

from __future__ import annotations

import json
import pwd
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.text import Text

from pciguard.cli.common import STATE_DIR, Exit, err, input_errors, out
from pciguard.errors import InputError, RefusedError, StepFailed
from pciguard.formats.vmconfig import libvirt_hostdev, xl_pci
from pciguard.model import Bdf
from pciguard.model.kernel import printable
from pciguard.platforms.linux.journal import Journal, JournalError

if TYPE_CHECKING:  # imported when a command runs: every pciguard start would pay for it
    from pciguard.platforms.linux.enforce import Enforcer, Result

ROOT = typer.Option(Path("/"), "--root", help="Act on the sysfs tree under this directory.", metavar="DIR")
DEVICE = typer.Argument(
    ..., help="The device: DOMAIN:BUS:DEVICE.FUNCTION or BUS:DEVICE.FUNCTION.", metavar="DEVICE"
)
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


def _enforcer(root: Path, state_dir: Path) -> Enforcer:
    from pciguard.platforms.linux.enforce import Enforcer

    return Enforcer(str(root), state_dir)


def _device(text: str) -> Bdf:
    try:
        return Bdf.parse(text)
    except ValueError as exc:
        with input_errors():
            raise InputError("DEVICE", str(exc)) from None
        raise


# uid_t is 32 bits and chown(2) reads its all-ones value as "leave the owner alone".
NO_UID = 0xFFFFFFFF


def _uid(user: str) -> int:
    """The uid a VM's process runs as, checked before anything begins."""
    with input_errors():
        if user.isascii() and user.isdigit():
            if len(user) > 10 or not 0 <= int(user) < NO_UID:
                raise InputError("--user", f"{user[:20]} is not a uid (0 to {NO_UID - 1})")
            return int(user)
        try:
            return pwd.getpwnam(user).pw_uid
        except (KeyError, ValueError):
            raise InputError("--user", f"there is no user named {printable(user)!r}") from None
    raise AssertionError("unreachable")


DONE = {
    "quarantine": "quarantined",
    "unquarantine": "given back to the host",
    "assign": "assigned",
    "release": "released to quarantine",
}


def _show(result: Result) -> None:
    for note in result.recovered:
        out.print(Text.assemble(("recovered ", "yellow"), note))
    for warning in result.warnings:
        out.print(Text.assemble(("warning ", "yellow"), warning))
    devices = ", ".join(map(str, result.devices))
    if result.dry_run:
        out.print(f"{result.operation} {devices} would {'run' if result.xen else 'write'}, in order:")
    else:
        out.print(f"{DONE[result.operation]}: {devices}")
    for write in result.writes:
        out.print(f"  {write}")
    if result.operation == "assign" and not result.dry_run and not result.xen:
        out.print("libvirt (the domain's <devices>):")
        for device in result.devices:
            out.print(libvirt_hostdev(device))
        out.print(
            "xl.cfg (Xen binds its devices to xen-pciback, not vfio-pci: `xl pci-assignable-add` them):"
        )
        out.print(xl_pci(result.devices))


def quarantine(
    device: str = DEVICE,
    dry_run: bool = DRY_RUN,
    console_gpu: bool = typer.Option(
        False, "--console-gpu", help="Also when it is the console GPU (the host loses its display)."
    ),
    root: Path = ROOT,
    state_dir: Path = STATE_DIR,
) -> None:
    """Make a device assignable: release it, and every group sibling that must go with
    it, from host drivers and bind them to vfio-pci (their DMA is then blocked)."""
    with refusals():
        _show(_enforcer(root, state_dir).quarantine(_device(device), dry_run, console_gpu))


def unquarantine(
    device: str = DEVICE,
    dry_run: bool = DRY_RUN,
    root: Path = ROOT,
    state_dir: Path = STATE_DIR,
) -> None:
    """Give a quarantined device back to the host: reset it, then rebind the host driver
    it had before quarantine."""
    with refusals():
        _show(_enforcer(root, state_dir).unquarantine(_device(device), dry_run))


def assign(
    device: str = DEVICE,
    to: str = typer.Option(..., "--to", help="The VM's name.", metavar="VM"),
    user: str | None = typer.Option(
        None,
        "--user",
        help="The user (name or uid) the VM's process runs as (VFIO; not on Xen).",
        metavar="USER",
    ),
    dry_run: bool = DRY_RUN,
    root: Path = ROOT,
    state_dir: Path = STATE_DIR,
) -> None:
    """Hand a quarantined device to a VM's process after every check (group, interrupt
    remapping, reset, identity domain): its VFIO group node becomes that user's, and
    the process attaches the group to its own IOMMU domain when it opens it. In a Xen
    dom0: `xl pci-attach` to the domain, which must have been created with passthrough=."""
    with refusals():
        uid = None if user is None else _uid(user)
        _show(_enforcer(root, state_dir).assign(_device(device), to, uid, dry_run))


def release(
    device: str = DEVICE, dry_run: bool = DRY_RUN, root: Path = ROOT, state_dir: Path = STATE_DIR
) -> None:
    """Take a device back from its VM into quarantine (never to a host driver), once the
    VM's process no longer holds its group open."""
    with refusals():
        _show(_enforcer(root, state_dir).release(_device(device), dry_run))


def recover(root: Path = ROOT, state_dir: Path = STATE_DIR) -> None:
    """Bring the devices of any operation a killed pciguard left half-done back to
    quarantine (every quarantine and unquarantine does this first, too)."""
    with refusals():
        notes = _enforcer(root, state_dir).recover_interrupted()
    for note in notes:
        out.print(Text.assemble(("recovered ", "yellow"), note))
    if not notes:
        out.print("nothing to recover: every operation in the journal ended")


def _decision_line(number: int, text: str) -> str:
    """One decision of the guard, or what is wrong with its record."""
    try:
        record = json.loads(text)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["at"])))
        return (
            f"guard {when} {record['source']} {record['device']}: {record['target']}, "
            f"{record['outcome']} [{record['rule']}]"
        )
    except (ValueError, TypeError, KeyError, OverflowError, OSError, RecursionError):
        return f"guard decision #{number}: the record is damaged ({printable(str(text)[:80])!r})"


def journal(state_dir: Path = STATE_DIR) -> None:
    """Show what pciguard did to this host: devices it holds, every operation with its
    steps, and the hot-plug guard's latest decisions."""
    with refusals():
        book = Journal(state_dir, readonly=True)
        try:
            for bdf, row in sorted(book.devices().items()):
                driver = f" (host driver {row.host_driver})" if row.host_driver else ""
                vm = f" to {row.vm} (uid {row.uid})" if row.vm else ""
                out.print(f"{bdf}: {row.state}{vm}{driver}")
            for op in book.operations():
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(op.started))
                out.print(f"#{op.id} {when} {op.name} {' '.join(op.devices)}: {op.outcome or 'IN FLIGHT'}")
                for description, status in op.steps:
                    out.print(f"    {status:8} {description}")
            for number, text in book.decisions():
                out.print(_decision_line(number, text), soft_wrap=True)
        finally:
            book.close()
