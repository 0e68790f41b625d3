"""pciguard killed (SIGKILL) at any step of an operation in a Xen dom0 — before each
sysfs write and each ``xl`` command that changes the host, and before the journal
records the end: the next pciguard brings every device of it to pciback with no guest
holding it, and keeps every journal record (fake dom0: fakekernel and fakexen)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import CORPUS, bdf, example, journal_records
from fakekernel import driver_of, installed, prepare
from fakexen import FakeXl, dom0
from pciguard.platforms.linux.enforce import Enforcer
from pciguard.platforms.linux.journal import Journal
from pciguard.platforms.xen import platform
from pciguard.platforms.xen.platform import Ran

TESTS = CORPUS.parent
NIC = "0000:03:00.0"
# (operation, the writes and xl commands it makes)
OPERATIONS = [("quarantine", 3), ("assign", 2), ("release", 2), ("unquarantine", 3)]
BEFORE = {"assign": ["quarantine"], "release": ["quarantine", "assign"], "unquarantine": ["quarantine"]}
CRASH_POINTS = [(op, str(n)) for op, count in OPERATIONS for n in [*range(1, count + 1), "finish"]]


def fake_xl(root: Path) -> Callable[[tuple[str, ...]], Ran]:
    def run(argv: tuple[str, ...]) -> Ran:
        xl = FakeXl.load(root)
        ran = xl(argv)
        xl.save()
        return ran

    return run


@pytest.mark.parametrize(("operation", "kill_at"), CRASH_POINTS)
def test_a_crash_on_xen_at_any_step_ends_with_pciback_and_the_journal_intact(
    tree: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, operation: str, kill_at: str
) -> None:
    root = dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")
    prepare(root, example("workstation"))
    FakeXl(root).save()
    monkeypatch.setattr(platform, "run_xl", fake_xl(root))
    enforcer = Enforcer(str(root), root / "state")
    with installed(root):
        for step in BEFORE.get(operation, []):
            if step == "assign":
                enforcer.assign(bdf(NIC), "vm1", None)
            else:
                enforcer.quarantine(bdf(NIC))
    before = journal_records(root / "state")
    argv = [sys.executable, str(TESTS / "xen/crash_run.py"), str(root), kill_at, operation, NIC]
    argv += ["--to", "vm1"] if operation == "assign" else []
    argv += ["--root", str(root), "--state-dir", str(root / "state")]
    crashed = subprocess.run(
        argv, env={**os.environ, "PYTHONPATH": str(TESTS)}, capture_output=True, text=True
    )
    assert crashed.returncode == -9, crashed.stderr
    with installed(root):
        (note,) = enforcer.recover_interrupted()
    assert driver_of(root, NIC) == "pciback" and FakeXl.load(root).attached == {}, note
    assert set(before) <= set(journal_records(root / "state"))
    journal = Journal(root / "state")
    interrupted = journal.operations()[-1]
    assert interrupted.name == operation and interrupted.outcome and "recovered" in interrupted.outcome
    assert journal.devices()[NIC].state == "quarantined"
    journal.close()
    with installed(root):  # ... and from there it goes back to its own driver
        enforcer.unquarantine(bdf(NIC))
    assert driver_of(root, NIC) == "e1000e"
