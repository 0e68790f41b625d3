"""Quarantine and unquarantine on a Linux host: the secure toolstack's own plans,
carried out by ``LinuxPlatform``, written ahead to the journal, one pciguard at a
time, and brought back to quarantine when a previous run was killed half-way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from pciguard.checks import Options
from pciguard.errors import RefusedError, StepFailed
from pciguard.model import Bdf, DomainType, Host, Topology
from pciguard.model.ownership import State
from pciguard.platforms.base import QUARANTINE
from pciguard.platforms.linux.journal import DEFAULT_STATE_DIR, DeviceRow, Journal, Operation
from pciguard.platforms.linux.platform import LinuxPlatform, Write
from pciguard.platforms.linux.sysfs import CONSOLE_GPU, Fs, holders_of, read_host
from pciguard.toolstack import OperationFailed, Plan, Toolstack

NOT_ROOT = (
    "not root: planned without the journal (which holds earlier quarantines and original "
    "drivers) and with what an ordinary user can read of sysfs"
)
RELAXABLE = "direct-relaxable"  # 1:1 regions VFIO may leave unmapped (Linux's own judgement)
QUARANTINED, BROKEN = DeviceRow("quarantined", None), DeviceRow("broken", None)


@dataclass
class Result:
    operation: str
    devices: tuple[Bdf, ...]
    dry_run: bool
    writes: list[Write] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # what was set right first
    warnings: list[str] = field(default_factory=list)


class Enforcer:
    def __init__(self, root: str = "/", state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.root = root
        self.state_dir = state_dir
        self.critical_why: dict[Bdf, str] = {}

    def quarantine(self, bdf: Bdf, dry_run: bool = False, console_gpu: bool = False) -> Result:
        """Release ``bdf`` and the group siblings that must go with it from their host
        drivers and bind them to vfio-pci. ``console_gpu``: the console GPU too (the
        host then loses its display), which is otherwise refused as host-critical."""
        return self._run("quarantine", bdf, dry_run, console_gpu=console_gpu)

    def unquarantine(self, bdf: Bdf, dry_run: bool = False) -> Result:
        """Reset ``bdf`` and give it back to the host driver it had."""
        return self._run("unquarantine", bdf, dry_run)

    def assign(self, bdf: Bdf, vm: str, uid: int, dry_run: bool = False) -> Result:
        """After every check of the secure toolstack, hand the quarantined device's VFIO
        group to the VM's user (``uid``), whose process then attaches it to its own
        IOMMU domain."""
        return self._run("assign", bdf, dry_run, vm=(vm, uid))

    def release(self, bdf: Bdf, dry_run: bool = False) -> Result:
        """Take the device back from its VM into quarantine (never to a host driver).
        Refused while the VM's process still holds the group open."""
        return self._run("release", bdf, dry_run)

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
        operation: str,
        bdf: Bdf,
        dry_run: bool,
        vm: tuple[str, int] | None = None,
        console_gpu: bool = False,
    ) -> Result:
        if dry_run and os.geteuid() != 0:  # anyone may look at a plan; the journal is root's
            return self._dry_run(operation, bdf, {}, vm, console_gpu, [NOT_ROOT])
        if dry_run:  # a plan only reads: it never creates a journal nor takes the lock
            if not (self.state_dir / "journal.sqlite").exists():
                return self._dry_run(operation, bdf, {}, vm, console_gpu, [])
            journal = Journal(self.state_dir, readonly=True)
            try:
                return self._dry_run(operation, bdf, journal.devices(), vm, console_gpu, [])
            finally:
                journal.close()
        journal = Journal(self.state_dir)
        try:
            with journal.locked():
                recovered = self.recover(journal)
                toolstack, warnings = self._toolstack(journal.devices(), False, console_gpu)
                plan = self._plan(toolstack, operation, bdf, vm)
                result = Result(operation, plan.devices, dry_run, recovered=recovered, warnings=warnings)
                platform = toolstack.platform
                assert isinstance(platform, LinuxPlatform)
                drivers = {
                    str(d): platform.driver(d) if platform.host_driver_bound(d) else None
                    for d in plan.devices
                }
                kinds = {str(d): "identity" for d in plan.devices if platform.group_type(d) == "identity"}
                op = journal.begin(operation, [str(d) for d in plan.devices], drivers, kinds)
                platform.step_log = lambda description: journal.step(op, description)
                try:
                    toolstack.execute(plan)
                except OperationFailed as failure:
                    journal.finish(op, f"failed: {failure}", self._states(toolstack, plan))
                    raise
                journal.finish(op, "done", self._states(toolstack, plan))
                result.writes = platform.writes
                return result
        finally:
            journal.close()

    def _dry_run(
        self,
        operation: str,
        bdf: Bdf,
        rows: dict[str, DeviceRow],
        vm: tuple[str, int] | None,
        console_gpu: bool,
        warnings: list[str],
    ) -> Result:
        toolstack, more = self._toolstack(rows, True, console_gpu)
        plan = self._plan(toolstack, operation, bdf, vm)
        toolstack.execute(plan)
        platform = toolstack.platform
        assert isinstance(platform, LinuxPlatform)
        return Result(operation, plan.devices, True, platform.writes, warnings=warnings + more)

    def _toolstack(
        self, rows: dict[str, DeviceRow], dry_run: bool, console_gpu: bool
    ) -> tuple[Toolstack, list[str]]:
        platform = self._platform(rows, dry_run, console_gpu)
        for held in rows.values():
            if held.vm is not None and held.vm not in platform.domains():
                platform.create_domain(held.vm, iommu_context=True)
                platform.vm_users[held.vm] = held.uid or 0
        toolstack = Toolstack(platform, Options())
        warnings = []
        for bdf, record in toolstack.ledger.items():
            row = rows.get(str(bdf))
            if platform.context_of(bdf) == QUARANTINE and row is not None and row.vm is not None:
                record.state, record.vm = State.ASSIGNED, row.vm  # handed to a VM's process
                record.context = record.msi = record.exposed = row.vm
                record.guest_touched = True
            elif platform.context_of(bdf) == QUARANTINE:
                record.state = State.QUARANTINED  # bound to vfio-pci: by pciguard or by hand
            elif row is not None and row.state == "quarantined":
                warnings.append(
                    f"{bdf} was quarantined but is now with {platform.driver(bdf) or 'no driver'}: "
                    "something bound it behind pciguard's back"
                )
        return toolstack, warnings

    def _platform(
        self, rows: dict[str, DeviceRow], dry_run: bool = False, console_gpu: bool = False
    ) -> LinuxPlatform:
        """This host as it stands, with what the journal remembers of its devices
        (``console_gpu``: the console GPU judged as any other device)."""
        reading = read_host(self.root)
        self.critical_why = dict(reading.facts.host_critical)
        host = translating_on_quarantine(reading.host)
        if console_gpu:
            console = {b for b, why in reading.facts.host_critical.items() if why == CONSOLE_GPU}
            functions = {
                b: replace(f, host_critical=False) if b in console else f for b, f in host.topology.items()
            }
            host = replace(host, topology=Topology(functions))
        known = {b: rows[str(b)] for b in host.topology if str(b) in rows}
        drivers = {b: row.host_driver for b, row in known.items()}
        kinds = {b: row.group_type for b, row in known.items() if row.group_type}
        return LinuxPlatform(Fs(self.root), host, drivers, kinds, dry_run=dry_run)

    def _plan(self, toolstack: Toolstack, operation: str, bdf: Bdf, vm: tuple[str, int] | None) -> Plan:
        if bdf not in toolstack.host.topology:
            raise RefusedError(f"{bdf} is not a PCI device of this host", device=str(bdf))
        platform = toolstack.platform
        assert isinstance(platform, LinuxPlatform)
        if operation == "unquarantine":
            return toolstack.plan_make_unassignable(bdf)
        if operation == "assign":
            assert vm is not None
            name, uid = vm
            if name in platform.domains() and platform.vm_users[name] != uid:
                raise RefusedError(f"{name} runs as uid {platform.vm_users[name]}, not {uid}")
            if name not in platform.domains():
                platform.create_domain(name, iommu_context=True)
                platform.vm_users[name] = uid
            return toolstack.plan_assign(bdf, name)
        if operation == "release":
            plan = toolstack.plan_release(bdf)
            for device in plan.devices:
                node = platform.group_node(device)
                if holders := holders_of(platform.fs, node):
                    raise RefusedError(
                        f"cannot release {device}: process {', '.join(map(str, holders))} still holds "
                        f"/{node} open, so its IOMMU domain still holds the device; detach the device "
                        "in the VM, or stop the VM, first",
                        device=str(device),
                    )
            return plan
        for member in toolstack.host.group_of(bdf).members:
            if toolstack.host.topology[member].host_critical and member in self.critical_why:
                why = self.critical_why[member]
                hint = "; pass --console-gpu to quarantine it all the same" if why == CONSOLE_GPU else ""
                raise RefusedError(
                    f"cannot quarantine {bdf}: {member} is host-critical: {why}{hint}", device=str(member)
                )
        plan = toolstack.plan_make_assignable(bdf)
        for device in plan.devices:
            if refusal := quarantine_refusal(toolstack.host, device):
                raise RefusedError(f"cannot quarantine {device}: {refusal}", device=str(device))
        return plan

    @staticmethod
    def _states(toolstack: Toolstack, plan: Plan) -> dict[str, DeviceRow]:
        names = {State.QUARANTINED: "quarantined", State.HOST: "host", State.ASSIGNED: "assigned"}
        platform = toolstack.platform
        assert isinstance(platform, LinuxPlatform)
        out = {}
        for device in plan.devices:
            record = toolstack.ledger[device]
            uid = platform.vm_users.get(record.vm) if record.vm else None
            out[str(device)] = DeviceRow(names.get(record.state, "broken"), None, None, record.vm, uid)
        return out

    def recover(self, journal: Journal) -> list[str]:
        """Bring the devices of every interrupted operation to quarantine (fail closed:
        a device that was being made assignable, or given back, ends up blocked)."""
        notes = []
        for op in journal.operations(unfinished_only=True):
            notes.append(self._recover(journal, op))
        return notes

    def _recover(self, journal: Journal, op: Operation) -> str:
        platform = self._platform(journal.devices())
        platform.step_log = lambda description: journal.step(op.id, description)
        last = next((d for d, status in reversed(op.steps) if status == "intended"), None)
        last = last or (op.steps[-1][0] if op.steps else "before its first step")
        states, held = {}, []
        for name in op.devices:
            device = Bdf.parse(name)
            if not platform.present(device):
                states[name] = BROKEN
                continue
            try:
                if platform.host_driver_bound(device):
                    platform.unbind_host_driver(device)
                platform.attach(device, QUARANTINE)
                node = platform.group_node(device)
                if platform.fs.exists(node):  # no VM's process may open it any more
                    platform.unexpose(device, QUARANTINE)
                    if holders := holders_of(platform.fs, node):
                        held.append(f"{device} (process {', '.join(map(str, holders))} holds /{node})")
                states[name] = QUARANTINED
            except StepFailed as exc:
                states[name] = BROKEN
                journal.finish(op.id, f"interrupted at {last}; recovery failed: {exc}", states)
                raise StepFailed(
                    "recover",
                    f"{op.name} of {' '.join(op.devices)} was interrupted and "
                    f"could not be brought back to quarantine: {exc}",
                ) from exc
        outcome = f"interrupted at {last}; recovered: {', '.join(op.devices)} quarantined"
        if held:
            outcome += f"; still attached to a VM process's IOMMU domain until it exits: {'; '.join(held)}"
        journal.finish(op.id, outcome, states)
        return f"{op.name} #{op.id} {outcome}"


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
