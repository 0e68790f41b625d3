"""The hot-plug guard: a policy decides every PCI function and Thunderbolt device
that appears, and the enforcement code carries the decision out.

How a new PCI function is kept from host drivers. Linux enumerates a hot-plugged
function and, in the same call, offers it to every PCI driver already loaded, in the
order they registered; ``drivers_autoprobe=0`` does not stop that (it only stops
drivers loaded later, such as the module udev loads for the new device). The lab
shows it on Linux 6.1: a hot-plugged e1000e NIC is bound to e1000e before any
user-space reaction. So while the guard runs, vfio-pci carries a dynamic
ID that matches every device: a driver registered before the host drivers (load it
early, from the initramfs) then claims each new function at enumeration, its DMA
blocked, until the policy says otherwise; an allowed device is then offered to the
host drivers by name (``bind``), so the claim never lapses. Devices present at start
that have no driver are held out of it with a ``driver_override`` naming no driver.
Thunderbolt devices wait for authorisation before any PCI function behind them exists.

In a Xen dom0 vfio-pci cannot work (Xen owns the IOMMU) and xen-pciback claims instead:
its slot list gets every bus below a bridge (``DDDD:BB:*.*``), so it seizes a new
function at enumeration (load it before the host drivers, as vfio-pci elsewhere). Xen
has put the function in dom0's IOMMU context meanwhile, and pciback does not take it
out: quarantine is ``xl pci-assignable-add``, as for any device pciguard makes assignable.

The guard judges; the toolstack decides what is done (its hot-plug plan may overrule
the policy) and ``Enforcer`` carries that out and journals it, as for every other change
of ownership. The guard writes nothing of a device itself.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import selectors
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from pciguard.errors import PciguardError, StepFailed
from pciguard.model import Bdf, Host
from pciguard.model.kernel import QUARANTINE_DRIVERS, VFIO_PCI, ThunderboltDevice, printable
from pciguard.paths import DEFAULT_STATE_DIR
from pciguard.pciids import lookup, name_devices
from pciguard.platforms.linux.enforce import Enforcer, Result
from pciguard.platforms.linux.journal import Journal
from pciguard.platforms.linux.sysfs import (
    AUTOPROBE,
    PCI_DEVICES,
    VFIO_NODES,
    Fs,
    authorize_thunderbolt,
    buses_below_bridges,
    claim_new_devices,
    claim_with_pciback,
    hold,
    holders_of,
    pciback_loaded,
    pciback_slots,
    read_arrival,
    release_claim,
    release_holds,
    release_pciback_claim,
    set_autoprobe,
    thunderbolt_devices,
    vfio_pci_loaded,
)
from pciguard.platforms.xen.dom0 import read
from pciguard.policy import Decision, PresentPolicy, Target
from pciguard.policy.rules import Policy, Subject

# What a guard found before it changed anything, in its state folder: a guard that was
# killed left its own changes in place, so the next one gives back these, not those.
AUTOPROBE_SAVED = "autoprobe-before-guard"
PCIBACK_SLOTS_SAVED = "pciback-slots-before-guard"


@dataclass(frozen=True)
class GuardDecision:
    """One decision and what came of it; what ``list`` and ``watch`` show."""

    device: str  # a BDF, or a Thunderbolt device's name
    kind: str  # pci, thunderbolt
    source: str  # present, hotplug, control, vm-exited
    target: str  # allow, quarantine, reject, keep
    rule: str  # the rule that decided, in words
    outcome: str  # what the guard did, or why it could not
    at: float  # seconds since the epoch
    latency_ms: float  # from the event reaching the guard to the decision applied
    decide_ms: float  # of which reading the host and judging it
    monotonic: float  # when it was applied, on this host's CLOCK_MONOTONIC (Python's time.monotonic)
    bound_before: str | None = None  # hot-plug: the host driver the kernel bound before the guard acted

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Judged:
    """A hot-plugged device the policy has decided, before the decision is applied."""

    subject: Subject
    decision: Decision
    received: float  # when its event reached the guard
    driver: str | None = None  # its driver when it was read


class Guard:
    """Decisions and their enforcement, without the event loop (``serve`` runs it)."""

    def __init__(
        self,
        policy: Policy,
        root: str = "/",
        state_dir: Path = DEFAULT_STATE_DIR,
        present: PresentPolicy = PresentPolicy.KEEP,
    ) -> None:
        self.policy = policy
        self.fs = Fs(root)
        self.root = root
        self.present = present
        self.enforcer = Enforcer(root, state_dir)
        self.journal = Journal(state_dir)  # makes state_dir, root's alone
        self.state_dir = state_dir
        self.decisions: dict[str, GuardDecision] = {}
        self.listeners: list[Callable[[GuardDecision], None]] = []
        self.autoprobe_before: str | None = None
        self.in_use: set[str] = set()  # assigned devices a VM process was seen holding open
        self.claiming = False  # vfio-pci's catch-all ID (xen-pciback's slots on Xen) is in place
        self.xen = False  # a Xen dom0: xen-pciback claims, and Xen translates every device
        self.pciback_patterns: list[str] = []  # the slots the guard gave xen-pciback
        self.holding: set[Bdf] = set()  # devices present at start held out of the claim
        self.translating = False  # an IOMMU translates DMA on this host
        self.interrupt_remapping = False
        self.recovered: list[str] = []  # what start set right of operations killed half-way

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> list[GuardDecision]:
        """Automatic probing off and vfio-pci's claim in place (see the module's words),
        then the present-device policy, and Thunderbolt devices waiting for authorisation
        judged."""
        before = self.fs.read_bytes(AUTOPROBE)
        if before is None:
            raise StepFailed("guard", f"/{AUTOPROBE} is missing: is this Linux with PCI support?")
        # What it was before the first guard: a guard that was killed left it 0.
        saved = self.state_dir / AUTOPROBE_SAVED
        if not saved.exists():
            saved.write_text(before.decode().strip())
        self.autoprobe_before = saved.read_text().strip()
        set_autoprobe(self.fs, "0")
        # A guard (or a pciguard command) killed half-way: its devices to quarantine first.
        try:
            self.recovered = self.enforcer.recover_interrupted()
        except StepFailed as exc:  # journaled as broken; the guard must run all the same
            self.recovered = [str(exc)]
        reading = read(self.fs)
        host = self._named(reading.host)
        self.xen = reading.facts.xen is not None
        self.translating = any(host.dma_translated(b) for b in host.topology)
        self.interrupt_remapping = any(host.msi_isolated(b) for b in host.topology)
        self.claiming = pciback_loaded(self.fs) if self.xen else vfio_pci_loaded(self.fs)
        if self.claiming:  # driverless devices held first, or the claim would take them
            driverless = [b for b, f in host.topology.items() if f.driver is None and not f.kind.is_bridge]
            self.holding = {b for b in driverless if hold(self.fs, b)}
            if self.xen:
                slots = self.state_dir / PCIBACK_SLOTS_SAVED
                if not slots.exists():
                    slots.write_text("".join(f"{slot}\n" for slot in pciback_slots(self.fs)))
                self.pciback_patterns = buses_below_bridges(self.fs, host)
                claim_with_pciback(self.fs, self.pciback_patterns)
            else:
                claim_new_devices(self.fs)
        else:
            release_holds(self.fs)  # a killed guard's: with no claim they hold nothing back
        made = [self._present_function(host, bdf) for bdf in host.topology]
        for device in reading.facts.thunderbolt_devices:
            if device.authorized is False:
                made.append(
                    self._decide(Subject.of_thunderbolt(device, present=True), "present", time.monotonic())
                )
        return made

    def stop(self) -> None:
        """Give probing back as it was (a clean exit only: killed, the guard leaves
        vfio-pci claiming every new device: fail closed)."""
        if self.claiming and self.xen:
            slots = self.state_dir / PCIBACK_SLOTS_SAVED
            release_pciback_claim(self.fs, self.pciback_patterns, slots.read_text().split())
            slots.unlink()
        elif self.claiming:
            release_claim(self.fs)
        if self.claiming:
            self.claiming = False
            release_holds(self.fs)
            self.holding.clear()
        if self.autoprobe_before is not None:
            set_autoprobe(self.fs, self.autoprobe_before)
            self.autoprobe_before = None
            (self.state_dir / AUTOPROBE_SAVED).unlink(missing_ok=True)
        self.journal.close()

    # -- events ----------------------------------------------------------------------
    def added(self, subsystem: str, name: str, received: float | None = None) -> GuardDecision | None:
        """A device appeared (a udev ``add``): judged and the decision applied; None for
        what the guard does not judge."""
        judged = self.judge_added(subsystem, name, time.monotonic() if received is None else received)
        return None if judged is None else self.apply(judged)

    def judge_added(self, subsystem: str, name: str, received: float) -> Judged | None:
        """The policy's decision for a device that appeared, not yet applied."""
        if subsystem == "pci":
            try:
                arrival = read_arrival(self.fs, Bdf.parse(name))
            except ValueError:
                return None
            if arrival is None:
                return None  # gone again
            subject = Subject(
                name,
                ids=arrival.ids,
                class_code=arrival.class_code,
                ports=arrival.ports,
                external=arrival.external,
                bridge=arrival.bridge,
                name=lookup([arrival.ids]).get(arrival.ids, "") if self.policy.mentions("name") else "",
                iommu=self.translating and (arrival.translated or self.xen),
                interrupt_remapping=self.interrupt_remapping,
            )
            return Judged(subject, self.policy.judge(subject).decision, received, arrival.driver)
        if subsystem == "thunderbolt":
            device = self._thunderbolt(name)
            if device is None or device.authorized:
                return None
            subject = Subject.of_thunderbolt(device)
            return Judged(subject, self.policy.judge(subject).decision, received)
        return None

    def apply(self, judged: Judged) -> GuardDecision:
        decision = judged.decision
        return self._apply(
            judged.subject, decision.target, decision.rule, "hotplug", judged.received, judged.driver
        )

    def removed(self, name: str) -> None:
        """A PCI function left the bus: its decision goes with it, unless the guard
        removed it (a rejection stays listed; the journal keeps every decision)."""
        if name in self.decisions and self.decisions[name].target != Target.REJECT:
            del self.decisions[name]

    def control(self, device: str, target: Target) -> GuardDecision:
        """An administrator's decision at run time (through the control socket)."""
        received = time.monotonic()
        thunderbolt = self._thunderbolt(device)
        if thunderbolt is not None:
            subject = Subject.of_thunderbolt(thunderbolt)
            return self._apply(subject, target, "control: asked at run time", "control", received)
        bdf = Bdf.parse(device)  # ValueError: the caller answers with an error
        host = self._named(read(self.fs).host)
        if bdf not in host.topology:
            raise LookupError(f"{bdf} is not a PCI device of this host")
        subject = Subject.of_function(host, bdf)
        driver = host.topology[bdf].driver
        return self._apply(subject, target, "control: asked at run time", "control", received, driver)

    def release_abandoned(self) -> list[GuardDecision]:
        """Assigned devices whose VM process has let go of the group (it exited) go back
        to quarantine in the journal too. Only after a process was seen holding the
        group: between ``pciguard assign`` and the VM's start nobody holds it yet."""
        rows = {b: r for b, r in self.journal.devices().items() if r.state == "assigned"}
        made = []
        for name in sorted(rows):
            group = self.fs.link_name(f"{PCI_DEVICES}/{name}/iommu_group")
            holders = holders_of(self.fs, f"{VFIO_NODES}/{group}") if group else []
            if holders:
                self.in_use.add(name)
            elif name in self.in_use:
                self.in_use.discard(name)
                received = time.monotonic()
                try:
                    result = self.enforcer.release(Bdf.parse(name))
                    outcome = f"released to quarantine: {', '.join(map(str, result.devices))}"
                except (PciguardError, OSError) as exc:
                    outcome = f"not released: {exc}"
                subject = Subject(address=name)
                made.append(
                    self._record(
                        subject,
                        "vm-exited",
                        "quarantine",
                        f"{rows[name].vm}'s process let go of it",
                        outcome,
                        received,
                    )
                )
        return made

    # -- deciding and acting ---------------------------------------------------------
    def _named(self, host: Host) -> Host:
        """Names from pci.ids, when a rule asks for them (reading the database costs)."""
        return name_devices(host) if self.policy.mentions("name") else host

    def _present_function(self, host: Host, bdf: Bdf) -> GuardDecision:
        subject = Subject.of_function(host, bdf, present=True)
        if self.present is PresentPolicy.APPLY_POLICY:
            return self._decide(subject, "present", time.monotonic(), host.topology[bdf].driver)
        if self.present is PresentPolicy.KEEP:
            driver = host.topology[bdf].driver
            claimer = "xen-pciback" if self.xen else VFIO_PCI
            held = f"; held out of {claimer}'s claim" if bdf in self.holding else ""
            outcome = f"kept as it was ({driver or 'no driver'}{held})"
            return self._record(
                subject, "present", "keep", "present-device policy: keep", outcome, time.monotonic()
            )
        target = Target(self.present.value)
        rule = f"present-device policy: {self.present}"
        return self._apply(subject, target, rule, "present", time.monotonic(), host.topology[bdf].driver)

    def _decide(
        self, subject: Subject, source: str, received: float, driver: str | None = None
    ) -> GuardDecision:
        decision = self.policy.judge(subject).decision
        return self._apply(subject, decision.target, decision.rule, source, received, driver)

    def _apply(
        self,
        subject: Subject,
        target: Target,
        rule: str,
        source: str,
        received: float,
        driver: str | None = None,
    ) -> GuardDecision:
        """``driver``: the PCI function's driver when it was read."""
        decided = time.monotonic()
        claimed = driver is None or driver in QUARANTINE_DRIVERS
        bound_before = driver if source == "hotplug" and not claimed else None
        try:
            if subject.thunderbolt:
                outcome = self._act_thunderbolt(subject.address, target)
            else:
                bdf = Bdf.parse(subject.address)
                if source == "hotplug":
                    result = self.enforcer.hotplug(bdf, Decision(target, rule, explicit=True))
                else:
                    result = self.enforcer.decide(bdf, target, rule)
                if result.decision is not None and result.decision.target is not target:
                    target, rule = result.decision.target, result.decision.rule  # the toolstack overruled it
                outcome = _outcome(result, bdf, subject.bridge)
        except (PciguardError, OSError) as exc:
            # Nothing bound it meanwhile: with automatic probing off it waits driverless.
            outcome = f"not done: {exc}"
        if bound_before and target is not Target.ALLOW:
            outcome += f" (the kernel had bound {bound_before} to it before the guard could act)"
        return self._record(subject, source, str(target), rule, outcome, received, decided, bound_before)

    def _act_thunderbolt(self, name: str, target: Target) -> str:
        if target is Target.REJECT:
            return "left unauthorised: no PCI tunnel is set up"
        authorize_thunderbolt(self.fs, name)
        return "authorised; the PCI functions behind it are judged as they appear"

    def _thunderbolt(self, name: str) -> ThunderboltDevice | None:
        return next((d for d in thunderbolt_devices(self.fs) if d.name == name), None)

    def _record(
        self,
        subject: Subject,
        source: str,
        target: str,
        rule: str,
        outcome: str,
        received: float,
        decided: float | None = None,
        bound_before: str | None = None,
    ) -> GuardDecision:
        now = time.monotonic()
        decision = GuardDecision(
            subject.address,
            "thunderbolt" if subject.thunderbolt else "pci",
            source,
            target,
            rule,
            outcome,
            time.time(),
            round((now - received) * 1000, 2),
            round(((decided or now) - received) * 1000, 2),
            now,
            bound_before,
        )
        self.decisions[subject.address] = decision
        self.journal.decision(json.dumps(decision.to_json()))
        for listener in self.listeners:
            listener(decision)
        return decision


def _outcome(result: Result, bdf: Bdf, bridge: bool) -> str:
    """What came of a decision, in words (``list`` and ``watch`` show it)."""
    plan, driver = result.plan, result.drivers.get(bdf)
    holder = "xen-pciback, in DOMID_IO" if result.xen else "vfio-pci"
    quarantined = f"quarantined with {holder}: {', '.join(map(str, result.devices))}"
    if plan is None:
        host_driver = driver is not None and driver not in QUARANTINE_DRIVERS
        return f"already with host driver {driver}" if host_driver else "already quarantined"
    if plan.operation == "reject":
        return "removed from the bus" + (" with everything below it" if bridge else "")
    if plan.operation == "hotplug-quarantine" and bridge:
        return (
            "left without a driver: a bridge cannot be bound to vfio-pci; "
            "its group's DMA domain maps nothing for it"
        )
    if plan.operation == "hotplug-quarantine" and not result.writes:
        return "quarantined: vfio-pci claimed it as the kernel found it"
    if plan.operation in ("hotplug-quarantine", "make-assignable"):
        return quarantined
    if driver is None:
        return "no host driver claims it (is its module loaded?); held without a driver"
    return f"bound to host driver {driver}"


class Event(Protocol):
    action: str | None
    subsystem: str | None
    sys_name: str
    device_type: str | None


def is_judged(event: Event) -> bool:
    """PCI functions and Thunderbolt devices (not domains, retimers or services)."""
    if event.action != "add":
        return False
    return event.subsystem == "pci" or (
        event.subsystem == "thunderbolt" and event.device_type == "thunderbolt_device"
    )


def uevents() -> Any:
    """The kernel's own uevents (not udev's rebroadcast): they come first, and need no
    udev daemon. Root only."""
    import pyudev

    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.start()
    return monitor


def peer_allowed(uid: int, gid: int, group: str | None) -> bool:
    """Root, the guard's own user, or a member of ``group``."""
    if uid in (0, os.geteuid()):
        return True
    if group is None:
        return False
    try:
        wanted = grp.getgrnam(group).gr_gid
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return wanted == gid or wanted in os.getgrouplist(name, gid)


# -- the control socket ----------------------------------------------------------------
MAX_REQUEST = 65536  # bytes in one request line
MAX_DEPTH = 16  # nesting of JSON arrays and objects in a request (the protocol needs 1)
MAX_PEERS = 64  # connections at once; more are answered "busy" and closed
MAX_OUTBOX = 8 << 20  # bytes of answers waiting for a peer that does not read
IDLE_TIMEOUT = 60.0  # seconds a connection that is not watching may stay silent
OPERATIONS = ("list", "watch", *(str(t) for t in Target))


def handle(guard: Guard, line: bytes) -> dict[str, Any]:
    """One request of the control protocol (docs/guard.md) and its answer. A malformed
    request gets an error and changes nothing."""
    if not line.strip():
        return {"ok": False, "error": 'an empty request; send a JSON object such as {"op": "list"}'}
    if _nesting(line) > MAX_DEPTH:
        return {"ok": False, "error": f"a request nested deeper than {MAX_DEPTH} levels"}
    try:
        request = json.loads(line)
    except UnicodeDecodeError:
        return {"ok": False, "error": "not JSON: a request is UTF-8 text"}
    except (ValueError, RecursionError) as exc:  # also integers longer than Python converts
        return {"ok": False, "error": f"not JSON: {str(exc)[:200]}"}
    if not isinstance(request, dict):
        return {"ok": False, "error": 'a request is a JSON object such as {"op": "list"}'}
    op = request.get("op")
    if not isinstance(op, str) or op not in OPERATIONS:
        shown = printable(repr(op))[:60]
        return {"ok": False, "error": f"'op' must be one of {', '.join(OPERATIONS)}, not {shown}"}
    if op == "list":
        return {"ok": True, "devices": [d.to_json() for d in guard.decisions.values()]}
    if op == "watch":
        return {"ok": True, "watching": True}
    device = request.get("device")
    if not isinstance(device, str) or len(device) > 64:
        return {"ok": False, "error": f"'{op}' needs 'device': a PCI address or a Thunderbolt device name"}
    try:
        decision = guard.control(device, Target(op))
    except (ValueError, LookupError) as exc:
        return {"ok": False, "error": printable(str(exc))}
    return {"ok": True, "decision": decision.to_json()}


def _nesting(line: bytes) -> int:
    """How deep JSON brackets nest in ``line``, brackets inside strings included (an
    upper bound, found without recursion)."""
    depth = deepest = 0
    for byte in line.translate(None, _NOT_BRACKETS):
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class Peer:
    """One connection to the control socket. Answers wait in ``outbox`` while the peer
    is slow to read; a peer that lets more than MAX_OUTBOX pile up is dropped."""

    def __init__(self, conn: socket.socket, uid: int) -> None:
        self.conn, self.uid, self.buffer, self.watching = conn, uid, b"", False
        self.selector: selectors.BaseSelector | None = None  # set once it is registered
        self.outbox = b""
        self.heard = time.monotonic()
        self.closed = False

    def send(self, answer: dict[str, Any]) -> bool:
        """Queue an answer and send what the socket takes now; False: drop this peer."""
        if self.closed:
            return False
        self.outbox += json.dumps(answer).encode() + b"\n"
        return len(self.outbox) <= MAX_OUTBOX and self.flush()

    def flush(self) -> bool:
        try:
            sent = self.conn.send(self.outbox) if self.outbox else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return False
        self.outbox = self.outbox[sent:]
        if self.selector is not None:
            wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
            if self.selector.get_key(self.conn).events != wanted:
                self.selector.modify(self.conn, wanted, self)
        return True


def listen(path: Path, group: str | None) -> socket.socket:
    """The control socket: root's, and the group's when one is configured (SO_PEERCRED
    is checked on every connection all the same)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Made under another name and moved into place once it listens: a client that sees
    # the path can connect (and never a socket with the wrong mode).
    fresh = path.with_name(f".{path.name}.{os.getpid()}")
    fresh.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(fresh))
    finally:
        os.umask(old_umask)
    if group is not None:
        os.chown(fresh, -1, grp.getgrnam(group).gr_gid)
        os.chmod(fresh, 0o660)
    server.listen(64)
    server.setblocking(False)
    os.replace(fresh, path)
    return server


def serve(
    guard: Guard,
    path: Path,
    group: str | None = None,
    events: Any = None,
    should_stop: Callable[[], bool] = lambda: False,
    tick: float = 0.5,
) -> None:
    """The guard's loop: kernel events, control requests, and every ``tick`` seconds
    a look for assigned devices whose VM process has exited. Single-threaded: one
    decision at a time, in the order things happened. No client can stop it: malformed
    requests are answered, and clients that flood, hang or stop reading are dropped."""
    server = listen(path, group)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ, None)
    if events is not None:
        selector.register(events.fileno(), selectors.EVENT_READ, events)
    peers: dict[int, Peer] = {}

    def drop(peer: Peer) -> None:
        if peer.closed:
            return
        peer.closed = True
        peers.pop(id(peer), None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(peer.conn)
        peer.conn.close()

    def push(decision: GuardDecision) -> None:
        for peer in [p for p in peers.values() if p.watching]:
            if not peer.send({"event": decision.to_json()}):
                drop(peer)

    guard.listeners.append(push)
    # Allows wait until nothing else is pending: handing a device to its host driver
    # takes that driver's probe (a tenth of a second and more), and a quarantine or a
    # rejection judged meanwhile should not wait behind it.
    allows: list[Judged] = []
    next_look = 0.0  # when to look for devices whose VM process has exited
    try:
        while not should_stop():
            ready = selector.select(timeout=0 if allows else tick)
            for key, mask in ready:
                if key.fileobj is server:
                    _accept(server, selector, peers, group)
                elif key.data is events:
                    while (event := events.poll(timeout=0)) is not None:
                        allows += _handle_event(guard, event, time.monotonic())
                elif isinstance(key.data, Peer):
                    if mask & selectors.EVENT_WRITE and not key.data.flush():
                        drop(key.data)
                    if mask & selectors.EVENT_READ and not key.data.closed:
                        _serve_peer(guard, key.data, drop)
            if allows and not ready:
                _apply_judged(guard, allows.pop(0))
            if time.monotonic() >= next_look:  # not after every event: it scans /proc
                guard.release_abandoned()
                now = time.monotonic()
                for peer in [p for p in peers.values() if not p.watching and now - p.heard > IDLE_TIMEOUT]:
                    drop(peer)
                next_look = now + tick
    finally:
        guard.listeners.remove(push)
        for peer in list(peers.values()):
            drop(peer)
        selector.close()
        server.close()
        path.unlink(missing_ok=True)


def _handle_event(guard: Guard, event: Event, received: float) -> list[Judged]:
    """Judge an event's device and apply the decision at once, unless it is an allow:
    that is returned, to be applied when nothing else is pending."""
    try:
        if is_judged(event):
            judged = guard.judge_added(event.subsystem or "", event.sys_name, received)
            if judged is not None and judged.decision.target is Target.ALLOW:
                return [judged]
            if judged is not None:
                guard.apply(judged)
        elif event.action == "remove" and event.subsystem == "pci":
            guard.removed(event.sys_name)
    except Exception:  # one device's failure must not stop the guard; vfio-pci still holds it
        _report_failure(event.sys_name)
    return []


def _apply_judged(guard: Guard, judged: Judged) -> None:
    try:
        guard.apply(judged)
    except Exception:
        _report_failure(judged.subject.address)


def _report_failure(device: str) -> None:
    print(f"pciguard guard: judging {printable(device)} failed:", file=sys.stderr)
    traceback.print_exc()


def _accept(
    server: socket.socket, selector: selectors.BaseSelector, peers: dict[int, Peer], group: str | None
) -> None:
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return
    except OSError as exc:  # out of descriptors, or the peer gave up: keep enforcing
        print(f"pciguard guard: cannot accept a connection: {exc.strerror or exc}", file=sys.stderr)
        time.sleep(0.05)
        return
    try:
        pid, uid, gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
    except OSError:
        conn.close()
        return
    conn.setblocking(False)
    peer = Peer(conn, uid)
    if not peer_allowed(uid, gid, group):
        who = f"uid {uid} (process {pid})"
        allowed = "root" + (f" or members of group {group}" if group else "")
        peer.send({"ok": False, "error": f"refused: {who} may not control the guard; only {allowed} may"})
        conn.close()
        return
    if len(peers) >= MAX_PEERS:
        peer.send({"ok": False, "error": f"busy: {MAX_PEERS} connections already; try again"})
        conn.close()
        return
    peers[id(peer)] = peer
    selector.register(conn, selectors.EVENT_READ, peer)
    peer.selector = selector


def _serve_peer(guard: Guard, peer: Peer, drop: Callable[[Peer], None]) -> None:
    try:
        data = peer.conn.recv(MAX_REQUEST)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        drop(peer)
        return
    peer.heard = time.monotonic()
    peer.buffer += data
    while b"\n" in peer.buffer and not peer.closed:
        line, peer.buffer = peer.buffer.split(b"\n", 1)
        answer = handle(guard, line)
        peer.watching = peer.watching or bool(answer.get("watching"))
        if not peer.send(answer):
            drop(peer)
            return
    if len(peer.buffer) > MAX_REQUEST:
        peer.send({"ok": False, "error": f"a request line is longer than {MAX_REQUEST} bytes"})
        drop(peer)


def request(path: Path, message: dict[str, Any], timeout: float = 30.0) -> Iterator[Any]:
    """Send one request to a running guard and yield its answers (one, or a stream
    for ``watch``). OSError when no guard listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        # A refused peer is answered and closed at once: its answer waits to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(json.dumps(message).encode() + b"\n")
        if message.get("op") == "watch":
            conn.settimeout(None)
        with conn.makefile("rb") as answers:
            for line in answers:
                yield json.loads(line)
