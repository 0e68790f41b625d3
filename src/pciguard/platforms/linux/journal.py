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
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pciguard.errors import PciguardError
from pciguard.model import Bdf
from pciguard.paths import DEFAULT_STATE_DIR

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


JOURNAL_VERSION = 1  # PRAGMA user_version of a journal with this SCHEMA
DEVICE_STATES = frozenset({"quarantined", "assigned", "host", "broken", "removed"})
STEP_STATES = frozenset({"intended", "done", "failed"})
LOCK_TIMEOUT = float(os.environ.get("PCIGUARD_LOCK_TIMEOUT", "60"))  # seconds


class JournalError(PciguardError):
    """The journal cannot be used (not root, unsafe permissions, unreadable, locked)."""


class JournalDamaged(JournalError):
    """The journal was damaged. It was kept aside for inspection (``kept``) and, unless
    opened read-only, a new one started; this run changes nothing (fail closed)."""

    def __init__(self, path: Path, damage: str, kept: Path | None) -> None:
        self.damage, self.kept = damage, kept
        if kept is None:
            message = f"{path} is damaged ({damage}); move it aside to start a new journal"
        else:
            message = (
                f"{path} was damaged ({damage}); kept as {kept} for inspection and a new journal started. "
                "Lost with it: interrupted operations and the host drivers of quarantined devices "
                "(those stay with vfio-pci until unquarantined). Nothing was changed: run the command again"
            )
        super().__init__(message)


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
    state: str  # quarantined, assigned, host, broken, removed
    host_driver: str | None
    group_type: str | None = None
    vm: str | None = None
    uid: int | None = None


def _private(path: Path, kind: str) -> None:
    """Refuse a journal file or folder that is not root's alone."""
    info = path.lstat()
    if info.st_uid != 0 or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise JournalError(
            f"{path}: this {kind} must be owned by root and closed to others "
            f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); "
            f"fix with: chown root {path} && chmod go-rwx {path}"
        )


def _file_damage(path: Path) -> str | None:
    """What is wrong with the journal file itself, read from SQLite's header (a file cut
    short passes SQLite's own checks when the cut is inside the last page)."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if info.st_size == 0:
        return "it is empty: every journal pciguard starts holds its tables"
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return "it is not an SQLite database"
    (page_size,) = struct.unpack(">H", header[16:18])
    page_size = 65536 if page_size == 1 else page_size
    changes, pages = struct.unpack(">II", header[24:32])
    (valid_for,) = struct.unpack(">I", header[92:96])
    if page_size < 512 or info.st_size % page_size:
        return f"it is cut short: {info.st_size} bytes is not a whole number of {page_size}-byte pages"
    if valid_for == changes and info.st_size < pages * page_size:
        return f"it is cut short: {info.st_size} bytes where its header says {pages * page_size}"
    return None


class Journal:
    """Open (creating it if need be) the journal in ``state_dir``. ``readonly``: only to
    look: nothing is created or moved, and damage is reported, not set aside."""

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR, *, readonly: bool = False) -> None:
        if os.geteuid() != 0:
            raise JournalError(f"the journal in {state_dir} is root's: run this as root")
        self.state_dir = state_dir
        self.path = state_dir / "journal.sqlite"
        try:
            if not readonly:
                state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _private(state_dir, "folder")
            self.db = self._open(readonly)
        except FileNotFoundError:
            raise JournalError(
                f"{self.path}: there is no journal yet (pciguard has not changed this host)"
            ) from None
        except NotADirectoryError:
            raise JournalError(f"{state_dir}: not a folder; move it aside") from None
        except OSError as exc:
            raise JournalError(f"{self.path}: cannot open the journal: {exc.strerror or exc}") from None

    def _open(self, readonly: bool) -> sqlite3.Connection:
        new = not readonly and not os.path.lexists(self.path)
        if new:  # made here, with its tables at once: an empty journal is a damaged one
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
        _private(self.path, "file")
        damage = None if new else _file_damage(self.path)
        db = None
        if damage is None:
            uri = f"file:{quote(str(self.path))}" + ("?mode=ro" if readonly else "")
            # Used by one thread at a time; the guard may be built in one and served in another.
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            try:
                if new:
                    db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version={JOURNAL_VERSION}; COMMIT;")
                damage = _content_damage(db)
                if damage is None and not readonly:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=FULL")
            except sqlite3.DatabaseError as exc:
                damage = f"SQLite cannot read it: {exc}"
        if damage is None:
            assert db is not None
            return db
        if db is not None:
            db.close()
        if readonly:
            raise JournalDamaged(self.path, damage, None)
        kept = self._set_aside()
        Journal(self.state_dir).close()  # a new, empty one in its place
        raise JournalDamaged(self.path, damage, kept)

    def _set_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        kept = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while os.path.lexists(kept):
            kept, n = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}"), n + 1
        os.rename(self.path, kept)
        for suffix in ("-wal", "-shm"):  # SQLite's own files belong with it
            if os.path.lexists(f"{self.path}{suffix}"):
                os.rename(f"{self.path}{suffix}", f"{kept}{suffix}")
        return kept

    @contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock every pciguard that changes this host takes. Waits up to
        ``timeout`` seconds (PCIGUARD_LOCK_TIMEOUT, 60 by default), then says who holds it."""
        lock = self.state_dir / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise JournalError(
                f"{lock}: cannot open the lock: {exc.strerror or exc}; move it aside"
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise JournalError(f"{lock}: the lock is not a regular file; move it aside")
            deadline = time.monotonic() + (LOCK_TIMEOUT if timeout is None else timeout)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise JournalError(
                            f"{lock}: {_holder(fd)}; waited {timeout or LOCK_TIMEOUT:g} s"
                        ) from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for whoever waits
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
                    "host_driver = CASE WHEN excluded.state IN ('host', 'removed') "
                    "THEN NULL ELSE host_driver END, "
                    "group_type = CASE WHEN excluded.state IN ('host', 'removed') "
                    "THEN NULL ELSE group_type END",
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

    def decisions(self, last: int = 100) -> list[tuple[int, str]]:
        """The guard's latest decisions, oldest first: (number, JSON) each."""
        rows = self.db.execute(
            "SELECT id, decision FROM decisions ORDER BY id DESC LIMIT ?", (last,)
        ).fetchall()
        return [(number, str(decision)) for number, decision in reversed(rows)]

    def close(self) -> None:
        self.db.close()


_COLUMNS = {
    "devices": ["bdf", "state", "host_driver", "group_type", "vm", "uid", "changed"],
    "operations": ["id", "name", "devices", "started", "finished", "outcome"],
    "steps": ["operation", "number", "description", "status", "at"],
    "decisions": ["id", "at", "decision"],
}


def _content_damage(db: sqlite3.Connection) -> str | None:
    """What is wrong inside: SQLite's own check, the schema, and every row that recovery
    reads (the guard's decisions are checked as they are shown)."""
    check = db.execute("PRAGMA quick_check").fetchall()
    if check != [("ok",)]:
        return "SQLite's check: " + "; ".join(str(row[0]) for row in check[:3])
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version != JOURNAL_VERSION:
        return f"schema version {version}, where this pciguard writes {JOURNAL_VERSION}"
    for table, columns in _COLUMNS.items():
        found = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        if found != columns:
            return f"table {table} has columns {found or 'none'}, not {columns}"
    for bdf, state, uid in db.execute("SELECT bdf, state, uid FROM devices"):
        if not _is_bdf(bdf) or state not in DEVICE_STATES or not (uid is None or isinstance(uid, int)):
            return f"a device row is malformed ({str(bdf)[:40]!r}, {str(state)[:20]!r})"
    for op_id, devices, started in db.execute("SELECT id, devices, started FROM operations"):
        if not isinstance(devices, str) or not all(map(_is_bdf, devices.split())):
            return f"operation #{op_id} names devices that are not PCI addresses"
        if not isinstance(started, int | float):
            return f"operation #{op_id} has no start time"
    for op_id, status in db.execute("SELECT operation, status FROM steps"):
        if status not in STEP_STATES:
            return f"a step of operation #{op_id} has status {str(status)[:20]!r}"
    return None


def _is_bdf(text: object) -> bool:
    try:
        return isinstance(text, str) and str(Bdf.parse(text)) == text
    except ValueError:
        return False


def _holder(fd: int) -> str:
    """Who holds the lock, from the pid its holder wrote into it."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    if not text.isdigit():
        return "another pciguard holds the lock"
    pid = int(text)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read(200).replace(b"\0", b" ").decode("utf-8", "replace").strip()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read(400).rpartition(b")")[2].split()[0].decode()
    except (OSError, IndexError):
        return f"pid {pid} held the lock and may still hold it"
    stopped = " and is stopped (resume it with kill -CONT, or end it)" if state in ("T", "t") else ""
    return f"pid {pid} ({command or '?'}) holds the lock{stopped}"
