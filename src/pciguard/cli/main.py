"""Entry point: ``pciguard`` and its subcommands."""

from __future__ import annotations

import gc
import signal
import sys
import traceback
from importlib import import_module
from pathlib import Path

import typer

from pciguard import __version__
from pciguard.cli.common import EXIT_CODES, Exit, typer_app
from pciguard.model.kernel import printable

# Each command's module and function. Only the command that runs is imported (the audit
# of a host must not pay for the verifier's imports); `pciguard --help` imports them all.
COMMANDS = {
    "audit": ("audit", "command"),
    "simulate": ("simulate", "command"),
    "verify": ("verify", "command"),
    "snapshot": ("snapshot", "command"),
    "schema": ("schema", "command"),
    "quarantine": ("enforce", "quarantine"),
    "unquarantine": ("enforce", "unquarantine"),
    "assign": ("enforce", "assign"),
    "release": ("enforce", "release"),
    "recover": ("enforce", "recover"),
    "journal": ("enforce", "journal"),
}
GROUPS = ("policy", "guard")  # commands with subcommands: each module's Typer app


def build_app(only: str | None = None) -> typer.Typer:
    """The command line, with every command or only the one named."""
    app = typer_app(
        name="pciguard",
        help="Keep PCI devices given to virtual machines away from memory and interrupts they do not own.",
        no_args_is_help=True,
        epilog=EXIT_CODES,
    )
    app.callback()(_root)
    for name, (module, function) in COMMANDS.items():
        if only in (None, name):
            app.command(name, epilog=EXIT_CODES)(getattr(import_module(f"pciguard.cli.{module}"), function))
    for name in GROUPS:
        if only in (None, name):
            app.add_typer(import_module(f"pciguard.cli.{name}").app, name=name)
    return app


def __getattr__(name: str) -> typer.Typer:
    """``app``, the whole command line, built when first asked for (tests, --help)."""
    if name != "app":
        raise AttributeError(name)
    built = globals()["app"] = build_app()
    return built


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pciguard {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """pciguard: audit, simulate and verify PCI device isolation."""


def _command_in(argv: list[str]) -> str | None:
    """The command a command line runs: None (build them all) for --help, a typo or
    nothing at all; "" (none) for --version."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is None and "--version" in argv and "--help" not in argv:
        return ""
    return first if first in COMMANDS or first in GROUPS else None


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so that every ``finally`` (the guard giving probing back,
    # the journal's lock) runs.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        run = globals().get("app") or build_app(_command_in(sys.argv[1:]))
        run()
    except KeyboardInterrupt:
        sys.stderr.write("pciguard: interrupted\n")
        raise SystemExit(130) from None
    except Exception as exc:  # the last net: a bug must still not print a traceback
        where = traceback.extract_tb(exc.__traceback__)[-1]
        sys.stderr.write(
            f"pciguard: internal error: {type(exc).__name__}: {printable(str(exc))[:300]} "
            f"(at {Path(where.filename).name}:{where.lineno}); this is a bug in pciguard: "
            "please report it with the command you ran\n"
        )
        raise SystemExit(Exit.INTERNAL) from None
    finally:
        # What the command made is left to the operating system: collecting it as the
        # interpreter exits would add a tenth to a search's time to its verdict.
        gc.freeze()


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
