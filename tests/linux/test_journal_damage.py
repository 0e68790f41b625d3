"""A damaged journal is detected, kept aside for inspection and replaced; the run that
finds it changes nothing (fail closed) and says what was lost. The lock times out and
names its holder. Dry runs create no state. Arguments are checked before anything begins."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import bdf, example
from fakekernel import driver_of, installed, prepare
from pciguard.cli.main import app
from pciguard.platforms.linux.enforce import Enforcer
from pciguard.platforms.linux.journal import Journal, JournalDamaged, JournalError

NIC = "0000:03:00.0"
runner = CliRunner()


@pytest.fixture
def host(tree: Callable[..., Path]) -> Iterator[Path]:
    root = tree("workstation", root_disk=bdf("0000:02:00.0"), boot_vga=frozenset({bdf("0000:00:02.0")}))
    prepare(root, example("workstation"), True)
    with installed(root):
        yield root


def _interrupted(state: Path) -> Path:
    """A journal with an operation that never finished (pciguard killed half-way)."""
    journal = Journal(state)
    journal.begin("quarantine", [NIC], {NIC: "e1000e"})
    for _ in range(200):  # a journal of some pages
        journal.decision(
            '{"at": 0, "source": "hotplug", "device": "x", "target": "q", "outcome": "o", "rule": "r"}'
        )
    journal.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    journal.close()
    return state / "journal.sqlite"


def _cut(fraction: float) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with open(path, "r+b") as f:
            f.truncate(int(path.stat().st_size * fraction))

    return damage


def _cut_inside_last_page(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


def _scribble(path: Path) -> None:
    """Garbage over the b-tree headers of every page after the first."""
    data = bytearray(path.read_bytes())
    for page in range(4096, len(data), 4096):
        data[page : page + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))


def _sql(statement: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute(statement)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()

    return damage


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir(mode=0o700)


DAMAGE = {
    "emptied": (_cut(0), "empty"),
    "cut-in-half": (_cut(0.5), "cut short"),
    "cut-inside-last-page": (_cut_inside_last_page, "cut short"),
    "scribbled-page": (_scribble, "SQLite"),
    "a-folder-in-its-place": (_folder, "not a regular file"),
    "bad-address-in-a-row": (_sql("UPDATE devices SET bdf = 'zz:zz'"), "device row is malformed"),
    "unknown-state-in-a-row": (_sql("UPDATE devices SET state = 'free'"), "device row is malformed"),
    "bad-operation-devices": (
        _sql("UPDATE operations SET devices = '0000:03:00.0 banana'"),
        "not PCI addresses",
    ),
    "schema-changed": (_sql("ALTER TABLE devices DROP COLUMN group_type"), "columns"),
    "schema-version": (_sql("PRAGMA user_version = 7"), "schema version 7"),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_journal_is_kept_aside_and_nothing_changes(host: Path, name: str) -> None:
    damage, message = DAMAGE[name]
    state = host / "state"
    path = _interrupted(state)
    damage(path)
    damaged = path.read_bytes() if path.is_file() else None
    with pytest.raises(JournalDamaged, match=message) as info:
        Enforcer(str(host), state).quarantine(bdf(NIC))
    assert driver_of(host, NIC) == "e1000e"  # fail closed: this run changed nothing
    kept = info.value.kept
    assert kept is not None and kept.exists() and str(kept) in str(info.value)
    if damaged is not None:
        assert kept.read_bytes() == damaged  # kept as it was, for inspection
    assert "Lost with it: interrupted operations" in str(info.value)
    # The next run works from a new journal, which shows nothing it does not know.
    Enforcer(str(host), state).quarantine(bdf(NIC))
    assert driver_of(host, NIC) == "vfio-pci"
    assert [op.name for op in Journal(state).operations()] == ["quarantine"]


def test_the_cli_says_the_journal_was_damaged_without_a_traceback(host: Path) -> None:
    state = host / "state"
    _cut(0.5)(_interrupted(state))
    result = runner.invoke(app, ["quarantine", NIC, "--root", str(host), "--state-dir", str(state)])
    assert result.exit_code == 5, result.output
    assert "was damaged" in result.output and "kept as" in result.output


def test_showing_a_damaged_journal_moves_nothing(host: Path) -> None:
    state = host / "state"
    path = _interrupted(state)
    _cut(0.5)(path)
    result = runner.invoke(app, ["journal", "--state-dir", str(state)])
    assert result.exit_code == 5 and "is damaged" in result.output
    assert path.exists() and not list(state.glob("*.damaged-*"))


def test_a_guard_record_that_is_not_json_is_shown_as_damaged(host: Path) -> None:
    state = host / "state"
    journal = Journal(state)
    journal.decision("{not json")
    journal.decision('{"at": "x"}')
    journal.close()
    result = runner.invoke(app, ["journal", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert result.output.count("the record is damaged") == 2


def test_a_folder_in_the_locks_place_is_a_clear_error(host: Path) -> None:
    state = host / "state"
    Journal(state).close()
    (state / "lock").mkdir()
    with pytest.raises(JournalError, match="lock"):
        Enforcer(str(host), state).quarantine(bdf(NIC))
    assert driver_of(host, NIC) == "e1000e"


def test_the_lock_times_out_and_names_a_stopped_holder(host: Path) -> None:
    state = host / "state"
    journal = Journal(state)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child holds the lock, then is stopped
        with journal.locked():
            os.write(write, b"x")
            time.sleep(60)
        os._exit(0)
    try:
        os.read(read, 1)
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(JournalError, match=rf"pid {pid} .*is stopped"), journal.locked(timeout=0.5):
            pass
        assert time.monotonic() - started < 5
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        journal.close()


def test_a_dry_run_creates_no_state(host: Path) -> None:
    state = host / "fresh-state"
    result = runner.invoke(
        app, ["quarantine", NIC, "--dry-run", "--root", str(host), "--state-dir", str(state)]
    )
    assert result.exit_code == 0, result.output
    assert not state.exists()


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("99999999999999999999", "is not a uid"),
        ("4294967295", "is not a uid"),
        ("-1", "no user named"),
        ("²", "no user named"),
        ("no-such-user-here", "no user named"),
    ],
)
def test_a_bad_user_is_refused_before_anything_begins(host: Path, user: str, message: str) -> None:
    state = host / "state"
    Enforcer(str(host), state).quarantine(bdf(NIC))
    before = Journal(state).operations()
    result = runner.invoke(
        app, ["assign", NIC, "--to", "vm1", "--user", user, "--root", str(host), "--state-dir", str(state)]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert Journal(state).operations() == before


def test_a_vm_named_like_markup_is_shown_as_written(host: Path) -> None:
    """Journal poisoning: a VM name is data, never Rich markup."""
    state = host / "state"
    where = ["--root", str(host), "--state-dir", str(state)]
    assert runner.invoke(app, ["quarantine", NIC, *where]).exit_code == 0
    result = runner.invoke(app, ["assign", NIC, "--to", "[/]", "--user", "1000", *where])
    assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["journal", "--state-dir", str(state)])
    assert shown.exit_code == 0, shown.output
    assert f"{NIC}: assigned to [/] (uid 1000)" in shown.output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_an_ordinary_user_is_not_stopped_by_roots_files(tmp_path: Path) -> None:
    """Regression: click checked that the state folder and the guard's policy were
    readable before any command ran, so an ordinary user's dry run, or `guard list`,
    failed with a usage error (exit 2) once root's journal existed."""
    from conftest import as_nobody

    state = tmp_path / "state"
    Journal(state).close()  # root's, mode 0700
    policy = state / "policy.rules"
    policy.write_text("allow id 8086:*\n")
    policy.chmod(0o600)
    for folder in (tmp_path, *tmp_path.parents):  # the user reaches the state folder, not into it
        if str(folder).startswith("/tmp/"):
            folder.chmod(0o755)
    dry = ["quarantine", NIC, "--dry-run", "--state-dir", str(state), "--root", "/nonexistent"]
    listing = ["guard", "--policy", str(policy), "list", "--socket", str(tmp_path / "no.sock")]
    runner.invoke(app, dry)  # the same code imported before the child drops root
    runner.invoke(app, listing)

    def run() -> str:
        return " ".join(str(runner.invoke(app, argv).exit_code) for argv in (dry, listing))

    assert as_nobody(run) == "5 5"  # refused (no such device here; no guard answers), not usage errors
