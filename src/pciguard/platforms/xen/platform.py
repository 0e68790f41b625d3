"""The ``Platform`` protocol on a Xen dom0: each step is an ``xl`` command or a sysfs write.

- ``unbind_host_driver(d)``, ``bind_host_driver(d)``, ``reset(d)``, ``remove(d)``: as
  on Linux (``LinuxPlatform``), so pciguard, not libxl, remembers the driver to give back
- ``attach(d, quarantine)`` from dom0: ``xl pci-assignable-add d`` (xen-pciback takes
  it, Xen moves its context to DOMID_IO); refused unless Xen quarantines, since with
  ``iommu=no-quarantine`` an assignable device stays in dom0's context
- ``attach(d, vm)``: ``xl pci-attach vm d``: Xen points the device's context at the
  domain and the guest's frontend sees it, one libxl operation; ``expose``,
  ``route_msi`` and ``flush_iotlb`` then have nothing left to do (Xen sets up the
  interrupt remapping entries and flushes as it reassigns)
- ``attach(d, quarantine)`` from a VM: ``xl pci-detach vm d`` (back to pciback and
  DOMID_IO, never dom0)
- ``attach(d, host)``: ``xl pci-assignable-remove d`` (without ``-r``: pciguard rebinds);
  a device pciback merely holds is unbound from it
- ``crash_domain(vm)``: ``xl pause vm`` (it runs no more; its memory is held);
  ``destroy_domain(vm)``: ``xl destroy vm``

Domains are Xen's (``xl list -l``): pciguard creates none. A domain has an IOMMU
context from its creation when its configuration says ``passthrough=`` something
other than ``disabled``; with none, Xen would set one up late, at the first
``pci-attach`` (the XSA-288 class), and the toolstack refuses it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from pciguard.errors import PlatformMisuse, RefusedError, StepFailed
from pciguard.model import Bdf, Host
from pciguard.model.kernel import PCIBACK, XenFacts, XenQuarantine
from pciguard.platforms.base import HOST, QUARANTINE, DomainInfo, DomainState
from pciguard.platforms.linux.platform import Command, LinuxPlatform, StepLog
from pciguard.platforms.linux.sysfs import PCI_DEVICES, Fs
from pciguard.platforms.xen.evidence import parse_pci_list

XL_TIMEOUT = 120.0  # seconds: pci-attach waits for the guest's frontend


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[tuple[str, ...]], Ran]


def run_xl(argv: tuple[str, ...]) -> Ran:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=XL_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return Ran(127, "", str(exc))
    return Ran(done.returncode, done.stdout, done.stderr)


def parse_domains(text: str) -> dict[str, DomainInfo]:
    """``xl list -l``: a JSON list of domains; Domain-0 left out."""
    try:
        listed = json.loads(text or "[]")
    except ValueError:
        return {}
    out = {}
    for entry in listed if isinstance(listed, list) else []:
        config = entry.get("config") if isinstance(entry, dict) else None
        c_info = config.get("c_info") if isinstance(config, dict) else None
        name = c_info.get("name") if isinstance(c_info, dict) else None
        if not isinstance(name, str) or not isinstance(c_info, dict) or entry.get("domid") == 0:
            continue
        passthrough = c_info.get("passthrough")
        context = isinstance(passthrough, str) and passthrough not in ("disabled", "default")
        out[name] = DomainInfo(name, DomainState.RUNNING, iommu_context=context)
    return out


class XenPlatform(LinuxPlatform):
    """A Xen dom0 driven through ``xl`` and sysfs under ``fs``'s root: a Linux host (its
    drivers, resets and removals are sysfs writes as on any) whose guests are Xen's.
    ``assignable``: the devices pciguard made assignable (its journal says so)."""

    def __init__(
        self,
        fs: Fs,
        host: Host,
        xen: XenFacts,
        host_drivers: Mapping[Bdf, str | None],
        *,
        assignable: Collection[Bdf] = (),
        run: Runner | None = None,
        dry_run: bool = False,
        step_log: StepLog | None = None,
    ) -> None:
        super().__init__(fs, host, host_drivers, dry_run=dry_run, step_log=step_log)
        self.xen, self.run = xen, run or run_xl
        # In DOMID_IO by pciguard's pci-assignable-add: while pciback still holds them (an
        # unquarantine killed after pci-assignable-remove left one driverless).
        self._assignable = {d for d in assignable if self.driver(d) == PCIBACK}
        self._domains = parse_domains(self._xl("list", "-l", quiet=True).stdout)
        self._with: dict[Bdf, str] = {}  # devices attached to a domain, as xl pci-list says
        for name in self._domains:
            for device in parse_pci_list(self._xl("pci-list", name, quiet=True).stdout):
                self._with[device] = name

    # -- what is there now ---------------------------------------------------------
    def domains(self) -> Mapping[str, DomainInfo]:
        return self._domains

    def context_of(self, device: Bdf) -> str | None:
        if device in self._with:
            return self._with[device]
        held = device in self._assignable and self.driver(device) == PCIBACK and self._quarantines()
        return QUARANTINE if held else HOST

    def _quarantines(self) -> bool:
        return self.xen.quarantine in (XenQuarantine.BASIC, XenQuarantine.SCRATCH_PAGE)

    def group_type(self, device: Bdf) -> str | None:
        return None  # Xen forms no groups in dom0

    # -- domains ---------------------------------------------------------------------
    def create_domain(self, name: str, *, iommu_context: bool) -> None:
        raise PlatformMisuse(f"pciguard creates no Xen domain ({name}): `xl create` it with passthrough=")

    def crash_domain(self, name: str) -> None:
        with self._step(f"crash_domain({name})"):
            self._xl("pause", name)
            self._domains[name] = DomainInfo(name, DomainState.CRASHED, self._domains[name].iommu_context)

    def destroy_domain(self, name: str) -> None:
        with self._step(f"destroy_domain({name})"):
            self._xl("destroy", name)
            self._domains[name] = DomainInfo(name, DomainState.DESTROYED, self._domains[name].iommu_context)

    def enable_iommu_context(self, name: str) -> None:
        raise PlatformMisuse("a domain's IOMMU context is set when it is created (passthrough=)")

    # -- what the enforcement asks of a host (``HostPlatform``) ----------------------
    def know_vm(self, name: str, uid: int | None) -> None:
        """Xen's own list of domains is the truth; a domain gone since is simply gone."""

    def take_vm(self, name: str, uid: int | None) -> None:
        if name not in self._domains:
            raise RefusedError(f"Xen has no domain named {name}: `xl create` it first, with passthrough=")

    def vm_user(self, name: str) -> int | None:
        return None

    def holders(self, device: Bdf) -> list[str]:
        return []  # xl pci-detach takes the device from its domain whatever the guest does

    # -- device steps: the domain changes are Xen's ------------------------------------
    def attach(self, device: Bdf, domain: str) -> None:
        with self._step(f"attach({device}, {domain})"):
            held_by = self._with.get(device)
            if domain == QUARANTINE and held_by is not None:
                self._xl("pci-detach", held_by, str(device))
                del self._with[device]
            elif domain == QUARANTINE:
                if not self._quarantines():
                    raise StepFailed(
                        "attach",
                        f"Xen would leave {device} in dom0's IOMMU context (no quarantine: "
                        "iommu=no-quarantine, or a Xen before 4.13); boot Xen with quarantine",
                    )
                if device not in self._assignable:  # a guest's device went back there itself
                    self._xl("pci-assignable-add", str(device))
                    self._assignable.add(device)
            elif domain == HOST and device in self._assignable:
                self._xl("pci-assignable-remove", str(device))
                self._assignable.discard(device)
            elif domain == HOST and self.driver(device) == PCIBACK:  # held, never in DOMID_IO
                self._write(f"{PCI_DEVICES}/{device}/driver/unbind", str(device))
            elif domain in self._domains:
                self._xl("pci-attach", domain, str(device))
                self._with[device] = domain
            else:
                raise PlatformMisuse(f"cannot attach {device} to {domain}: Xen has no such domain")

    def map_reserved(self, device: Bdf, domain: str) -> None:
        raise PlatformMisuse("pciguard gives no device with firmware 1:1 regions to a Xen guest")

    def unmap_reserved(self, device: Bdf, domain: str) -> None:
        raise PlatformMisuse("pciguard gives no device with firmware 1:1 regions to a Xen guest")

    def expose(self, device: Bdf, domain: str) -> None:
        """Nothing left to run: ``xl pci-attach`` (``attach``) gave the guest the device."""
        if self._with.get(device) != domain:
            raise StepFailed("expose", f"{device} is not attached to {domain}")

    def unexpose(self, device: Bdf, domain: str) -> None:
        """Nothing to run: ``xl pci-detach`` (``attach`` to quarantine) takes it away."""

    def _xl(self, *args: str, quiet: bool = False) -> Ran:
        """Run ``xl``; ``quiet``: only a question, asked in a dry run too, never failing."""
        command = Command(("xl", *args))
        if not quiet:
            self.writes.append(command)
            if self.dry_run:
                return Ran(0, "", "")
        ran = self.run(command.argv)
        if ran.returncode != 0 and not quiet:
            raise StepFailed("xl", f"{command} failed ({ran.returncode}): {ran.stderr.strip()[-300:]}")
        return ran
