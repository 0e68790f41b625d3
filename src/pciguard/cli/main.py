"""Entry point: ``pciguard`` and its subcommands."""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path

import typer

from pciguard import __version__
from pciguard.cli import audit, enforce, guard, policy, schema, simulate, snapshot, verify
from pciguard.cli.common import EXIT_CODES, Exit, typer_app
from pciguard.model.kernel import printable

app = typer_app(
    name="pciguard",
    help="Keep PCI devices given to virtual machines away from memory and interrupts they do not own.",
    no_args_is_help=True,
    epilog=EXIT_CODES,
)
app.command("audit", epilog=EXIT_CODES)(audit.command)
app.command("simulate", epilog=EXIT_CODES)(simulate.command)
app.command("verify", epilog=EXIT_CODES)(verify.command)
app.command("snapshot", epilog=EXIT_CODES)(snapshot.command)
app.command("schema", epilog=EXIT_CODES)(schema.command)
app.command("quarantine", epilog=EXIT_CODES)(enforce.quarantine)
app.command("unquarantine", epilog=EXIT_CODES)(enforce.unquarantine)
app.command("assign", epilog=EXIT_CODES)(enforce.assign)
app.command("release", epilog=EXIT_CODES)(enforce.release)
app.command("recover", epilog=EXIT_CODES)(enforce.recover)
app.command("journal", epilog=EXIT_CODES)(enforce.journal)
app.add_typer(policy.app, name="policy")
app.add_typer(guard.app, name="guard")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pciguard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """pciguard: audit, simulate and verify PCI device isolation."""


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so that every ``finally`` (the guard giving probing back,
    # the journal's lock) runs.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
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


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
