"""Entry point: ``pciguard`` and its subcommands."""

from __future__ import annotations

import typer

from pciguard import __version__
from pciguard.cli import audit, enforce, guard, policy, schema, simulate, snapshot, verify

app = typer.Typer(
    name="pciguard",
    help="Keep PCI devices given to virtual machines away from memory and interrupts they do not own.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("audit")(audit.command)
app.command("simulate")(simulate.command)
app.command("verify")(verify.command)
app.command("snapshot")(snapshot.command)
app.command("schema")(schema.command)
app.command("quarantine")(enforce.quarantine)
app.command("unquarantine")(enforce.unquarantine)
app.command("assign")(enforce.assign)
app.command("release")(enforce.release)
app.command("recover")(enforce.recover)
app.command("journal")(enforce.journal)
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
    app()


if __name__ == "__main__":
    main()
