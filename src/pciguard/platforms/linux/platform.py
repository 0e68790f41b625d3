"""The ``Platform`` protocol on a real Linux host: each step is a few sysfs writes.

- ``unbind_host_driver(d)``: ``d`` to ``devices/d/driver/unbind``
- ``attach(d, quarantine)``: ``DMA`` to ``/sys/kernel/iommu_groups/N/type`` if the
  group is ``identity`` (one device only), ``vfio-pci`` to ``devices/d/driver_override``,
  ``d`` to ``drivers_probe``; then it checks that vfio-pci holds the device
- ``attach(d, host)``: ``d`` to ``drivers/vfio-pci/unbind`` (if bound), a newline to
  ``devices/d/driver_override``, and the group's type back if quarantine changed it
- ``bind_host_driver(d)``: ``d`` to ``drivers/DRIVER/bind``, DRIVER being the one it had
  before quarantine; nothing if it had none
- ``offer_host_driver(d)`` (a hot-plugged device): ``d`` to the ``bind`` of each loaded
  driver in turn (``bind`` attaches only a driver whose ID table matches, so vfio-pci's
  claim on other new devices never lapses), the device's module loaded first on a live
  host if none takes it; still none: ``pciguard-hold`` to ``driver_override``
- ``reset(d)``: ``1`` to ``devices/d/reset``; ``remove(d)``: ``1`` to ``devices/d/remove``
  (the kernel removes what is below a bridge with it)
- ``attach(bridge, quarantine)``: nothing (vfio-pci takes no bridge); refused unless
  the bridge's group translates, whose domain then maps nothing for it
- ``expose(d, vm)`` / ``unexpose``: the group's ``/dev/vfio/N`` is given to the VM's
  user (mode 0600) / back to root; ``attach(d, vm)``: nothing, the VM's VFIO process
  attaches the group to its own IOMMU domain when it opens that node
- ``flush_iotlb``, ``route_msi``: nothing; the kernel flushes the IOTLB on every domain
  change, and a device bound to vfio-pci and not opened has MSIs off and no remapping
  entries

(all under ``/sys/bus/pci``). Binding goes through ``driver_override`` and
``drivers_probe``, never ``new_id``, so no other device with the same IDs is captured.
A quarantined device sits in its group's default domain with nothing mapped for it,
which blocks its DMA only when that domain translates (``DMA`` or ``DMA-FQ``, not
``identity``): hence the switch of single-device identity groups above; the toolstack
refuses the others.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from pciguard.errors import PlatformMisuse, RefusedError, StepFailed
from pciguard.model import Bdf, DomainType, Host
from pciguard.model.groups import TRANSLATING_TYPES
from pciguard.model.kernel import QUARANTINE_DRIVERS, VFIO_PCI
from pciguard.platforms.base import HOST, QUARANTINE, DomainInfo, DomainState
from pciguard.platforms.linux.sysfs import (
    DRIVERS_PROBE,
    HOLD,
    IOMMU_GROUPS,
    PCI_DEVICES,
    PCI_DRIVERS,
    VFIO_NODES,
    Fs,
    holders_of,
)

StepLog = Callable[[str], Callable[[str], None]]  # the journal: a step intended, then how it ended


@contextmanager
def journaled(step_log: StepLog | None, description: str) -> Iterator[None]:
    """One platform step, told to the journal before it is taken and after it ends."""
    ended = step_log(description) if step_log else None
    try:
        yield
    except BaseException:
        if ended is not None:
            ended("failed")
        raise
    if ended is not None:
        ended("done")


@dataclass(frozen=True)
class Command:
    """A command a platform runs (or, in a dry run, would run), such as Xen's ``xl``."""

    argv: tuple[str, ...]

    def __str__(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Write:
    path: str  # relative to the root ("sys/bus/pci/...")
    value: str

    def __str__(self) -> str:
        shown = self.value.strip() or "''"
        return f"echo {shown} > /{self.path}"


class LinuxPlatform:
    """A Linux host driven through sysfs under ``fs``'s root.

    ``host_drivers`` names, per device, the host driver to give it back to (recorded
    when it was quarantined). With ``dry_run`` nothing is written: ``writes`` collects
    what would be. ``step_log`` (the journal) hears of each step before and after it.
    """

    def __init__(
        self,
        fs: Fs,
        host: Host,
        host_drivers: Mapping[Bdf, str | None],
        group_types: Mapping[Bdf, str] | None = None,
        *,
        dry_run: bool = False,
        step_log: StepLog | None = None,
    ) -> None:
        self.fs = fs
        self._host = host
        self.host_drivers = dict(host_drivers)
        self.group_types = dict(group_types or {})  # types pciguard changed, to restore
        self.dry_run = dry_run
        self.step_log = step_log
        self.writes: list[Write | Command] = []  # in order; a dry run's plan
        self._dry: dict[Bdf, str | None] = {}  # dry run: the drivers the writes would leave
        self._dry_override: dict[Bdf, str] = {}
        self._vms: dict[str, DomainInfo] = {}
        self.vm_users: dict[str, int] = {}  # VM -> the uid its VFIO process runs as

    @property
    def host(self) -> Host:
        return self._host

    # -- what is there now ---------------------------------------------------
    def driver(self, device: Bdf) -> str | None:
        if device in self._dry:
            return self._dry[device]
        return self.fs.link_name(f"{PCI_DEVICES}/{device}/driver")

    def domains(self) -> Mapping[str, DomainInfo]:
        return self._vms

    def present(self, device: Bdf) -> bool:
        return self.fs.exists(f"{PCI_DEVICES}/{device}")

    def host_driver_bound(self, device: Bdf) -> bool:
        driver = self.driver(device)
        return driver is not None and driver not in QUARANTINE_DRIVERS

    def context_of(self, device: Bdf) -> str | None:
        """QUARANTINE for a device vfio-pci holds: its group is in the default domain
        until a VM's VFIO process attaches it to its own (see ``attach``)."""
        return QUARANTINE if self.driver(device) in QUARANTINE_DRIVERS else HOST

    # -- VMs: VFIO users (QEMU, crosvm, cloud-hypervisor), started by their own tools --
    def create_domain(self, name: str, *, iommu_context: bool) -> None:
        """Register a VM; ``uid`` (vm_users) is the user its VFIO process runs as."""
        if not iommu_context:
            raise PlatformMisuse(f"{name}: a VFIO user always works through the IOMMU")
        self._vms[name] = DomainInfo(name, DomainState.RUNNING, iommu_context=True)

    def crash_domain(self, name: str) -> None:
        raise PlatformMisuse(f"pciguard does not stop VM processes ({name}); stop it with its own tools")

    # -- what the enforcement asks of a host (``HostPlatform``) ----------------------
    def know_vm(self, name: str, uid: int | None) -> None:
        """A VM the journal says was given devices: its process runs as ``uid``."""
        if name not in self._vms:
            self.create_domain(name, iommu_context=True)
            self.vm_users[name] = uid or 0

    def take_vm(self, name: str, uid: int | None) -> None:
        """A VM about to be given a device: its VFIO process runs as ``uid``."""
        if uid is None:
            raise RefusedError(f"give the user {name}'s process runs as (--user): it gets the VFIO group")
        if name in self._vms and self.vm_users[name] != uid:
            raise RefusedError(f"{name} runs as uid {self.vm_users[name]}, not {uid}")
        self.know_vm(name, uid)

    def vm_user(self, name: str) -> int | None:
        return self.vm_users.get(name)

    def holders(self, device: Bdf) -> list[str]:
        """Who still holds the device outside pciguard: the processes that hold its
        group's VFIO node open (its IOMMU domain holds the device until they let go)."""
        node = self._node(device)
        if node is None:
            return []
        return [f"process {pid} still holds /{node} open" for pid in holders_of(self.fs, node)]

    def _node(self, device: Bdf) -> str | None:
        group = self._group(device)
        return f"{VFIO_NODES}/{group}" if group is not None else None

    def destroy_domain(self, name: str) -> None:
        self._vms.pop(name, None)

    def enable_iommu_context(self, name: str) -> None:
        raise PlatformMisuse("a VFIO user always works through the IOMMU")

    def map_reserved(self, device: Bdf, domain: str) -> None:
        raise PlatformMisuse("VFIO maps no firmware 1:1 region into a guest; such devices are refused")

    def unmap_reserved(self, device: Bdf, domain: str) -> None:
        raise PlatformMisuse("VFIO maps no firmware 1:1 region into a guest; such devices are refused")

    def expose(self, device: Bdf, domain: str) -> None:
        """Hand the device's VFIO group node to the VM's user: only that user's process
        can now open it, attach the group to its own IOMMU domain and map its memory."""
        with self._step(f"expose({device}, {domain})"):
            self._hand_over(device, self.vm_users[domain])

    def unexpose(self, device: Bdf, domain: str) -> None:
        with self._step(f"unexpose({device}, {domain})"):
            self._hand_over(device, 0)

    def group_node(self, device: Bdf) -> str:
        node = self._node(device)
        if node is None:
            raise StepFailed("expose", f"{device} is in no IOMMU group")
        return node

    def _hand_over(self, device: Bdf, uid: int) -> None:
        node = self.group_node(device)
        self.writes.append(Write(node, f"owner {uid}"))
        if self.dry_run:
            return
        try:
            self.fs.hand_over(node, uid)
        except OSError as exc:
            raise StepFailed("expose", f"giving /{node} to uid {uid}: {exc.strerror or exc}") from exc

    # -- device steps --------------------------------------------------------------
    def unbind_host_driver(self, device: Bdf) -> None:
        with self._step(f"unbind_host_driver({device})"):
            if (driver := self.driver(device)) is not None:
                self.host_drivers[device] = driver
                self._write(f"{PCI_DEVICES}/{device}/driver/unbind", str(device))

    def bind_host_driver(self, device: Bdf) -> None:
        with self._step(f"bind_host_driver({device})"):
            driver = self.host_drivers.get(device)
            if driver is None:
                return  # it had no driver before quarantine: it stays without one
            if self.fs.exists(f"{PCI_DRIVERS}/{driver}"):
                self._write(f"{PCI_DRIVERS}/{driver}/bind", str(device))
            else:
                self._write(DRIVERS_PROBE, str(device))
            if not self.dry_run and self.driver(device) != driver:
                raise StepFailed("bind_host_driver", f"{driver} did not bind {device}")

    def offer_host_driver(self, device: Bdf) -> None:
        with self._step(f"offer_host_driver({device})"):
            self._write(f"{PCI_DEVICES}/{device}/driver_override", "\n")
            if self.dry_run or self.driver(device) is not None:
                return
            for attempt in range(2):
                for name in self.fs.listdir(PCI_DRIVERS):
                    if name in QUARANTINE_DRIVERS or not self.fs.exists(f"{PCI_DRIVERS}/{name}/bind"):
                        continue
                    with contextlib.suppress(StepFailed):  # ENODEV: its ID table does not match
                        self._write(f"{PCI_DRIVERS}/{name}/bind", str(device))
                    if self.driver(device) is not None:
                        return
                if attempt == 0:
                    self.fs.load_module_for(device)
            self._write(f"{PCI_DEVICES}/{device}/driver_override", HOLD)  # no driver takes it

    def reset(self, device: Bdf) -> None:
        with self._step(f"reset({device})"):
            self._write(f"{PCI_DEVICES}/{device}/reset", "1")

    def attach(self, device: Bdf, domain: str) -> None:
        with self._step(f"attach({device}, {domain})"):
            if domain == QUARANTINE:
                self._to_vfio(device)
            elif domain == HOST:
                if self.driver(device) in QUARANTINE_DRIVERS:
                    self._write(f"{PCI_DRIVERS}/{self.driver(device)}/unbind", str(device))
                self._write(f"{PCI_DEVICES}/{device}/driver_override", "\n")
                if (kind := self.group_types.get(device)) is not None:  # as it was before quarantine
                    self._write(f"{IOMMU_GROUPS}/{self._group(device)}/type", kind)
            elif domain in self._vms:
                # Nothing to write: the VM's VFIO process attaches the group to its own
                # IOMMU domain when it opens the group node (after ``expose``), and the
                # kernel returns it to the default domain when the process lets go.
                if self.driver(device) != VFIO_PCI:
                    raise StepFailed("attach", f"{device} is not bound to vfio-pci")
            else:
                raise PlatformMisuse(f"cannot attach {device} to {domain}: there is no such VM")

    def _to_vfio(self, device: Bdf) -> None:
        if self._host.topology[device].kind.is_bridge:
            if self.group_type(device) not in TRANSLATING_TYPES:
                raise self._untranslated(device, "a bridge is held only by a translating group")
            return  # vfio-pci takes no bridge; its group's domain maps nothing for it
        if not self.dry_run and not self.fs.exists(f"{PCI_DRIVERS}/{VFIO_PCI}"):
            raise StepFailed("attach", "the vfio-pci driver is not loaded: run `modprobe vfio-pci` first")
        if self.driver(device) == VFIO_PCI:
            if self.group_type(device) in TRANSLATING_TYPES:
                return
            # Claimed at enumeration in an identity group, which lets it reach all RAM:
            # let go of it, make the group translating, and bind again.
            self._write(f"{PCI_DRIVERS}/{VFIO_PCI}/unbind", str(device))
        if self.host_driver_bound(device):  # the toolstack unbinds first; never bind over a driver
            raise StepFailed("attach", f"{device} is still bound to {self.driver(device)}")
        self._make_translating(device)
        self._write(f"{PCI_DEVICES}/{device}/driver_override", VFIO_PCI)
        self._write(DRIVERS_PROBE, str(device))
        if not self.dry_run and self.driver(device) != VFIO_PCI:
            raise StepFailed("attach", f"vfio-pci did not bind {device} (see the kernel log)")

    def _group(self, device: Bdf) -> str | None:
        return self.fs.link_name(f"{PCI_DEVICES}/{device}/iommu_group")

    def group_type(self, device: Bdf) -> str | None:
        """The type of the device's group's default domain, as the kernel says now."""
        group = self._group(device)
        try:
            data = self.fs.read_bytes(f"{IOMMU_GROUPS}/{group}/type") if group else None
        except OSError:
            return None
        return data.decode("utf-8", "replace").strip() if data else None

    def _make_translating(self, device: Bdf) -> None:
        """A group of type ``identity`` does not translate, so vfio-pci alone would not
        block the device's DMA: switch it to ``DMA`` first (the kernel allows that for a
        group of one device that no driver holds). ``group_types`` remembers the type to
        restore when the device goes back to the host."""
        group, kind = self._group(device), self.group_type(device)
        if kind in TRANSLATING_TYPES:
            return
        if kind != DomainType.IDENTITY:  # unreadable or unknown: fail closed
            raise self._untranslated(device, "vfio-pci would not be known to block it")
        if len(self.fs.listdir(f"{IOMMU_GROUPS}/{group}/devices")) != 1:
            raise StepFailed(
                "attach",
                f"group {group} of {device} has an identity domain and more than one device; the "
                "kernel switches only single-device groups to DMA: boot without iommu=pt",
            )
        self.group_types[device] = kind
        self._write(f"{IOMMU_GROUPS}/{group}/type", "DMA")

    def _untranslated(self, device: Bdf, why: str) -> StepFailed:
        group, kind = self._group(device), self.group_type(device)
        where = f"/{IOMMU_GROUPS}/{group}/type" if group else f"the iommu_group link of {device}"
        return StepFailed(
            "attach",
            f"cannot tell whether {device}'s DMA is translated ({where} says {kind or 'nothing'}); {why}",
        )

    def flush_iotlb(self, device: Bdf) -> None:
        """Nothing to write: the kernel flushes the IOTLB whenever a domain changes."""

    def route_msi(self, device: Bdf, domain: str) -> None:
        """Nothing to write: interrupt remapping entries follow the driver that enables
        MSIs; vfio-pci enables none until a user opens the device."""

    def remove(self, device: Bdf) -> None:
        with self._step(f"remove({device})"):
            self._write(f"{PCI_DEVICES}/{device}/remove", "1")

    # -- helpers -------------------------------------------------------------------
    def _step(self, description: str) -> contextlib.AbstractContextManager[None]:
        return journaled(None if self.dry_run else self.step_log, description)

    def _write(self, path: str, value: str) -> None:
        self.writes.append(Write(path, value))
        if self.dry_run:
            self._pretend(path, value)
            return
        try:
            self.fs.write(path, value)
        except OSError as exc:
            raise StepFailed("sysfs", f"writing {value.strip()!r} to /{path}: {exc.strerror or exc}") from exc

    def _pretend(self, path: str, value: str) -> None:
        """What the kernel would do with a write, so that a dry run plans what follows."""
        parts = path.split("/")
        if parts[-1] == "driver_override":
            self._dry_override[Bdf.parse(parts[-2])] = value.strip()
        elif parts[-1] == "unbind":
            self._dry[Bdf.parse(value)] = None
        elif parts[-1] == "bind":
            self._dry[Bdf.parse(value)] = parts[-2]
        elif parts[-1] == "drivers_probe":
            device = Bdf.parse(value)
            self._dry[device] = self._dry_override.get(device) or self.host_drivers.get(device)
