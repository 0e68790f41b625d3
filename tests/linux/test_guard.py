"""The hot-plug guard on a (fake) Linux host: automatic probing off while it runs,
each policy target carried out on a device as it is plugged in, decisions journaled,
and the control socket (who may use it, and what a malformed request changes: nothing).

Devices are plugged and unplugged with ``fakekernel.plug``/``unplug``; the real kernel,
with QEMU hot-plugging into empty root ports, is in tests/lab.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import as_nobody, bdf, example
from fakekernel import CLAIM, driver_of, installed, plug, prepare, unplug
from pciguard.cli.main import app
from pciguard.platforms.linux.guard import Guard, handle, request, serve
from pciguard.platforms.linux.journal import Journal
from pciguard.platforms.linux.sysfs import Fs, read_arrival, read_host
from pciguard.policy import PresentPolicy
from pciguard.policy.rules import Subject, parse_policy

NIC, ENCLOSURE, FAKE_BRIDGE = "0000:03:00.0", "0000:05:00.0", "0000:06:00.0"
AUTOPROBE = "sys/bus/pci/drivers_autoprobe"


@dataclass
class Uevents:
    """The kernel's announcements, as the guard's loop reads them: plug, then announce."""

    root: Path
    queue: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.read_end, self.write_end = os.pipe()

    def fileno(self) -> int:
        return self.read_end

    def poll(self, timeout: float = 0) -> Any:
        if not self.queue:
            return None
        os.read(self.read_end, 1)
        return self.queue.pop(0)

    def plug(self, device: str) -> None:
        plug(self.root, device)
        self.announce(Event("add", "pci", device, None))

    def announce(self, event: Event) -> None:
        self.queue.append(event)
        os.write(self.write_end, b"x")


@dataclass
class Event:
    action: str
    subsystem: str
    sys_name: str
    device_type: str | None


@pytest.fixture
def host(tree: Callable[..., Path]) -> Iterator[Path]:
    """The workstation with its Thunderbolt devices not yet plugged in; the kernel
    answers writes."""
    root = tree("workstation", root_disk=bdf("0000:02:00.0"), boot_vga=frozenset({bdf("0000:00:02.0")}))
    prepare(root, example("workstation"))
    unplug(root, ENCLOSURE)
    unplug(root, FAKE_BRIDGE)
    with installed(root):
        yield root


def guard(root: Path, rules: str, present: PresentPolicy = PresentPolicy.KEEP) -> Guard:
    return Guard(parse_policy(rules, "test.rules"), str(root), root / "state", present)


@pytest.mark.parametrize("name", ["workstation", "server"])
def test_a_function_read_alone_is_judged_as_in_a_whole_reading(tree: Callable[..., Path], name: str) -> None:
    root = tree(name)
    host = read_host(str(root)).host
    for device in host.topology:
        arrival = read_arrival(Fs(str(root)), device)
        whole = Subject.of_function(host, device)
        assert arrival is not None
        alone = (arrival.ids, arrival.class_code, arrival.ports, arrival.external, arrival.bridge)
        assert alone == (whole.ids, whole.class_code, whole.ports, whole.external, whole.bridge), device
        assert arrival.translated == whole.iommu and arrival.driver == host.topology[device].driver


def test_probing_is_off_while_the_guard_runs_and_restored_after(host: Path) -> None:
    g = guard(host, "")
    made = g.start()
    assert (host / AUTOPROBE).read_text() == "0"
    assert {d.target for d in made} == {"keep"}  # present devices are left as they were
    assert driver_of(host, NIC) == "e1000e"
    g.stop()
    assert (host / AUTOPROBE).read_text().strip() == "1"


def test_vfio_pci_claims_new_devices_before_any_host_driver(host: Path) -> None:
    g = guard(host, "")
    g.start()
    assert g.claiming and (host / CLAIM).exists()
    plug(host, ENCLOSURE)
    assert driver_of(host, ENCLOSURE) == "vfio-pci"  # at enumeration, before the guard decides
    decision = g.added("pci", ENCLOSURE)
    assert decision is not None and decision.bound_before is None
    assert decision.outcome == "quarantined: vfio-pci claimed it as the kernel found it"
    g.stop()
    assert not (host / CLAIM).exists()


def test_allowing_a_device_never_lifts_the_claim_for_others(
    host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = guard(host, "allow id 1987:5012")
    g.start()
    plug(host, ENCLOSURE)
    written: list[str] = []
    kernel = Fs.write  # the fake kernel's, installed by the fixture
    monkeypatch.setattr(Fs, "write", lambda fs, rel, text: (written.append(rel), kernel(fs, rel, text))[1])
    decision = g.added("pci", ENCLOSURE)
    assert decision is not None and decision.outcome == "bound to host driver nvme"
    assert not any(rel.endswith(("remove_id", "drivers_probe")) for rel in written), written
    assert "sys/bus/pci/drivers/nvme/bind" in written and (host / CLAIM).exists()
    g.stop()


def test_an_allowed_device_no_driver_takes_is_held(host: Path) -> None:
    shutil.rmtree(host / "sys/bus/pci/drivers/nvme")  # its module is not loaded
    g = guard(host, "allow id 1987:5012")
    g.start()
    plug(host, ENCLOSURE)
    decision = g.added("pci", ENCLOSURE)
    assert decision is not None and decision.outcome.startswith("no host driver claims it")
    device = host / "sys/bus/pci/devices" / ENCLOSURE
    assert driver_of(host, ENCLOSURE) is None
    assert (device / "driver_override").read_text().strip() == "pciguard-hold"
    g.stop()


def test_devices_present_without_a_driver_are_held_out_of_the_claim(host: Path) -> None:
    usb = host / "sys/bus/pci/devices/0000:00:14.0"
    (usb / "driver").unlink()  # no driver wanted it at boot
    g = guard(host, "")
    g.start()
    assert driver_of(host, usb.name) is None  # not claimed by vfio-pci's catch-all ID
    assert (usb / "driver_override").read_text().strip() == "pciguard-hold"
    g.stop()
    assert (usb / "driver_override").read_text().strip() == "(null)"


def test_a_guard_after_a_killed_one_clears_what_that_one_left(host: Path) -> None:
    usb = host / "sys/bus/pci/devices/0000:00:14.0"
    (usb / "driver").unlink()
    first = guard(host, "")
    first.start()  # and killed: nothing undone
    first.journal.close()
    assert (host / CLAIM).exists() and (usb / "driver_override").read_text().strip() == "pciguard-hold"
    second = guard(host, "")
    second.start()
    second.stop()
    assert not (host / CLAIM).exists() and (usb / "driver_override").read_text().strip() == "(null)"
    assert (host / AUTOPROBE).read_text().strip() == "1"  # as before the first guard


def test_without_vfio_pci_a_loaded_driver_binds_first_and_the_guard_says_so(
    tree: Callable[..., Path],
) -> None:
    root = tree("workstation", root_disk=bdf("0000:02:00.0"), boot_vga=frozenset({bdf("0000:00:02.0")}))
    prepare(root, example("workstation"), vfio_loaded=False)
    unplug(root, ENCLOSURE)
    with installed(root):
        g = guard(root, "")
        g.start()
        assert not g.claiming
        plug(root, ENCLOSURE)
        assert driver_of(root, ENCLOSURE) == "nvme"
        decision = g.added("pci", ENCLOSURE)
        assert decision is not None and decision.bound_before == "nvme"
        assert "vfio-pci driver is not loaded" in decision.outcome
        assert "the kernel had bound nvme to it before the guard could act" in decision.outcome
        g.stop()


@pytest.mark.parametrize(
    ("rules", "target", "driver"),
    [
        ("allow id 1987:5012 via-port 0000:00:07.0", "allow", "nvme"),
        ("quarantine id 1987:*\nallow", "quarantine", "vfio-pci"),
        ("allow id 1987:5012 via-port 0000:00:07.1", "quarantine", "vfio-pci"),  # implicit
        ("reject if external", "reject", None),
    ],
)
def test_a_plugged_device_gets_its_target(host: Path, rules: str, target: str, driver: str | None) -> None:
    g = guard(host, rules)
    g.start()
    plug(host, ENCLOSURE)
    decision = g.added("pci", ENCLOSURE)
    assert decision is not None and decision.target == target
    assert driver_of(host, ENCLOSURE) == driver
    listed = (host / "sys/bus/pci/devices" / ENCLOSURE).is_symlink()
    assert listed is (target != "reject")
    journaled = [json.loads(d) for _, d in Journal(host / "state").decisions()]
    shown = CliRunner().invoke(app, ["journal", "--state-dir", str(host / "state")])
    assert f"hotplug {ENCLOSURE}: {target}" in shown.output
    assert journaled[-1]["device"] == ENCLOSURE and journaled[-1]["target"] == target
    assert journaled[-1]["rule"] == decision.rule and decision.latency_ms > 0
    g.stop()


def test_another_device_in_the_same_slot_is_judged_as_itself(host: Path) -> None:
    g = guard(host, "allow id 1987:5012")
    g.start()
    plug(host, ENCLOSURE)
    assert g.added("pci", ENCLOSURE).target == "allow"  # type: ignore[union-attr]
    unplug(host, ENCLOSURE)
    g.removed(ENCLOSURE)
    device = next(host.glob(f"sys/devices/**/{ENCLOSURE}"))
    data = bytearray((device / "config").read_bytes())
    data[0:4] = bytes.fromhex("86 80 3d 15")  # now an Intel device: 8086:153d
    (device / "config").write_bytes(bytes(data))
    plug(host, ENCLOSURE)
    again = g.added("pci", ENCLOSURE)
    assert again is not None and again.target == "quarantine" and again.rule.startswith("implicit")
    g.stop()


def test_a_rejected_device_stays_listed_after_it_is_gone(host: Path) -> None:
    g = guard(host, "reject id 1987:*")
    g.start()
    plug(host, ENCLOSURE)
    g.added("pci", ENCLOSURE)
    g.removed(ENCLOSURE)  # the kernel's remove event, after the guard's own removal
    assert g.decisions[ENCLOSURE].target == "reject"
    g.policy = parse_policy("allow")
    plug(host, ENCLOSURE)
    g.added("pci", ENCLOSURE)
    unplug(host, ENCLOSURE)
    g.removed(ENCLOSURE)  # pulled out by hand: nothing left to list
    assert ENCLOSURE not in g.decisions
    g.stop()


def test_a_device_presenting_itself_as_a_bridge_is_removed_with_what_is_below(host: Path) -> None:
    g = guard(host, "allow id 8086:*")
    g.start()
    for device in (FAKE_BRIDGE, "0000:07:00.0", "0000:08:00.0"):
        plug(host, device)
    decision = g.added("pci", FAKE_BRIDGE)
    assert decision is not None and decision.target == "reject"
    assert "does not say 'bridge'" in decision.rule
    assert not any((host / "sys/bus/pci/devices" / d).exists() for d in ("0000:07:00.0", "0000:08:00.0"))
    g.stop()


def test_present_devices_follow_the_present_device_policy(host: Path) -> None:
    rules = "allow id one-of { 10de:* 144d:* 8086:* } if none-of { external }\nallow id 0000:0000\n"
    g = guard(host, rules.replace("8086:*", "8086:3e92 8086:a36d"), PresentPolicy.APPLY_POLICY)
    made = {d.device: d for d in g.start()}
    assert made[NIC].target == "quarantine" and driver_of(host, NIC) == "vfio-pci"
    assert made["0000:01:00.0"].target == "allow" and driver_of(host, "0000:01:00.0") == "nouveau"
    g.stop()


def test_a_refused_quarantine_leaves_the_device_without_a_driver(host: Path) -> None:
    g = guard(host, "quarantine", PresentPolicy.APPLY_POLICY)
    made = {d.device: d for d in g.start()}
    console = made["0000:00:02.0"]  # host-critical: the enforcement refuses it
    assert console.target == "quarantine" and "host-critical" in console.outcome
    assert driver_of(host, "0000:00:02.0") == "i915"  # present, refused: left as it was
    g.stop()


def test_thunderbolt_devices_are_authorised_only_by_policy(host: Path) -> None:
    for name, vendor in (("0-1", "Apple Inc."), ("0-3", "Unknown Corp")):
        folder = host / "sys/bus/thunderbolt/devices" / name
        folder.mkdir(parents=True)
        for attribute, value in (("authorized", "0"), ("vendor_name", vendor), ("device_name", "Dock")):
            (folder / attribute).write_text(value + "\n")
    g = guard(host, 'allow thunderbolt vendor-name "Apple*"\nreject thunderbolt')
    made = {d.device: d for d in g.start()}
    assert (made["0-1"].target, made["0-3"].target) == ("allow", "reject")
    tb = host / "sys/bus/thunderbolt/devices"
    assert (tb / "0-1/authorized").read_text().strip() == "1"
    assert (tb / "0-3/authorized").read_text().strip() == "0"
    g.stop()


# -- the control socket ---------------------------------------------------------------------
@pytest.fixture
def running(host: Path) -> Iterator[tuple[Guard, Path, Uevents]]:
    """A guard serving its socket in a thread (quarantine by default; NVMe allowed)."""
    folder = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))  # socket paths are short
    folder.chmod(0o755)
    path = folder / "guard.sock"
    g = guard(host, "allow id 1987:5012")
    g.start()
    events = Uevents(host)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(g, path, "nogroup", events, stop.is_set, 0.02))
    thread.start()
    for _ in range(1000):  # the socket appears once the loop listens
        if path.exists():
            break
        stop.wait(0.01)
    yield g, path, events
    stop.set()
    thread.join()
    g.stop()
    folder.rmdir()


def ask(path: Path, message: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = next(request(path, message))
    return answer


def test_the_loop_judges_devices_as_the_kernel_announces_them(running: tuple[Guard, Path, Uevents]) -> None:
    _, path, events = running
    with socket.socket(socket.AF_UNIX) as watcher:
        watcher.connect(str(path))
        watcher.sendall(b'{"op": "watch"}\n')
        lines = watcher.makefile("rb")
        assert json.loads(lines.readline()) == {"ok": True, "watching": True}
        events.plug(ENCLOSURE)
        event = json.loads(lines.readline())["event"]
    assert (event["device"], event["source"], event["target"]) == (ENCLOSURE, "hotplug", "allow")
    assert driver_of(events.root, ENCLOSURE) == "nvme"
    listed = {d["device"]: d for d in ask(path, {"op": "list"})["devices"]}
    assert listed[ENCLOSURE]["outcome"] == "bound to host driver nvme" and listed[NIC]["target"] == "keep"


def test_a_quarantine_or_rejection_does_not_wait_behind_an_allow(
    running: tuple[Guard, Path, Uevents],
) -> None:
    g, _, events = running
    for device in (ENCLOSURE, FAKE_BRIDGE):
        plug(events.root, device)
    # Both announced at once, the allowed enclosure first: the loop judges both, then
    # removes the fake bridge before it hands the enclosure to its host driver.
    events.queue += [Event("add", "pci", ENCLOSURE, None), Event("add", "pci", FAKE_BRIDGE, None)]
    os.write(events.write_end, b"xx")
    for _ in range(1000):
        if {ENCLOSURE, FAKE_BRIDGE} <= set(g.decisions):
            break
        threading.Event().wait(0.01)
    order = [
        json.loads(d)["device"] for _, d in g.journal.decisions() if json.loads(d)["source"] == "hotplug"
    ]
    assert order == [FAKE_BRIDGE, ENCLOSURE]
    assert g.decisions[ENCLOSURE].target == "allow" and g.decisions[FAKE_BRIDGE].target == "reject"


def test_a_thunderbolt_device_is_authorised_as_it_arrives(running: tuple[Guard, Path, Uevents]) -> None:
    g, _, events = running
    g.policy = parse_policy('allow thunderbolt vendor-name "Apple*"')
    for name, vendor in (("0-1", "Apple Inc."), ("0-3", "Unknown Corp")):
        folder = events.root / "sys/bus/thunderbolt/devices" / name
        folder.mkdir(parents=True)
        for attribute, value in (("authorized", "0"), ("vendor_name", vendor), ("device_name", "Dock")):
            (folder / attribute).write_text(value + "\n")
        events.announce(Event("add", "thunderbolt", name, "thunderbolt_device"))
    events.announce(Event("add", "thunderbolt", "domain0", "thunderbolt_domain"))  # not judged
    for _ in range(1000):  # the loop is in another thread: give it up to ten seconds
        if len([d for d in g.decisions.values() if d.kind == "thunderbolt"]) == 2:
            break
        threading.Event().wait(0.01)
    tb = events.root / "sys/bus/thunderbolt/devices"
    assert (tb / "0-1/authorized").read_text().strip() == "1"
    assert (tb / "0-3/authorized").read_text().strip() == "0"
    assert g.decisions["0-3"].rule.startswith("implicit") and g.decisions["0-3"].target == "reject"
    assert "domain0" not in g.decisions


def test_administrators_change_decisions_at_run_time(running: tuple[Guard, Path, Uevents]) -> None:
    _, path, events = running
    answer = ask(path, {"op": "quarantine", "device": NIC})
    assert answer["ok"] and answer["decision"]["source"] == "control"
    assert driver_of(events.root, NIC) == "vfio-pci"
    assert ask(path, {"op": "allow", "device": NIC})["ok"]
    assert driver_of(events.root, NIC) == "e1000e"


MALFORMED = [
    (b"this is not json\n", "not JSON"),
    (b"[1, 2]\n", "a request is a JSON object"),
    (b'{"op": "format-disk"}\n', "'op' must be one of"),
    (b'{"op": "reject"}\n', "needs 'device'"),
    (b'{"op": "reject", "device": 7}\n', "needs 'device'"),
    (b'{"op": "reject", "device": "03:00"}\n', "is not a PCI address"),
    (b'{"op": "reject", "device": "0000:42:00.0"}\n', "not a PCI device of this host"),
]


@pytest.mark.parametrize(("line", "error"), MALFORMED, ids=[e for _, e in MALFORMED])
def test_a_malformed_request_gets_an_error_and_changes_nothing(
    running: tuple[Guard, Path, Uevents], line: bytes, error: str
) -> None:
    g, path, events = running
    before = dict(g.decisions), sorted(p.name for p in (events.root / "sys/bus/pci/devices").iterdir())
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(path))
        conn.sendall(line)
        answer = json.loads(conn.makefile("rb").readline())
    assert answer["ok"] is False and error in answer["error"]
    after = dict(g.decisions), sorted(p.name for p in (events.root / "sys/bus/pci/devices").iterdir())
    assert after == before and driver_of(events.root, NIC) == "e1000e"


def test_an_overlong_request_is_refused(running: tuple[Guard, Path, Uevents]) -> None:
    _, path, _ = running
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(path))
        conn.sendall(b"x" * 200_000)
        answer = json.loads(conn.makefile("rb").readline())
    assert "longer than" in answer["error"]


def test_peers_are_checked_by_their_credentials(running: tuple[Guard, Path, Uevents]) -> None:
    g, path, _ = running
    # The socket is root's and group nogroup's (0660); uid 65534 in group nogroup may use it.
    assert "'ok': True" in as_nobody(lambda: ask(path, {"op": "list"}))
    # A peer the file mode lets through but SO_PEERCRED does not: refused, nothing done.
    path.chmod(0o666)
    before = dict(g.decisions)
    answer = as_nobody(lambda: ask(path, {"op": "reject", "device": NIC}), uid=1234)
    assert "refused: uid 1234" in answer and "'ok': False" in answer
    assert g.decisions == before and (Path(g.root) / "sys/bus/pci/devices" / NIC).exists()


def test_without_a_group_only_root_may_connect(host: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    folder.chmod(0o755)
    path = folder / "guard.sock"
    g = guard(host, "")
    g.start()
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(g, path, None, None, stop.is_set, 0.02))
    thread.start()
    for _ in range(1000):  # the socket appears once the loop listens
        if path.exists():
            break
        stop.wait(0.01)
    try:
        assert "PermissionError" in as_nobody(lambda: ask(path, {"op": "list"}))
        assert ask(path, {"op": "list"})["ok"]
    finally:
        stop.set()
        thread.join()
        g.stop()
        folder.rmdir()


def test_a_device_is_released_when_its_vm_process_exits(host: Path) -> None:
    g = guard(host, "")
    g.start()
    g.enforcer.quarantine(bdf(NIC))
    g.enforcer.assign(bdf(NIC), "vm1", 1000)
    group = os.readlink(host / "sys/bus/pci/devices" / NIC / "iommu_group").rsplit("/", 1)[-1]
    assert g.release_abandoned() == []  # assigned, but no VM process has opened it yet
    fd = host / "proc/4242/fd/7"
    fd.parent.mkdir(parents=True)
    os.symlink(f"/dev/vfio/{group}", fd)
    assert g.release_abandoned() == []  # held by the VM's process
    fd.unlink()  # the process exited
    (released,) = g.release_abandoned()
    assert released.source == "vm-exited" and "released to quarantine" in released.outcome
    assert Journal(host / "state").devices()[NIC].state == "quarantined"
    g.stop()


def test_handle_answers_without_a_socket(host: Path) -> None:
    g = guard(host, "")
    g.start()
    assert handle(g, b'{"op": "list"}')["ok"] is True
    g.stop()


# -- abusive clients: the guard answers or sheds them and keeps enforcing ---------------------
def _still_enforcing(path: Path, events: Uevents) -> None:
    """The loop still judges a hot-plugged device and still answers a fresh client."""
    events.plug(ENCLOSURE)
    for _ in range(500):
        listed = ask(path, {"op": "list"})
        if any(d["device"] == ENCLOSURE for d in listed["devices"]):
            return
        threading.Event().wait(0.01)
    raise AssertionError("the hot-plugged device was never judged")


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"[" * 100_000, "nested deeper"),
        (b'{"op": "list", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper"),
        (b'{"op": ' + b"9" * 5000 + b"}", "not JSON"),
        (b"", "an empty request"),
        (b"   ", "an empty request"),
        (b'{"op": {"a": 1}}', "'op' must be one of"),
        (b'{"op": "reject", "device": "' + b"0" * 1000 + b'"}', "needs 'device'"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_a_hostile_request_is_answered_and_the_guard_goes_on(
    running: tuple[Guard, Path, Uevents], line: bytes, error: str
) -> None:
    g, path, events = running
    before = dict(g.decisions)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(path))
        conn.sendall(line + b"\n")
        answer = json.loads(conn.makefile("rb").readline())
    assert answer["ok"] is False and error in answer["error"], answer
    assert g.decisions == before
    _still_enforcing(path, events)


def test_a_thousand_idle_connections_do_not_stop_the_guard(
    running: tuple[Guard, Path, Uevents], monkeypatch: pytest.MonkeyPatch
) -> None:
    import resource

    from pciguard.platforms.linux import guard as guard_module

    _, path, events = running
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    monkeypatch.setattr(guard_module, "IDLE_TIMEOUT", 0.5)
    idle = []
    try:
        for _ in range(1000):
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(str(path))
            idle.append(conn)
        threading.Event().wait(1.5)  # idle peers are shed; the rest were told the guard is busy
        _still_enforcing(path, events)
    finally:
        for conn in idle:
            conn.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_watcher_that_never_reads_is_dropped(running: tuple[Guard, Path, Uevents]) -> None:
    _, path, events = running
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(path))
        conn.sendall(b'{"op": "watch"}\n')
        conn.setblocking(False)
        dropped = False
        for _ in range(20_000):  # requests whose answers it never reads
            try:
                conn.send(b'{"op": "list"}\n' * 50)
            except BlockingIOError:
                threading.Event().wait(0.001)
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
        assert dropped
    _still_enforcing(path, events)


def test_a_refused_peer_always_reads_its_refusal(running: tuple[Guard, Path, Uevents]) -> None:
    _, path, _ = running
    path.chmod(0o666)
    answers = as_nobody(lambda: [ask(path, {"op": "list"})["error"] for _ in range(50)], uid=1234)
    assert answers.count("refused: uid 1234") == 50, answers
