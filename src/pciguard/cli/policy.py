"""``pciguard policy generate|check|test``: write, validate and try hot-plug policies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.text import Text

from pciguard.cli.common import EXIT_CODES, Exit, error, input_errors, linux_reading, out, typer_app
from pciguard.errors import InputError
from pciguard.model import Bdf, Host
from pciguard.model.kernel import ThunderboltDevice

if TYPE_CHECKING:
    from pciguard.policy.rules import Subject

# The policy modules are imported by the commands that use them: every pciguard
# command starts by importing this one, and start-up time counts.

app = typer_app(
    epilog=EXIT_CODES, help="Write, check and try hot-plug policies (the rules `pciguard guard` applies)."
)

PLATFORM = typer.Option(
    None,
    "--platform",
    "-p",
    help="A platform description file (YAML) instead of this host.",
    dir_okay=False,
    metavar="FILE",
)
ROOT = typer.Option(
    None, "--root", help="The sysfs tree under this directory instead of /.", file_okay=False, metavar="DIR"
)
SNAPSHOT = typer.Option(
    None, "--snapshot", help="A snapshot taken by `pciguard snapshot`.", dir_okay=False, metavar="FILE"
)
TARGET_STYLE = {"allow": "bold green", "quarantine": "yellow", "reject": "bold red"}


def _host(
    platform: Path | None, root: Path | None, snapshot: Path | None
) -> tuple[Host, tuple[ThunderboltDevice, ...]]:
    from pciguard.pciids import name_devices

    if platform is not None:
        from pciguard.formats.platform_file import load_platform

        return load_platform(platform), ()
    reading, _ = linux_reading(root, snapshot)
    return name_devices(reading.host), reading.facts.thunderbolt_devices


@app.command("generate", epilog=EXIT_CODES)
def generate_command(
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write here instead of standard output.", metavar="FILE"
    ),
    platform: Path | None = PLATFORM,
    root: Path | None = ROOT,
    snapshot: Path | None = SNAPSHOT,
) -> None:
    """A policy that allows every device present now (like `usbguard generate-policy`);
    anything plugged in later falls to the implicit quarantine."""
    from pciguard.policy.rules import generate

    with input_errors():
        text = generate(*_host(platform, root, snapshot))
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # /etc/pciguard on a new host
    except OSError as exc:
        error(f"{output}: cannot write the policy: {exc.strerror or exc}")
        raise typer.Exit(Exit.BAD_INPUT) from None
    try:
        with open(output, "x", encoding="utf-8") as written:  # never over an existing policy
            written.write(text)
    except FileExistsError:
        error(f"{output} exists; pciguard does not overwrite a policy")
        raise typer.Exit(Exit.BAD_INPUT) from None
    except OSError as exc:
        error(f"{output}: cannot write the policy: {exc.strerror or exc}")
        raise typer.Exit(Exit.BAD_INPUT) from None
    out.print(f"wrote {text.count(chr(10)) - 2} rules to {output}")


@app.command("example", epilog=EXIT_CODES)
def example_command() -> None:
    """Print the example policy that ships with pciguard, every construct explained."""
    from pciguard.cli.guard import shipped

    typer.echo(shipped("example.rules"), nl=False)


@app.command("check", epilog=EXIT_CODES)
def check_command(
    file: Path = typer.Argument(..., help="The policy file.", dir_okay=False, metavar="FILE"),
) -> None:
    """Validate a policy; a malformed rule is named by file, line and column (exit 2)."""
    from pciguard.formats.policy_file import load_policy

    with input_errors():
        policy = load_policy(file)
    out.print(f"{file}: {len(policy.rules)} rules, well formed")


@app.command("test", epilog=EXIT_CODES)
def test_command(
    file: Path = typer.Argument(..., help="The policy file.", dir_okay=False, metavar="FILE"),
    device: str = typer.Argument(
        ..., help="A PCI address, or a Thunderbolt device's name (0-1).", metavar="DEVICE"
    ),
    present: bool = typer.Option(False, "--present", help="Judge it as present when the guard starts."),
    platform: Path | None = PLATFORM,
    root: Path | None = ROOT,
    snapshot: Path | None = SNAPSHOT,
) -> None:
    """Which rule decides a device, and why each rule before it did not match."""
    from pciguard.formats.policy_file import load_policy

    with input_errors():
        policy = load_policy(file)
        host, thunderbolt = _host(platform, root, snapshot)
        subject = _subject(host, thunderbolt, device, present)
    verdict = policy.judge(subject)
    for rule, why_not in verdict.considered:
        out.print(
            Text.assemble(("  no  ", "dim"), f"{rule.where}: {rule}  ", (f"({why_not})", "dim")),
            soft_wrap=True,
        )
    if verdict.rule is not None:
        out.print(Text.assemble(("  yes ", "bold"), f"{verdict.rule.where}: {verdict.rule}"), soft_wrap=True)
    target = verdict.decision.target
    out.print(
        Text.assemble(
            f"{subject.address}: ", (str(target), TARGET_STYLE[target]), f" — {verdict.decision.rule}"
        )
    )


def _subject(host: Host, thunderbolt: tuple[ThunderboltDevice, ...], device: str, present: bool) -> Subject:
    from pciguard.policy.rules import Subject

    for tb in thunderbolt:
        if tb.name == device:
            return Subject.of_thunderbolt(tb, present=present)
    try:
        bdf = Bdf.parse(device)
    except ValueError as exc:
        raise InputError("DEVICE", f"{exc}, nor a Thunderbolt device of this host") from None
    if bdf not in host.topology:
        raise InputError("DEVICE", f"{bdf} is not a device of {host.name}")
    return Subject.of_function(host, bdf, present=present)
