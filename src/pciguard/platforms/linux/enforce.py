"""Every change of ownership on a real host: the secure toolstack's own plans, carried
out by ``LinuxPlatform`` (or, in a Xen dom0, ``XenPlatform``), written ahead to the
journal, one pciguard at a time, and brought back to quarantine when a previous run
was killed half-way.

The toolstack decides (which devices, which steps, what is refused); this module
builds the toolstack's view of the host as it stands (adopting what it finds held away
from the host), journals, and says what came of it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from pciguard.checks import Options
from pciguard.errors import RefusedError, StepFailed
from pciguard.model import Bdf, DomainType, Host, Topology
from pciguard.model.ownership import State
from pciguard.paths import DEFAULT_STATE_DIR
from pciguard.platforms.base import HOST, QUARANTINE, Platform
from pciguard.platforms.linux.journal import DeviceRow, Journal, Operation
from pciguard.platforms.linux.platform import Command, LinuxPlatform, StepLog, Write
from pciguard.platforms.linux.sysfs import CONSOLE_GPU, Fs
from pciguard.platforms.xen.dom0 import MADE_ASSIGNABLE, read
from pciguard.platforms.xen.platform import XenPlatform
from pciguard.policy import Decision, Target
from pciguard.toolstack import OperationFailed, Plan, Toolstack

NOT_ROOT = (
    "not root: planned without the journal (which holds earlier quarantines and original "
    "drivers) and with what an ordinary user can read of sysfs"
)
RELAXABLE = "direct-relaxable"  # 1:1 regions VFIO may leave unmapped (Linux's own judgement)
ROW_STATES = {
    State.QUARANTINED: "quarantined",
    State.HOST: "host",
    State.ASSIGNED: "assigned",
    State.REMOVED: "removed",
}
# A step as the platform journals it (``Step``'s own form): call(device, domain)
_STEP_WITH_DOMAIN = re.compile(r"^\w+\([^,()]+, ([^,()]+)\)$")


class HostPlatform(Platform, Protocol):
    """What the enforcement asks of a real host's platform beyond the protocol's steps:
    what it ran, the drivers it sees, and the VMs it hands devices to."""

    step_log: StepLog | None

    @property
    def writes(self) -> Sequence[Write | Command]:
        """Every write and command, in order (a dry run's plan)."""
        ...

    def driver(self, device: Bdf) -> str | None: ...
    def group_type(self, device: Bdf) -> str | None: ...
    def know_vm(self, name: str, uid: int | None) -> None:
        """A VM the journal says was given devices."""
        ...

    def take_vm(self, name: str, uid: int | None) -> None:
        """A VM about to be given a device (refused if the host cannot give it one)."""
        ...

    def vm_user(self, name: str) -> int | None: ...
    def holders(self, device: Bdf) -> list[str]:
        """Who holds the device beyond pciguard's reach, in words ([]: nobody)."""
        ...


@dataclass
class Result:
    operation: str
    devices: tuple[Bdf, ...]
    dry_run: bool
    writes: list[Write | Command] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # what was set right first
    warnings: list[str] = field(default_factory=list)
    plan: Plan | None = None  # None: the device had what was asked already
    decision: Decision | None = None  # the toolstack's last word on a hot-plugged device
    drivers: dict[Bdf, str | None] = field(default_factory=dict)  # each device's driver after
    xen: bool = False  # carried out by Xen (xl), not by VFIO


@dataclass
class Session:
    """One operation's view of the host: the toolstack, and the platform it drives."""

    toolstack: Toolstack
    platform: HostPlatform
    warnings: list[str]


Planner = Callable[[Session], Plan | None]


class Enforcer:
    def __init__(self, root: str = "/", state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.root = root
        self.state_dir = state_dir

    def quarantine(self, bdf: Bdf, dry_run: bool = False, console_gpu: bool = False) -> Result:
        """Release ``bdf`` and the group siblings that must go with it from their host
        drivers and bind them to vfio-pci. ``console_gpu``: the console GPU too (the
        host then loses its display), which is otherwise refused as host-critical."""
        return self._run("quarantine", bdf, lambda s: _quarantine_plan(s, bdf), dry_run, console_gpu)

    def unquarantine(self, bdf: Bdf, dry_run: bool = False) -> Result:
        """Reset ``bdf`` and give it back to the host driver it had."""
        return self._run("unquarantine", bdf, lambda s: s.toolstack.plan_make_unassignable(bdf), dry_run)

    def assign(self, bdf: Bdf, vm: str, uid: int | None, dry_run: bool = False) -> Result:
        """After every check of the secure toolstack, hand the quarantined device's VFIO
        group to the VM's user (``uid``), whose process then attaches it to its own
        IOMMU domain; on Xen, attach it to the domain (``uid`` unused)."""
        return self._run("assign", bdf, lambda s: _assign_plan(s, bdf, vm, uid), dry_run)

    def release(self, bdf: Bdf, dry_run: bool = False) -> Result:
        """Take the device back from its VM into quarantine (never to a host driver).
        Refused while the VM's process still holds the group open."""
        return self._run("release", bdf, lambda s: _release_plan(s, bdf), dry_run)

    def hotplug(self, bdf: Bdf, decision: Decision) -> Result:
        """A device that appeared, which the guard's policy has judged: the toolstack's
        hot-plug plan (which may overrule the policy: a group a guest holds goes to
        quarantine, a device no IOMMU covers is rejected)."""
        return self._run(None, bdf, lambda s: s.toolstack.plan_hotplug(bdf, decision), pending=bdf)

    def decide(self, bdf: Bdf, target: Target, why: str) -> Result:
        """Give a present device the guard's target (an operator's, or the present-device
        policy's)."""
        return self._run(None, bdf, lambda s: s.toolstack.plan_decision(bdf, target, why))

    def recover_interrupted(self) -> list[str]:
        """Only the recovery every other operation starts with (for a boot-time unit)."""
        journal = Journal(self.state_dir)
        try:
            with journal.locked():
                return self.recover(journal)
        finally:
            journal.close()

    def _run(
        self,
        operation: str | None,
        bdf: Bdf,
        planner: Planner,
        dry_run: bool = False,
        console_gpu: bool = False,
        pending: Bdf | None = None,
    ) -> Result:
        """``operation``: the name the journal gives it (None: the plan's own)."""
        if dry_run:  # a plan only reads: it never creates a journal nor takes the lock
            if os.geteuid() != 0:  # anyone may look at a plan; the journal is root's
                return self._dry_run(operation, bdf, planner, {}, console_gpu, [NOT_ROOT])
            if not (self.state_dir / "journal.sqlite").exists():
                return self._dry_run(operation, bdf, planner, {}, console_gpu, [])
            journal = Journal(self.state_dir, readonly=True)
            try:
                return self._dry_run(operation, bdf, planner, journal.devices(), console_gpu, [])
            finally:
                journal.close()
        journal = Journal(self.state_dir)
        try:
            with journal.locked():
                recovered = self.recover(journal)
                session = self._session(journal.devices(), console_gpu=console_gpu, pending=pending)
                plan = self._plan(session, bdf, planner)
                result = self._result(operation, bdf, session, plan, False)
                result.recovered = recovered
                if plan is None:
                    return result
                toolstack, platform = session.toolstack, session.platform
                drivers = {
                    str(d): platform.driver(d) if platform.host_driver_bound(d) else None
                    for d in plan.devices
                }
                kinds = {str(d): "identity" for d in plan.devices if platform.group_type(d) == "identity"}
                op = journal.begin(
                    operation or plan.operation, [str(d) for d in plan.devices], drivers, kinds
                )
                platform.step_log = lambda description: journal.step(op, description)
                try:
                    toolstack.execute(plan)
                except OperationFailed as failure:
                    journal.finish(op, f"failed: {failure}", _rows(session, plan.devices))
                    raise
                journal.finish(op, "done", _rows(session, plan.devices))
                result.writes = list(platform.writes)
                result.drivers = {d: platform.driver(d) for d in plan.devices if platform.present(d)}
                return result
        finally:
            journal.close()

    def _dry_run(
        self,
        operation: str | None,
        bdf: Bdf,
        planner: Planner,
        rows: dict[str, DeviceRow],
        console_gpu: bool,
        warnings: list[str],
    ) -> Result:
        session = self._session(rows, dry_run=True, console_gpu=console_gpu)
        plan = self._plan(session, bdf, planner)
        if plan is not None:
            session.toolstack.execute(plan)
        result = self._result(operation, bdf, session, plan, True)
        result.warnings = warnings + result.warnings
        result.writes = list(session.platform.writes)
        return result

    @staticmethod
    def _plan(session: Session, bdf: Bdf, planner: Planner) -> Plan | None:
        if bdf not in session.toolstack.host.topology:
            raise RefusedError(f"{bdf} is not a PCI device of this host", device=str(bdf))
        return planner(session)

    @staticmethod
    def _result(
        operation: str | None, bdf: Bdf, session: Session, plan: Plan | None, dry_run: bool
    ) -> Result:
        record = session.toolstack.ledger.get(bdf)
        return Result(
            operation or (plan.operation if plan else "none"),
            plan.devices if plan else (bdf,),
            dry_run,
            warnings=session.warnings,
            plan=plan,
            decision=record.decision if record else None,
            drivers={bdf: session.platform.driver(bdf)},
            xen=isinstance(session.platform, XenPlatform),
        )

    def _session(
        self,
        rows: dict[str, DeviceRow],
        *,
        dry_run: bool = False,
        console_gpu: bool = False,
        pending: Bdf | None = None,
    ) -> Session:
        """The toolstack's view of this host as it stands: devices held away from the host
        are adopted as quarantined (the toolstack does that), and those the journal says
        a VM's process was given as assigned; ``pending``: a device that just appeared."""
        platform = self._platform(rows, dry_run, console_gpu)
        for held in rows.values():
            if held.vm is not None:
                platform.know_vm(held.vm, held.uid)
        toolstack = Toolstack(platform, Options())
        if pending is not None:
            toolstack.device_appeared(pending)
        warnings = []
        for bdf, record in toolstack.ledger.items():
            row = rows.get(str(bdf))
            if row is None or bdf == pending:
                continue
            if record.state is State.QUARANTINED and row.vm is not None:
                toolstack.adopt_assigned(bdf, row.vm)
            elif record.state is State.HOST and row.state == "quarantined":
                warnings.append(
                    f"{bdf} was quarantined but is now with {platform.driver(bdf) or 'no driver'}: "
                    "something bound it behind pciguard's back"
                )
        return Session(toolstack, platform, warnings)

    def _platform(self, rows: dict[str, DeviceRow], dry_run: bool, console_gpu: bool) -> HostPlatform:
        """This host as it stands, with what the journal remembers of its devices
        (``console_gpu``: the console GPU judged as any other device): a Xen dom0's
        steps are Xen's, any other host's VFIO's."""
        fs = Fs(self.root)
        reading = read(fs)
        host = translating_on_quarantine(reading.host)
        if console_gpu:
            functions = {
                b: replace(f, host_critical="") if f.host_critical == CONSOLE_GPU else f
                for b, f in host.topology.items()
            }
            host = replace(host, topology=Topology(functions))
        known = {b: rows[str(b)] for b in host.topology if str(b) in rows}
        drivers = {b: row.host_driver for b, row in known.items()}
        kinds = {b: row.group_type for b, row in known.items() if row.group_type}
        if reading.facts.xen is not None:
            assignable = [b for b, row in known.items() if row.state in MADE_ASSIGNABLE]
            return XenPlatform(fs, host, reading.facts.xen, drivers, assignable=assignable, dry_run=dry_run)
        return LinuxPlatform(fs, host, drivers, kinds, dry_run=dry_run)

    def recover(self, journal: Journal) -> list[str]:
        """Bring the devices of every interrupted operation to quarantine (fail closed:
        a device that was being made assignable, or given back, ends up blocked)."""
        return [self._recover(journal, op) for op in journal.operations(unfinished_only=True)]

    def _recover(self, journal: Journal, op: Operation) -> str:
        session = self._session(journal.devices())
        toolstack, platform = session.toolstack, session.platform
        platform.step_log = lambda description: journal.step(op.id, description)
        last = next((d for d, status in reversed(op.steps) if status == "intended"), None)
        last = last or (op.steps[-1][0] if op.steps else "before its first step")
        guests = [m.group(1) for d, _ in op.steps if (m := _STEP_WITH_DOMAIN.match(d))]
        vm = next((g for g in guests if g not in (HOST, QUARANTINE)), None)
        devices = tuple(Bdf.parse(name) for name in op.devices)
        present = tuple(d for d in devices if d in toolstack.ledger)
        for device in present:
            toolstack.interrupted(device, vm)
        try:
            toolstack.execute(toolstack.plan_recover(present))
        except OperationFailed as exc:
            journal.finish(op.id, f"interrupted at {last}; recovery failed: {exc}", _rows(session, devices))
            raise StepFailed(
                "recover",
                f"{op.name} of {' '.join(op.devices)} was interrupted and "
                f"could not be brought back to quarantine: {exc}",
            ) from exc
        held = [f"{device} ({who})" for device in present for who in platform.holders(device)]
        outcome = f"interrupted at {last}; recovered: {', '.join(op.devices)} quarantined"
        if held:
            outcome += f"; still attached to a VM process's IOMMU domain until it exits: {'; '.join(held)}"
        journal.finish(op.id, outcome, _rows(session, devices))
        return f"{op.name} #{op.id} {outcome}"


def _rows(session: Session, devices: tuple[Bdf, ...]) -> dict[str, DeviceRow]:
    """Where ``devices`` stand now, as the journal keeps it (a device gone: broken)."""
    out = {}
    for device in devices:
        record = session.toolstack.ledger.get(device)
        state = ROW_STATES.get(record.state, "broken") if record else "broken"
        vm = record.vm if record else None
        uid = session.platform.vm_user(vm) if vm else None
        out[str(device)] = DeviceRow(state, None, None, vm, uid)
    return out


def _quarantine_plan(session: Session, bdf: Bdf) -> Plan:
    toolstack = session.toolstack
    try:
        plan = toolstack.plan_make_assignable(bdf)
    except RefusedError as exc:
        why = toolstack.host.topology[Bdf.parse(exc.device)].host_critical if exc.device else ""
        if why == CONSOLE_GPU:
            hint = f"{exc}; pass --console-gpu to quarantine it all the same"
            raise RefusedError(hint, device=exc.device) from None
        raise
    for device in plan.devices:
        if refusal := quarantine_refusal(toolstack.host, device):
            raise RefusedError(f"cannot quarantine {device}: {refusal}", device=str(device))
    return plan


def _assign_plan(session: Session, bdf: Bdf, vm: str, uid: int | None) -> Plan:
    session.platform.take_vm(vm, uid)
    return session.toolstack.plan_assign(bdf, vm)


def _release_plan(session: Session, bdf: Bdf) -> Plan:
    plan = session.toolstack.plan_release(bdf)
    for device in plan.devices:
        if holders := session.platform.holders(device):
            raise RefusedError(
                f"cannot release {device}: {'; '.join(holders)}, so its IOMMU domain still holds "
                "the device; detach the device in the VM, or stop the VM, first",
                device=str(device),
            )
    return plan


def translating_on_quarantine(host: Host) -> Host:
    """The host as the toolstack should judge it: quarantine switches an identity group
    of one device to DMA before binding vfio-pci (``LinuxPlatform``), so such a group
    is as good as translating. Identity groups of several devices stay as they are, and
    the toolstack refuses them."""
    groups = host.kernel_groups
    if groups is None:
        return host
    switched = tuple(
        replace(g, domain=DomainType.DMA) if g.domain is DomainType.IDENTITY and len(g.members) == 1 else g
        for g in groups
    )
    return host if switched == groups else replace(host, kernel_groups=switched)


def quarantine_refusal(host: Host, device: Bdf) -> str | None:
    """Why a device must not be quarantined on a Linux host, beyond the toolstack's own
    refusals (bridges, host-critical devices, groups the IOMMU does not translate)."""
    fn = host.topology[device]
    fixed = [r for r in fn.reserved_regions if r.name != RELAXABLE]
    if fixed:
        regions = ", ".join(map(str, fixed))
        return (
            f"the firmware needs 1:1 DMA regions for it ({regions}): it may still use them "
            "(USB legacy emulation, a GPU's stolen memory), so it can be neither cut off from "
            "them nor assigned (VFIO refuses such devices)"
        )
    vfs = host.topology.virtual_functions(device)
    if vfs:
        return (
            f"it is an SR-IOV physical function with {len(vfs)} virtual functions enabled, which "
            f"depend on its driver; disable them first (echo 0 > /sys/bus/pci/devices/{device}/sriov_numvfs)"
        )
    return None
