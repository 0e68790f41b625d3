"""The enforcement journal: SQLite (WAL), root's alone, written ahead of every step.

Each operation is recorded with its devices and the host drivers they had before any
step is taken; each step is recorded as *intended* before it runs and *done* after.
An operation without an end was interrupted (pciguard was killed): the next start
finds it and brings its devices back to quarantine before doing anything else.
Nothing is ever deleted. A lock file serialises every pciguard that changes the host.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pciguard.errors import PciguardError

DEFAULT_STATE_DIR = Path("/var/lib/pciguard")
SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    bdf TEXT PRIMARY KEY,
    state TEXT NOT NULL,            -- quarantined, host, broken
    host_driver TEXT,               -- the driver to give it back to
    group_type TEXT,                -- its group's type before quarantine, if pciguard changed it
    vm TEXT,                        -- the VM it is assigned to
    uid INTEGER,                    -- the user that VM's process runs as
    changed REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    devices TEXT NOT NULL,          -- space-separated BDFs
    started REAL NOT NULL,
    finished REAL,                  -- NULL: in flight, or interrupted
    outcome TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    operation INTEGER NOT NULL REFERENCES operations(id),
    number INTEGER NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL,           -- intended, done, failed
    at REAL NOT NULL,
    PRIMARY KEY (operation, number)
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    decision TEXT NOT NULL          -- the guard's decision as JSON (docs/guard.md)
);
"""


class JournalError(PciguardError):
    """The journal cannot be used (not root, unsafe permissions, unreadable)."""


@dataclass(frozen=True)
class Operation:
    id: int
    name: str
    devices: tuple[str, ...]
    started: float
    finished: float | None
    outcome: str | None
    steps: tuple[tuple[str, str], ...]  # (description, status)


@dataclass(frozen=True)
class DeviceRow:
    state: str  # quarantined, assigned, host, broken
    host_driver: str | None
    group_type: str | None = None
    vm: str | None = None
    uid: int | None = None


def _private(path: Path, kind: str) -> None:
    """Refuse a journal file or folder that is not root's alone."""
    info = path.stat()
    if info.st_uid != 0 or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise JournalError(
            f"{path}: this {kind} must be owned by root and closed to others "
            f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); "
            f"fix with: chown root {path} && chmod go-rwx {path}"
        )


class Journal:
    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        if os.geteuid() != 0:
            raise JournalError(f"the journal in {state_dir} is root's: run this as root")
        self.state_dir = state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private(state_dir, "folder")
        self.path = state_dir / "journal.sqlite"
        old_umask = os.umask(0o077)
        try:
            # Used by one thread at a time; the guard may be built in one and served in another.
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old_umask)
        _private(self.path, "file")
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.path}: not a usable journal ({exc}); move it aside") from exc

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock every pciguard that changes this host takes (waits for it)."""
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- writing ---------------------------------------------------------------------
    def begin(
        self,
        name: str,
        devices: list[str],
        host_drivers: dict[str, str | None],
        group_types: dict[str, str] | None = None,
    ) -> int:
        """Record an operation before its first step, with what is needed to undo it:
        each device's host driver and the group type quarantine will change."""
        now = time.time()
        with self._transaction():
            cursor = self.db.execute(
                "INSERT INTO operations (name, devices, started) VALUES (?, ?, ?)",
                (name, " ".join(devices), now),
            )
            for bdf, driver in host_drivers.items():
                self.db.execute(
                    "INSERT INTO devices (bdf, state, host_driver, group_type, changed) "
                    "VALUES (?, 'host', ?, ?, ?) ON CONFLICT(bdf) DO UPDATE SET "
                    "host_driver = COALESCE(excluded.host_driver, host_driver), "
                    "group_type = COALESCE(excluded.group_type, group_type)",
                    (bdf, driver, (group_types or {}).get(bdf), now),
                )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def step(self, operation: int, description: str) -> Callable[[str], None]:
        """Record a step as intended; the returned callable records how it ended
        (``done`` or ``failed``). A step still ``intended`` was cut short by a crash."""
        (number,) = self.db.execute("SELECT COUNT(*) FROM steps WHERE operation = ?", (operation,)).fetchone()
        self.db.execute(
            "INSERT INTO steps VALUES (?, ?, ?, 'intended', ?)", (operation, number, description, time.time())
        )

        def ended(status: str) -> None:
            self.db.execute(
                "UPDATE steps SET status = ?, at = ? WHERE operation = ? AND number = ?",
                (status, time.time(), operation, number),
            )

        return ended

    def finish(self, operation: int, outcome: str, states: dict[str, DeviceRow]) -> None:
        """Record the end of an operation and where its devices now stand (their host
        drivers are kept until they are back with the host)."""
        now = time.time()
        with self._transaction():
            self.db.execute(
                "UPDATE operations SET finished = ?, outcome = ? WHERE id = ?", (now, outcome, operation)
            )
            for bdf, row in states.items():
                self.db.execute(
                    "INSERT INTO devices (bdf, state, vm, uid, changed) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(bdf) DO UPDATE SET state = excluded.state, vm = excluded.vm, "
                    "uid = excluded.uid, changed = excluded.changed, "
                    "host_driver = CASE WHEN excluded.state = 'host' THEN NULL ELSE host_driver END, "
                    "group_type = CASE WHEN excluded.state = 'host' THEN NULL ELSE group_type END",
                    (bdf, row.state, row.vm, row.uid, now),
                )

    def decision(self, record: str) -> None:
        """Record one decision of the hot-plug guard (JSON)."""
        self.db.execute("INSERT INTO decisions (at, decision) VALUES (?, ?)", (time.time(), record))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reading ---------------------------------------------------------------------
    def devices(self) -> dict[str, DeviceRow]:
        rows = self.db.execute("SELECT bdf, state, host_driver, group_type, vm, uid FROM devices")
        return {bdf: DeviceRow(state, driver, kind, vm, uid) for bdf, state, driver, kind, vm, uid in rows}

    def operations(self, unfinished_only: bool = False) -> list[Operation]:
        query = "SELECT id, name, devices, started, finished, outcome FROM operations"
        if unfinished_only:
            query += " WHERE finished IS NULL"
        out = []
        for op_id, name, devices, started, finished, outcome in self.db.execute(
            f"{query} ORDER BY id"
        ).fetchall():
            steps = self.db.execute(
                "SELECT description, status FROM steps WHERE operation = ? ORDER BY number", (op_id,)
            ).fetchall()
            record = Operation(op_id, name, tuple(devices.split()), started, finished, outcome, tuple(steps))
            out.append(record)
        return out

    def decisions(self, last: int = 100) -> list[str]:
        """The guard's latest decisions, oldest first (JSON each)."""
        rows = self.db.execute("SELECT decision FROM decisions ORDER BY id DESC LIMIT ?", (last,)).fetchall()
        return [decision for (decision,) in reversed(rows)]

    def close(self) -> None:
        self.db.close()
