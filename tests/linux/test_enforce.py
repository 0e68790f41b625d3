"""Quarantine and unquarantine on a (fake) Linux host: the exact sysfs writes, the
refusals, the journal, the lock, and crash recovery at every step.

The kernel's answers to the writes are emulated by ``fakekernel.py`` on trees rendered
by ``fakesys.py``; the real kernel is in tests/lab.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CORPUS, as_nobody, bdf, example, journal_records
from fakekernel import driver_of, installed, prepare
from pciguard.cli.main import app
from pciguard.errors import RefusedError, StepFailed
from pciguard.platforms.linux.enforce import Enforcer
from pciguard.platforms.linux.journal import Journal, JournalError

TESTS = CORPUS.parent
NIC, GPU, GPU_AUDIO = "0000:03:00.0", "0000:01:00.0", "0000:01:00.1"
TESTS_ON_PATH = {**os.environ, "PYTHONPATH": str(TESTS)}  # for crash_run.py
runner = CliRunner()


@pytest.fixture
def host_tree(tree: Callable[..., Path]) -> Callable[..., Path]:
    """A rendered workstation whose kernel answers writes (vfio-pci loaded unless told),
    booted from its NVMe disk with the integrated GPU as console."""

    def make(name: str = "workstation", vfio_loaded: bool = True, **kernel: object) -> Path:
        if name == "workstation":
            kernel = {
                "root_disk": bdf("0000:02:00.0"),
                "boot_vga": frozenset({bdf("0000:00:02.0")}),
                **kernel,
            }
        root = tree(name, **kernel)
        prepare(root, example(name), vfio_loaded)
        return root

    return make


@pytest.fixture
def emulated(host_tree: Callable[..., Path]) -> Iterator[tuple[Path, list[tuple[str, str]]]]:
    root = host_tree()
    with installed(root) as writes:
        yield root, writes


def where(root: Path) -> list[str]:
    return ["--root", str(root), "--state-dir", str(root / "state")]


def enforcer(root: Path) -> Enforcer:
    return Enforcer(str(root), root / "state")


def test_quarantine_writes_exactly_this(emulated: tuple[Path, list[tuple[str, str]]]) -> None:
    root, writes = emulated
    result = enforcer(root).quarantine(bdf(NIC))
    assert writes == [
        (f"sys/bus/pci/devices/{NIC}/driver/unbind", NIC),
        (f"sys/bus/pci/devices/{NIC}/driver_override", "vfio-pci"),
        ("sys/bus/pci/drivers_probe", NIC),
        (f"sys/bus/pci/devices/{NIC}/reset", "1"),
    ]
    assert [(w.path, w.value) for w in result.writes] == writes
    assert driver_of(root, NIC) == "vfio-pci"
    row = Journal(root / "state").devices()[NIC]
    assert (row.state, row.host_driver) == ("quarantined", "e1000e")


def test_unquarantine_resets_then_gives_the_driver_back(emulated: tuple[Path, list[tuple[str, str]]]) -> None:
    root, writes = emulated
    enforcer(root).quarantine(bdf(NIC))
    writes.clear()
    enforcer(root).unquarantine(bdf(NIC))
    assert writes == [
        (f"sys/bus/pci/devices/{NIC}/reset", "1"),
        ("sys/bus/pci/drivers/vfio-pci/unbind", NIC),
        (f"sys/bus/pci/devices/{NIC}/driver_override", "\n"),
        ("sys/bus/pci/drivers/e1000e/bind", NIC),
    ]
    assert driver_of(root, NIC) == "e1000e"
    assert Journal(root / "state").devices()[NIC].state == "host"


def test_group_siblings_go_together_and_come_back_to_their_own_drivers(
    emulated: tuple[Path, list[tuple[str, str]]],
) -> None:
    root, _ = emulated
    assert enforcer(root).quarantine(bdf(GPU)).devices == (bdf(GPU), bdf(GPU_AUDIO))
    assert (driver_of(root, GPU), driver_of(root, GPU_AUDIO)) == ("vfio-pci", "vfio-pci")
    enforcer(root).unquarantine(bdf(GPU))
    assert (driver_of(root, GPU), driver_of(root, GPU_AUDIO)) == ("nouveau", "vfio-pci")
    enforcer(root).unquarantine(bdf(GPU_AUDIO))
    assert driver_of(root, GPU_AUDIO) == "snd_hda_intel"


def test_dry_run_prints_every_write_and_changes_nothing(host_tree: Callable[..., Path]) -> None:
    root = host_tree()
    with installed(root) as writes:
        result = runner.invoke(app, ["quarantine", GPU, "--dry-run", *where(root)])
    assert result.exit_code == 0, result.output
    assert writes == []
    assert driver_of(root, GPU) == "nouveau"
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert lines[1:] == [
        f"echo {GPU} > /sys/bus/pci/devices/{GPU}/driver/unbind",
        f"echo {GPU_AUDIO} > /sys/bus/pci/devices/{GPU_AUDIO}/driver/unbind",
        f"echo vfio-pci > /sys/bus/pci/devices/{GPU}/driver_override",
        f"echo {GPU} > /sys/bus/pci/drivers_probe",
        f"echo 1 > /sys/bus/pci/devices/{GPU}/reset",
        f"echo vfio-pci > /sys/bus/pci/devices/{GPU_AUDIO}/driver_override",
        f"echo {GPU_AUDIO} > /sys/bus/pci/drivers_probe",
        f"echo 1 > /sys/bus/pci/devices/{GPU_AUDIO}/reset",
    ]
    assert Journal(root / "state").operations() == []


def test_an_ordinary_user_can_see_the_plan(host_tree: Callable[..., Path]) -> None:
    root = host_tree()
    for folder in [root, *root.parents]:
        if str(folder).startswith("/tmp/"):
            folder.chmod(0o755)
    plan = as_nobody(lambda: [str(w) for w in enforcer(root).quarantine(bdf(NIC), dry_run=True).writes])
    assert f"echo vfio-pci > /sys/bus/pci/devices/{NIC}/driver_override" in plan
    assert not (root / "state").exists()  # and nothing was written, not even a journal


@pytest.mark.parametrize(
    ("device", "why"),
    [
        ("0000:00:1c.0", "bridges stay with the host"),
        ("0000:02:00.0", "host-critical"),  # the boot disk
        ("0000:00:02.0", "host-critical"),  # the console GPU
        ("0000:00:14.0", "firmware needs 1:1 DMA regions"),  # USB controller with an RMRR
        ("0000:09:00.0", "not a PCI device of this host"),
    ],
)
def test_refusals_say_why_and_change_nothing(
    emulated: tuple[Path, list[tuple[str, str]]], device: str, why: str
) -> None:
    root, writes = emulated
    with pytest.raises(RefusedError, match=why):
        enforcer(root).quarantine(bdf(device))
    assert writes == []
    assert Journal(root / "state").operations() == []


def test_the_console_gpu_is_quarantined_only_when_asked(emulated: tuple[Path, list[tuple[str, str]]]) -> None:
    root, _ = emulated
    console = "0000:00:02.0"
    with pytest.raises(RefusedError, match="console GPU"):
        enforcer(root).quarantine(bdf(console))
    result = runner.invoke(app, ["quarantine", console, "--console-gpu", *where(root)])
    assert result.exit_code == 0, result.output
    assert driver_of(root, console) == "vfio-pci"


def test_a_pf_with_vfs_enabled_is_refused(host_tree: Callable[..., Path]) -> None:
    root = host_tree("server")
    with installed(root) as writes, pytest.raises(RefusedError, match="sriov_numvfs"):
        enforcer(root).quarantine(bdf("0000:03:00.0"))
    assert writes == []


def test_an_identity_group_of_one_device_is_made_translating_and_restored(
    host_tree: Callable[..., Path],
) -> None:
    root = host_tree(domain="identity")  # iommu=pt: vfio-pci alone would not block DMA
    group_type = (root / f"sys/bus/pci/devices/{NIC}/iommu_group").resolve() / "type"
    rel = str(group_type.relative_to(root))
    with installed(root) as writes:
        enforcer(root).quarantine(bdf(NIC))
        assert writes[:2] == [(f"sys/bus/pci/devices/{NIC}/driver/unbind", NIC), (rel, "DMA")]
        assert group_type.read_text() == "DMA" and driver_of(root, NIC) == "vfio-pci"
        assert Journal(root / "state").devices()[NIC].group_type == "identity"
        writes.clear()
        enforcer(root).unquarantine(bdf(NIC))
        assert writes[2:] == [
            (f"sys/bus/pci/devices/{NIC}/driver_override", "\n"),
            (rel, "identity"),  # as the administrator chose, once the device is the host's again
            ("sys/bus/pci/drivers/e1000e/bind", NIC),
        ]
    assert group_type.read_text() == "identity" and driver_of(root, NIC) == "e1000e"


def test_an_identity_group_of_several_devices_is_refused(host_tree: Callable[..., Path]) -> None:
    root = host_tree(domain="identity")
    with installed(root) as writes, pytest.raises(RefusedError, match="identity"):
        enforcer(root).quarantine(bdf(GPU))  # with its audio function: the kernel cannot switch it
    assert writes == []


def test_without_vfio_pci_the_step_fails_and_the_driver_comes_back(host_tree: Callable[..., Path]) -> None:
    root = host_tree(vfio_loaded=False)
    with installed(root), pytest.raises(StepFailed, match="modprobe vfio-pci"):
        enforcer(root).quarantine(bdf(NIC))
    assert driver_of(root, NIC) == "e1000e"
    (op,) = Journal(root / "state").operations()
    assert op.outcome is not None and op.outcome.startswith("failed")
    assert op.steps == (
        (f"unbind_host_driver({NIC})", "done"),
        (f"attach({NIC}, quarantine)", "failed"),
        (f"bind_host_driver({NIC})", "done"),  # unwound: the failed step changed nothing
    )


def test_the_cli_exits_5_on_a_refusal(emulated: tuple[Path, list[tuple[str, str]]]) -> None:
    root, _ = emulated
    result = runner.invoke(app, ["quarantine", "02:00.0", *where(root)])
    assert result.exit_code == 5
    assert "refused: cannot quarantine 0000:02:00.0" in result.stderr


# -- assigning to a VM's process, and back -------------------------------------------
VM_USER = 1000


def group_node(root: Path, device: str) -> Path:
    return (
        root
        / "dev/vfio"
        / os.readlink(root / "sys/bus/pci/devices" / device / "iommu_group").rsplit("/", 1)[-1]
    )


def test_assign_hands_the_group_node_to_the_vm_user_alone(
    emulated: tuple[Path, list[tuple[str, str]]],
) -> None:
    root, writes = emulated
    enforcer(root).quarantine(bdf(NIC))
    writes.clear()
    result = runner.invoke(app, ["assign", "03:00.0", "--to", "vm1", "--user", str(VM_USER), *where(root)])
    assert result.exit_code == 0, result.output
    node = group_node(root, NIC)
    assert writes == [
        (f"sys/bus/pci/devices/{NIC}/reset", "1"),
        (str(node.relative_to(root)), f"owner {VM_USER}"),
    ]
    assert (node.stat().st_uid, node.stat().st_mode & 0o777) == (VM_USER, 0o600)
    assert driver_of(root, NIC) == "vfio-pci"  # the VM's process attaches the group when it opens it
    assert "<address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>" in result.stdout
    assert f"pci = [ '{NIC}' ]" in result.stdout
    row = Journal(root / "state").devices()[NIC]
    assert (row.state, row.vm, row.uid) == ("assigned", "vm1", VM_USER)


def test_release_waits_for_the_vm_process_to_let_go(emulated: tuple[Path, list[tuple[str, str]]]) -> None:
    root, writes = emulated
    enforcer(root).quarantine(bdf(NIC))
    enforcer(root).assign(bdf(NIC), "vm1", VM_USER)
    node = group_node(root, NIC)
    fd = root / "proc/4242/fd/7"  # the VM's process, holding the group open
    fd.parent.mkdir(parents=True)
    os.symlink(f"/{node.relative_to(root)}", fd)
    with pytest.raises(RefusedError, match="process 4242 still holds"):
        enforcer(root).release(bdf(NIC))
    fd.unlink()
    writes.clear()
    enforcer(root).release(bdf(NIC))
    assert writes == [(str(node.relative_to(root)), "owner 0"), (f"sys/bus/pci/devices/{NIC}/reset", "1")]
    assert node.stat().st_uid == 0 and driver_of(root, NIC) == "vfio-pci"  # quarantine, never the host
    row = Journal(root / "state").devices()[NIC]
    assert (row.state, row.vm) == ("quarantined", None)


def test_assign_refuses_a_device_that_is_not_quarantined(
    emulated: tuple[Path, list[tuple[str, str]]],
) -> None:
    root, writes = emulated
    with pytest.raises(RefusedError, match="make it assignable"):
        enforcer(root).assign(bdf(NIC), "vm1", VM_USER)
    assert writes == []


def test_assign_refuses_without_interrupt_remapping(host_tree: Callable[..., Path]) -> None:
    root = host_tree(interrupts_remapped=False)
    with installed(root) as writes:
        enforcer(root).quarantine(bdf(NIC))
        writes.clear()
        with pytest.raises(RefusedError, match="interrupt"):
            enforcer(root).assign(bdf(NIC), "vm1", VM_USER)
    assert writes == []


# -- the journal --------------------------------------------------------------------
def test_the_journal_refuses_ordinary_users(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Journal(state).close()
    tmp_path.chmod(0o755)
    answer = as_nobody(lambda: Journal(state))
    assert answer.startswith("JournalError") and "run this as root" in answer


def test_the_journal_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Journal(state).close()
    (state / "journal.sqlite").chmod(0o644)
    with pytest.raises(JournalError, match="chmod go-rwx"):
        Journal(state)


def test_concurrent_runs_wait_for_the_lock(host_tree: Callable[..., Path]) -> None:
    root = host_tree()
    state = root / "state"
    argv = [sys.executable, str(TESTS / "linux/crash_run.py"), str(root), "0", "quarantine", NIC]
    argv += where(root)
    with Journal(state).locked():  # another pciguard at work
        run = subprocess.Popen(argv, env=TESTS_ON_PATH)
        time.sleep(1.5)
        assert run.poll() is None and driver_of(root, NIC) == "e1000e"  # waiting, nothing written
    assert run.wait(timeout=60) == 0
    assert driver_of(root, NIC) == "vfio-pci"


# -- crashes at every step ---------------------------------------------------------
# (operation, device, writes it makes): a crash just before each write, and after the
# last one but before the journal records the end.
OPERATIONS = [
    ("quarantine", NIC, 4),
    ("quarantine", GPU, 8),
    ("assign", NIC, 2),
    ("release", NIC, 2),
    ("unquarantine", NIC, 4),
    ("unquarantine", GPU, 4),
]
BEFORE = {"assign": ["quarantine"], "release": ["quarantine", "assign"], "unquarantine": ["quarantine"]}
CRASH_POINTS = [
    (op, dev, str(n)) for op, dev, writes in OPERATIONS for n in [*range(1, writes + 1), "finish"]
]


@pytest.mark.parametrize(("operation", "device", "kill_at"), CRASH_POINTS)
def test_a_crash_at_any_step_ends_in_quarantine_with_the_journal_intact(
    host_tree: Callable[..., Path], operation: str, device: str, kill_at: str
) -> None:
    root = host_tree()
    state = root / "state"
    group = (GPU, GPU_AUDIO) if device == GPU else (NIC,)
    with installed(root):
        for step in BEFORE.get(operation, []):
            if step == "assign":
                enforcer(root).assign(bdf(device), "vm1", VM_USER)
            else:
                enforcer(root).quarantine(bdf(device))
    before = journal_records(state)
    argv = [sys.executable, str(TESTS / "linux/crash_run.py"), str(root), kill_at, operation, device]
    argv += ["--to", "vm1", "--user", str(VM_USER)] if operation == "assign" else []
    argv += where(root)
    crashed = subprocess.run(argv, env=TESTS_ON_PATH, capture_output=True, text=True)
    assert crashed.returncode == -9, crashed.stderr
    # The next start recovers first: every device of the interrupted operation is
    # quarantined, none is with a host driver, and no record was lost.
    with installed(root):
        (note,) = enforcer(root).recover_interrupted()
    assert {d: driver_of(root, d) for d in group} == dict.fromkeys(group, "vfio-pci"), note
    assert set(before) <= set(journal_records(state))
    journal = Journal(state)
    interrupted = journal.operations()[-1]
    assert interrupted.name == operation and interrupted.outcome and "recovered" in interrupted.outcome
    assert {journal.devices()[d].state for d in group} == {"quarantined"}
    assert {group_node(root, d).stat().st_uid for d in group} == {0}  # no VM can open it now
    # ... and from there the device can be given back to the host.
    with installed(root):
        enforcer(root).unquarantine(bdf(device))
    assert driver_of(root, device) == example("workstation").topology[bdf(device)].driver
