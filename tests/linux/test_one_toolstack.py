"""One toolstack on a (fake) Linux host: everything the host sees is toolstack code.

- Every write under the host root is made by ``sysfs.py`` or by a ``LinuxPlatform``
  step, and every write that changes a device's driver, presence, reset or group is
  made inside a step of the Platform protocol (the fake kernel keeps each writer's
  call stack).
- The ledger's states change only through the ownership table.
- A guard killed (SIGKILL) just before any write of a hot-plug decision leaves no
  device with a host driver the policy did not allow, and loses no journal record.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import CORPUS, StateMoves, bdf, example, journal_records
from fakekernel import WRITERS, driver_of, installed, plug, prepare, unplug
from pciguard.platforms.base import STEPS
from pciguard.platforms.linux.enforce import Enforcer
from pciguard.platforms.linux.guard import Guard
from pciguard.platforms.linux.journal import Journal
from pciguard.policy import Target
from pciguard.policy.rules import parse_policy

TESTS = CORPUS.parent
NIC, ENCLOSURE, FAKE_BRIDGE, USB = "0000:03:00.0", "0000:05:00.0", "0000:06:00.0", "0000:00:14.0"
BELOW_BRIDGE = ("0000:07:00.0", "0000:08:00.0")
LINUX = f"{os.sep}pciguard{os.sep}platforms{os.sep}linux{os.sep}"
# Writes that change what drives a device, whether it is on the bus, its state, or
# whose IOMMU domain it is in.
OWNERSHIP_WRITES = ("/unbind", "/bind", "drivers_probe", "/reset", "/remove", "/type")


def workstation(tree: Callable[..., Path], vfio_loaded: bool = True) -> Path:
    """The workstation, its Thunderbolt devices not plugged in yet and its USB
    controller without a driver; the kernel answers writes."""
    root = tree("workstation", root_disk=bdf("0000:02:00.0"), boot_vga=frozenset({bdf("0000:00:02.0")}))
    prepare(root, example("workstation"), vfio_loaded)
    unplug(root, ENCLOSURE)
    unplug(root, FAKE_BRIDGE)
    (root / "sys/bus/pci/devices" / USB / "driver").unlink()
    return root


def test_only_sysfs_and_platform_steps_write_to_the_host(
    tree: Callable[..., Path], state_moves: StateMoves
) -> None:
    root = workstation(tree)
    tb = root / "sys/bus/thunderbolt/devices/0-1"
    tb.mkdir(parents=True)
    for attribute, value in (("authorized", "0"), ("vendor_name", "Apple Inc."), ("device_name", "Dock")):
        (tb / attribute).write_text(value + "\n")
    WRITERS.clear()
    with installed(root):
        rules = 'allow id 1987:5012\nallow thunderbolt vendor-name "Apple*"\nallow id 8086:*'
        guard = Guard(parse_policy(rules, "test.rules"), str(root), root / "state")
        guard.start()
        plug(root, ENCLOSURE)
        assert guard.added("pci", ENCLOSURE).outcome == "bound to host driver nvme"  # type: ignore[union-attr]
        assert "quarantined" in guard.control(ENCLOSURE, Target.QUARANTINE).outcome
        assert guard.control(ENCLOSURE, Target.ALLOW).outcome == "bound to host driver nvme"
        for device in (FAKE_BRIDGE, *BELOW_BRIDGE):
            plug(root, device)
        assert guard.added("pci", FAKE_BRIDGE).target == "reject"  # type: ignore[union-attr]
        enforcer = Enforcer(str(root), root / "state")
        enforcer.quarantine(bdf(NIC))
        enforcer.assign(bdf(NIC), "vm1", 1000)
        enforcer.release(bdf(NIC))
        journal = Journal(root / "state")  # an unquarantine killed before its first step
        journal.begin("unquarantine", [NIC], {NIC: "e1000e"})
        journal.close()
        (recovered,) = enforcer.recover_interrupted()
        assert "recovered" in recovered
        enforcer.unquarantine(bdf(NIC))
        guard.stop()
    assert driver_of(root, NIC) == "e1000e" and (tb / "authorized").read_text().strip() == "1"
    kinds = set()
    for path, value, stack in WRITERS:
        writer = stack[-1]
        assert LINUX in writer.filename and Path(writer.filename).name in ("sysfs.py", "platform.py"), (
            f"{path} written by {writer.filename}:{writer.lineno} ({writer.name})"
        )
        steps = [f.name for f in stack if Path(f.filename).name == "platform.py" and f.name in STEPS]
        changes_ownership = path.endswith(OWNERSHIP_WRITES) or path.startswith("dev/vfio")
        if path.endswith("driver_override") and value.strip() == "vfio-pci":
            changes_ownership = True
        if changes_ownership:
            kinds.add(next(k for k in (*OWNERSHIP_WRITES, "dev/vfio", "override") if k in path))
            assert steps, (
                f"{path} <- {value.strip()!r} written outside a platform step: {stack.format()[-3:]}"
            )
    # The flow above makes every kind of write: the test cannot pass by seeing none.
    assert kinds >= {"/unbind", "/bind", "drivers_probe", "/reset", "/remove", "dev/vfio"}, kinds
    assert state_moves.made and not state_moves.outside_the_table()


def test_the_ledger_moves_only_through_the_ownership_table_in_every_scenario(state_moves: StateMoves) -> None:
    from pciguard.formats.scenario_file import load_scenario
    from pciguard.simulate import run

    for path in sorted((TESTS.parent / "examples/scenarios").glob("*.yaml")):
        run(load_scenario(path))
    assert len(state_moves.made) > 100 and not state_moves.outside_the_table()


def test_a_state_set_by_hand_is_caught(state_moves: StateMoves) -> None:
    """The watch itself: a record moved other than through the table is reported."""
    from conftest import world
    from pciguard.model.ownership import State

    w = world("workstation")
    w.toolstack.ledger[bdf(NIC)].state = State.QUARANTINED
    assert state_moves.outside_the_table() == ["test_a_state_set_by_hand_is_caught: host -> quarantined"]


# -- a guard killed half-way through a decision ------------------------------------
DECISIONS = [
    ("allow id 1987:5012", True),  # offered to the host's drivers: nvme binds
    ("reject id 1987:*", True),  # taken off the bus
    ("quarantine id 1987:*", False),  # nvme bound it at enumeration (no vfio-pci): unbound
]


@pytest.mark.parametrize(("rules", "vfio_loaded"), DECISIONS)
def test_a_guard_killed_before_any_write_of_a_decision_leaves_no_host_driver_policy_did_not_allow(
    tree: Callable[..., Path], rules: str, vfio_loaded: bool
) -> None:
    allowed = rules.startswith("allow")
    writes = int(_guard_run(workstation(tree, vfio_loaded), rules, "0").stdout.split()[-1])
    assert writes > 0 or not vfio_loaded
    for kill_at in [*map(str, range(1, writes + 1)), "finish"]:
        root = workstation(tree, vfio_loaded)
        with installed(root):
            drivers_before = {
                d.name: driver_of(root, d.name) for d in (root / "sys/bus/pci/devices").iterdir()
            }
        crashed = _guard_run(root, rules, kill_at)
        assert crashed.returncode == -9, (kill_at, crashed.stderr)
        kept = journal_records(root / "state")
        with installed(root):  # the guard again: it recovers first
            guard = Guard(parse_policy(rules, "test.rules"), str(root), root / "state")
            guard.start()
            guard.stop()
        for link in (root / "sys/bus/pci/devices").iterdir():
            driver = driver_of(root, link.name)
            fine = driver in (None, "vfio-pci") or driver == drivers_before.get(link.name)
            fine = fine or (link.name == ENCLOSURE and allowed)
            assert fine, f"killed before write {kill_at}: {link.name} is with {driver}; {guard.recovered}"
        assert set(kept) <= set(journal_records(root / "state")), kill_at
        if kill_at != "finish" or writes:
            assert any("recover" in note for note in guard.recovered), (kill_at, guard.recovered)


def _guard_run(root: Path, rules: str, kill_at: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(TESTS / "linux/guard_crash_run.py"), str(root), rules, ENCLOSURE, kill_at]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
