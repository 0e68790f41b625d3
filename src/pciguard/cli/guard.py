"""``pciguard guard``: the hot-plug guard daemon, and the commands that talk to it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.text import Text

from pciguard.cli.common import EXIT_CODES, STATE_DIR, Exit, err, error, input_errors, out, typer_app
from pciguard.errors import InputError
from pciguard.policy import PresentPolicy

if TYPE_CHECKING:
    from pciguard.platforms.linux.guard import GuardDecision

# The guard's modules are imported by the commands that use them: every pciguard
# command starts by importing this one, and start-up time counts.
DEFAULT_SOCKET = Path("/run/pciguard/guard.sock")
DEFAULT_POLICY = Path("/etc/pciguard/policy.rules")
SOCKET = typer.Option(
    DEFAULT_SOCKET,
    "--socket",
    envvar="PCIGUARD_SOCKET",
    help="The guard's control socket.",
    metavar="PATH",
    readable=False,
)
DEVICE = typer.Argument(
    ..., help="A PCI address, or a Thunderbolt device's name (such as 0-1).", metavar="DEVICE"
)
HELD_AFTER_FAILURE = (
    "the guard stopped without undoing its claim: vfio-pci keeps claiming new devices "
    "and automatic probing stays off until it runs again"
)
TARGET_STYLE = {"allow": "bold green", "quarantine": "yellow", "reject": "bold red", "keep": "dim"}

app = typer_app(
    epilog=EXIT_CODES,
    help="The hot-plug guard: run it (no subcommand), or list and change its decisions.",
    invoke_without_command=True,
)


@app.callback()
def run(
    ctx: typer.Context,
    policy_file: Path = typer.Option(
        DEFAULT_POLICY,
        "--policy",
        help="The rules (docs/policy.md).",
        dir_okay=False,
        metavar="FILE",
        readable=False,  # checked when the guard starts: `guard list` as a user must not need it
    ),
    present: PresentPolicy = typer.Option(
        PresentPolicy.KEEP,
        "--present",
        help="What to do with devices already there at start.",
        metavar="WHAT",
    ),
    socket_path: Path = SOCKET,
    group: str | None = typer.Option(
        None, "--group", help="Members of this group may use the socket too.", metavar="GROUP"
    ),
    root: Path = typer.Option(
        Path("/"), "--root", help="Act on the sysfs tree under this directory.", metavar="DIR"
    ),
    state_dir: Path = STATE_DIR,
) -> None:
    """Run the guard: vfio-pci (xen-pciback in a Xen dom0) claims every new PCI function,
    which the policy then allows, quarantines or rejects; Thunderbolt devices are
    authorised by policy; every decision is journaled. Stops cleanly on SIGTERM or Ctrl-C
    (probing is then given back as it was)."""
    if ctx.invoked_subcommand is not None:
        return
    from pciguard.errors import StepFailed
    from pciguard.formats.policy_file import load_policy
    from pciguard.platforms.linux.guard import Guard, serve, uevents
    from pciguard.platforms.linux.journal import JournalError

    with input_errors():
        try:
            policy = load_policy(policy_file)
        except InputError:
            if policy_file == DEFAULT_POLICY and not os.path.lexists(DEFAULT_POLICY):
                raise_missing_policy()
            raise
    stopping: list[int] = []

    def stop(signum: int, _: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        events = uevents() if root == Path("/") else None  # before start: no event is missed
        guard = Guard(policy, str(root), state_dir, present)
    except (JournalError, OSError) as exc:
        err.print(Text.assemble(("cannot start: ", "bold red"), str(exc)))
        raise typer.Exit(Exit.REFUSED) from None
    guard.listeners.append(_show)
    out.print(f"pciguard guard: {len(policy.rules)} rules from {policy_file}; present devices: {present}")
    try:
        guard.start()
        if guard.claiming:
            out.print(
                "vfio-pci claims every PCI function the kernel finds until the policy has judged it",
                soft_wrap=True,
            )
        else:
            err.print(
                Text.assemble(
                    ("warning: ", "yellow"),
                    "vfio-pci could not be loaded: host drivers already loaded will bind hot-plugged "
                    "devices before the guard can act (load vfio-pci early, from the initramfs)",
                )
            )
        out.print(
            f"listening on {socket_path}; automatic driver probing is off until the guard stops",
            soft_wrap=True,
        )
        serve(guard, socket_path, group, events, should_stop=lambda: bool(stopping))
    except (StepFailed, OSError) as exc:
        held = f"; {HELD_AFTER_FAILURE}" if guard.claiming else ""
        err.print(Text.assemble(("failed: ", "bold red"), f"{exc}{held}"))
        raise typer.Exit(Exit.REFUSED) from None
    except BaseException:
        if guard.claiming:
            err.print(HELD_AFTER_FAILURE)
        raise
    guard.stop()
    out.print("stopped; automatic driver probing restored")


def raise_missing_policy() -> None:
    raise InputError(
        str(DEFAULT_POLICY),
        "no policy here; write one that allows what is present now with "
        f"`pciguard policy generate -o {DEFAULT_POLICY}`, read it, then start the guard",
    )


def _show(decision: GuardDecision | dict[str, Any]) -> None:
    if isinstance(decision, dict):  # as the socket gives it
        from pciguard.platforms.linux.guard import GuardDecision

        decision = GuardDecision(**decision)
    out.print(
        Text.assemble(
            f"{decision.source:9} {decision.device:13} ",
            (f"{decision.target:10}", TARGET_STYLE.get(decision.target, "")),
            f" {decision.outcome}  ",
            (f"[{decision.rule}; {decision.latency_ms} ms]", "dim"),
        ),
        soft_wrap=True,
    )


def _ask(socket_path: Path, message: dict[str, Any]) -> Any:
    from pciguard.platforms.linux.guard import request

    try:
        yield from request(socket_path, message)
    except OSError as exc:
        err.print(
            Text.assemble(
                ("error: ", "bold red"), f"no guard answers on {socket_path}: {exc.strerror or exc}"
            )
        )
        raise typer.Exit(Exit.REFUSED) from None


def _answer(socket_path: Path, message: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = next(iter(_ask(socket_path, message)), {"ok": False, "error": "no answer"})
    if not answer.get("ok"):
        err.print(Text.assemble(("refused: ", "bold red"), str(answer.get("error"))))
        raise typer.Exit(Exit.REFUSED)
    return answer


@app.command("xen-hide", epilog=EXIT_CODES)
def xen_hide_command(
    root: Path = typer.Option(
        Path("/"), "--root", help="Read the sysfs tree under this directory.", metavar="DIR"
    ),
) -> None:
    """In a Xen dom0: the kernel parameter that keeps today's assignable devices (and the
    rest of their IOMMU groups, as pciguard derives them) with xen-pciback from boot, so
    that no dom0 driver ever binds them (their DMA is dom0's until `pciguard quarantine`)."""
    from pciguard.model.kernel import PCIBACK
    from pciguard.platforms.linux.sysfs import Fs
    from pciguard.platforms.xen.dom0 import read
    from pciguard.platforms.xen.evidence import hide_parameter

    with input_errors():
        reading = read(Fs(str(root)))
    xen, host = reading.facts.xen, reading.host
    if xen is None:
        error(f"{root} is not a Xen dom0: xen-pciback.hide= is a parameter of a dom0's kernel")
        raise typer.Exit(Exit.BAD_INPUT)
    held = [b for b, f in host.topology.items() if f.driver == PCIBACK] + list(xen.assignable)
    together = [
        m
        for b in held
        if b in host.topology
        for m in host.group_of(b).members
        if not host.topology[m].kind.is_bridge
    ]
    if not together:
        out.print("no device is assignable now: nothing to hide (make them assignable first)")
        return
    out.print(hide_parameter(together))
    out.print(
        "add it to the dom0 kernel's command line (Debian: GRUB_CMDLINE_LINUX in "
        "/etc/default/grub, then update-grub); xen-pciback must be built in or in the initramfs"
    )


@app.command("unit", epilog=EXIT_CODES)
def unit_command() -> None:
    """Print the systemd unit for this installation (to /etc/systemd/system/pciguard-guard.service)."""
    typer.echo(unit_text(), nl=False)


def unit_text() -> str:
    """The shipped unit, running this very pciguard: the interpreter it was installed in,
    by absolute path (a venv's ``pciguard`` is not on systemd's PATH)."""
    command = f"{shlex.quote(sys.executable)} -m pciguard"
    return shipped("pciguard-guard.service").replace("/usr/bin/env pciguard", command)


def shipped(name: str) -> str:
    """A file that ships with the package (src/pciguard/data)."""
    from importlib.resources import files

    return (files("pciguard") / "data" / name).read_text()


@app.command("list", epilog=EXIT_CODES)
def list_command(socket_path: Path = SOCKET, json_output: bool = typer.Option(False, "--json")) -> None:
    """Every device the guard has judged, with its latest decision."""
    devices = _answer(socket_path, {"op": "list"})["devices"]
    if json_output:
        typer.echo(json.dumps(devices, indent=2))
        return
    for device in devices:
        _show(device)


def _control(target: str, device: str, socket_path: Path) -> None:
    _show(_answer(socket_path, {"op": target, "device": device})["decision"])


@app.command("allow", epilog=EXIT_CODES)
def allow_command(device: str = DEVICE, socket_path: Path = SOCKET) -> None:
    """Let a host driver have the device (unquarantining it first if need be)."""
    _control("allow", device, socket_path)


@app.command("quarantine", epilog=EXIT_CODES)
def quarantine_command(device: str = DEVICE, socket_path: Path = SOCKET) -> None:
    """Bind the device to vfio-pci, its DMA blocked."""
    _control("quarantine", device, socket_path)


@app.command("reject", epilog=EXIT_CODES)
def reject_command(device: str = DEVICE, socket_path: Path = SOCKET) -> None:
    """Remove the device from the bus (or leave a Thunderbolt device unauthorised)."""
    _control("reject", device, socket_path)


@app.command("watch", epilog=EXIT_CODES)
def watch_command(socket_path: Path = SOCKET) -> None:
    """Print each decision as the guard makes it, until interrupted."""
    for answer in _ask(socket_path, {"op": "watch"}):
        if "event" in answer:
            _show(answer["event"])
        elif not answer.get("ok"):
            err.print(Text.assemble(("refused: ", "bold red"), str(answer.get("error"))))
            raise typer.Exit(Exit.REFUSED)
