"""Shared helpers: build a simulated world and watch its invariants after every call."""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fakesys import Kernel, render
from pciguard.checks import Options, RmrrPolicy
from pciguard.formats.platform_file import load_platform, parse_platform
from pciguard.legacy import Flaw
from pciguard.legacy.platform import make_platform
from pciguard.legacy.toolstack import make_toolstack
from pciguard.model import Bdf, Host
from pciguard.platforms.linux import Reading, read_host
from pciguard.platforms.sim import CallRecord, SimPlatform
from pciguard.report import AuditReport, audit_host, linux_holder
from pciguard.toolstack import Toolstack
from pciguard.verify.invariants import Violation, check_all

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CORPUS = Path(__file__).resolve().parent / "corpus"

pytest_plugins = ["lab.fixtures"]  # the real-kernel lab's machines (tests/lab)


def bdf(text: str) -> Bdf:
    return Bdf.parse(text)


def example(name: str) -> Host:
    return load_platform(EXAMPLES / f"{name}.yaml")


@dataclass
class World:
    host: Host
    platform: SimPlatform
    toolstack: Toolstack
    violations: list[Violation] = field(default_factory=list)

    def watch(self, _: CallRecord | None = None) -> None:
        for v in check_all(self.toolstack, self.platform):
            if v not in self.violations:
                self.violations.append(v)

    @property
    def broken(self) -> set[str]:
        return {v.invariant for v in self.violations}

    def calls(self) -> list[str]:
        return [r.call for r in self.platform.log]


def world(
    host: Host | str,
    *flaws: Flaw,
    quarantine: str = "block",
    allow_unsafe_interrupts: bool = False,
    rmrr: RmrrPolicy = RmrrPolicy.STRICT,
    vms: tuple[str, ...] = ("vm1",),
) -> World:
    if isinstance(host, str):
        host = example(host)
    platform = make_platform(host, quarantine_mode=quarantine, flaws=flaws)
    toolstack = make_toolstack(platform, Options(allow_unsafe_interrupts, rmrr, frozenset(flaws)))
    w = World(host, platform, toolstack)
    for vm in vms:
        toolstack.create_vm(vm)
    platform.observers.append(w.watch)
    toolstack.observers.append(w.watch)
    return w


NO_IOMMU_HOST = """
name: no-iommu
devices:
  - {bdf: 0000:00:01.0, kind: root-port, acs: full, driver: pcieport,
     children: [{bdf: 0000:01:00.0, kind: endpoint, name: NIC, driver: e1000e}]}
"""


@pytest.fixture
def no_iommu_host() -> Host:
    return parse_platform(NO_IOMMU_HOST, "no-iommu")


def as_nobody(action: Callable[[], object], uid: int = 65534) -> str:
    """Run ``action`` in a forked child that dropped to ``uid`` and the same gid (65534:
    nobody, an ordinary user); return ``str`` of what it returned, or of the exception
    it raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            answer = str(action())
        except BaseException as exc:
            answer = f"{type(exc).__name__}: {exc}"
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


# -- Linux hosts: simulated hosts rendered as fake sysfs trees (tests/fakesys.py) --
Audit = Callable[..., AuditReport]


def audit_reading(reading: Reading) -> AuditReport:
    host = reading.host
    return audit_host(host, Options(), "test", linux_holder(host, reading.facts), facts=reading.facts)


@pytest.fixture
def tree(tmp_path: Path) -> Callable[..., Path]:
    """tree(host_or_example, **kernel) renders a host and returns the tree's root."""

    def make(host: Host | str, **kernel: object) -> Path:
        if isinstance(host, str):
            host = example(host)
        root = tmp_path / f"root{len(list(tmp_path.iterdir()))}"
        return render(host, root, Kernel(**kernel))  # type: ignore[arg-type]

    return make


@pytest.fixture
def audit_tree(tree: Callable[..., Path]) -> Audit:
    def run(host: Host | str, **kernel: object) -> AuditReport:
        return audit_reading(read_host(str(tree(host, **kernel))))

    return run


def journal_records(state: Path) -> list[tuple[object, ...]]:
    """Every record of the journal under ``state`` (operations, steps, the guard's
    decisions), to check that a crash lost none; [] when there is no journal yet."""
    if not (state / "journal.sqlite").exists():
        return []
    with sqlite3.connect(state / "journal.sqlite") as db:
        operations = [("op", *r) for r in db.execute("SELECT id, name, devices, started FROM operations")]
        steps = [("step", *r) for r in db.execute("SELECT operation, number, description FROM steps")]
        decisions = [("decision", *r) for r in db.execute("SELECT id, decision FROM decisions")]
    return operations + steps + decisions


# `HYPOTHESIS_PROFILE=thorough python -m pytest tests/stateful` digs much deeper.
from hypothesis import settings as _settings  # noqa: E402

_settings.register_profile("fast", max_examples=300, deadline=None)
_settings.register_profile("thorough", max_examples=5000, deadline=None)
_settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "fast"))


def header(path: Path) -> tuple[str, int | None, int | None]:
    """A bad-corpus file's promise: the error it must give (``# error:``) and where (``# at: line:col``)."""
    text = path.read_text()
    error = re.search(r"^# error: (.+)$", text, re.M)
    place = re.search(r"^# at: (\d+)(?::(\d+))?$", text, re.M)
    assert error, f"{path.name} lacks an '# error:' header"
    line = int(place[1]) if place else None
    col = int(place[2]) if place and place[2] else None
    return error[1], line, col


@dataclass
class StateMoves:
    """Every change of a ledger record's ``state`` while watched: who made it, and from
    what to what (see ``state_moves``)."""

    made: list[tuple[str, str, str]] = field(default_factory=list)  # (function, before, after)

    def outside_the_table(self) -> list[str]:
        """Changes made other than by ``Toolstack._move``, or between two states no row
        of the ownership table joins."""
        from pciguard.model.ownership import TRANSITIONS

        rows = {(s.value, n.value) for (s, _), n in TRANSITIONS.items()}
        return [
            f"{who}: {before} -> {after}"
            for who, before, after in self.made
            if who != "Toolstack._move" or (before, after) not in rows
        ]


@pytest.fixture
def state_moves(monkeypatch: pytest.MonkeyPatch) -> StateMoves:
    """Watch every assignment to a ``DeviceRecord``'s state, outside its constructor."""
    import sys

    from pciguard.toolstack import DeviceRecord

    moves = StateMoves()
    plain = object.__setattr__

    def watched(record: DeviceRecord, name: str, value: object) -> None:
        if name == "state":
            caller = sys._getframe(1).f_code
            if caller is not DeviceRecord.__init__.__code__:  # a new record is no move
                before = getattr(record, "state", None)
                moves.made.append((caller.co_qualname, str(before), str(value)))
        plain(record, name, value)

    monkeypatch.setattr(DeviceRecord, "__setattr__", watched)
    return moves
