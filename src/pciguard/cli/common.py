"""What every subcommand shares: the consoles, exit codes, and input-error handling."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.text import Text

from pciguard.errors import InputError, TopologyError
from pciguard.paths import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from pciguard.platforms.linux import Reading

# Data (device names, VM names, policy rules, paths) is never read as Rich markup or
# emoji codes: styles come only from Text objects built in the CLI.
out = Console(highlight=False, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, markup=False, emoji=False)


def error(message: str) -> None:
    """One error line on stderr."""
    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def emit_json(text: str) -> None:
    """JSON as it is, for programs: rich's highlighting costs seconds on large reports."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Exit(IntEnum):
    """Exit codes, the same for every subcommand (documented in docs/cli.md)."""

    OK = 0
    FINDINGS = 1  # audit: critical host findings; simulate: an invariant was violated
    BAD_INPUT = 2  # a file or argument is malformed (also typer's usage errors)
    UNMET = 3  # a step's expectation, or an expected violation, did not come true
    INCOMPLETE = 4  # verify: a limit stopped the search before it was exhaustive
    REFUSED = 5  # quarantine/unquarantine: refused, or a step failed and was unwound
    INTERNAL = 70  # a bug in pciguard (EX_SOFTWARE): said in one line, never a traceback


# root's alone: an ordinary user's dry run plans without it, and its audit reads none
STATE_DIR = typer.Option(
    DEFAULT_STATE_DIR,
    "--state-dir",
    envvar="PCIGUARD_STATE_DIR",
    help="Where pciguard's journal lives.",
    metavar="DIR",
    readable=False,
)
# Shown under every command's --help (click keeps a paragraph that starts with \b as it is).
EXIT_CODES = """\b
Exit codes (the same for every command):
  0  done; audit: the host can isolate devices; simulate/verify: as the scenario expects
  1  audit: critical findings (no IOMMU, no interrupt isolation, an unsafe override);
     simulate/verify: an invariant broke that the scenario did not expect
  2  malformed input or arguments
  3  simulate/verify: an expectation, or an expected violation, did not come true
  4  verify: a limit stopped the search before it was exhaustive
  5  refused, or a step failed and was unwound (nothing half-done)
  70 an internal error in pciguard (a bug: please report it)"""


def typer_app(**settings: object) -> typer.Typer:
    """A command group with plain help: no Rich markup or emoji codes read from help
    texts (``:bus:`` in DOMAIN:BUS:DEVICE would become an emoji), text wrapped to the
    terminal."""
    return typer.Typer(
        rich_markup_mode=None,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"max_content_width": 100},
        **settings,  # type: ignore[arg-type]
    )


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn malformed-input errors into one clear line on stderr and exit code 2."""
    try:
        yield
    except (InputError, TopologyError) as exc:
        error(str(exc))
        raise typer.Exit(Exit.BAD_INPUT) from None


def linux_reading(
    root: Path | None, snapshot: Path | None = None, lspci: Path | None = None
) -> tuple[Reading, str]:
    """A Linux host as read from sysfs under ``root`` (default /), a snapshot or an
    lspci dump, with the words that name it. Imported here: each reader is needed by
    one option, and start-up time counts."""
    if snapshot is not None:
        from pciguard.platforms.linux.snapshot import read_snapshot

        return read_snapshot(snapshot), f"snapshot {snapshot}"
    if lspci is not None:
        from pciguard.formats.lspci import load_lspci

        return load_lspci(lspci), f"lspci dump {lspci}"
    from pciguard.platforms.linux.sysfs import Fs
    from pciguard.platforms.xen.dom0 import read

    return read(Fs(str(root or "/"))), f"sysfs under {root or '/'}"
