"""The lab's machines and how to boot one.

Each machine is a q35 PC with QEMU's emulated Intel VT-d IOMMU, booted under TCG with a
real Debian kernel. The guest mounts the host's root read-only over 9p and chroots into
it, so this very checkout runs inside against the guest's real sysfs; a second 9p share
carries ``plan.json`` in and ``result.json`` (and snapshots) out.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.kit import Kit

CHECKOUT = Path(__file__).resolve().parents[2]
MONITOR = "monitor.sock"  # QEMU's human monitor, for hot-plugs
HOTPLUG_READY, HOTPLUG_DONE = "hotplug-ready", "hotplug-done"  # the guest's and the host's word
# seconds; a hung guest is killed, not waited for (the Xen guest creating a domU has
# taken over seven minutes beside two other guests on a slow day)
BOOT_LIMIT = 600
EDU = "edu,dma_mask=0xffffffffff"  # the default 28-bit mask would clamp DMA addresses silently
BASE_CMDLINE = "console=ttyS0 panic=-1 intel_iommu=on iommu.strict=1 loglevel=4"
XEN_CMDLINE = (
    "console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all "
    "dom0_mem=1024M,max:1024M dom0_max_vcpus=1 iommu=verbose"
)
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen panic=-1 loglevel=4"
STATE = ("--state-dir", "/run/pciguard")  # the journal, on the guest's tmpfs
VM_USER = 65534  # the user a VM's process runs as


@dataclass(frozen=True)
class Machine:
    name: str
    devices: tuple[str, ...]  # QEMU -device arguments, in order
    locators: dict[str, str]  # device name -> where it sits (see inside.locate)
    steps: tuple[dict[str, Any], ...]  # what the guest does, in order
    cmdline: str = ""  # kernel arguments beyond BASE_CMDLINE
    # Rounds of device_add arguments: the host sends round N when the guest writes
    # "hotplug-ready-N" into the results folder, and writes "hotplug-done-N" after.
    hotplug: tuple[tuple[str, ...], ...] = ()
    # Xen under QEMU (TCG, the same emulated VT-d): the lab's kernel boots as a PV dom0,
    # and ``xen`` is the hypervisor's own command line; None: no Xen.
    xen: str | None = None


@dataclass
class Boot:
    machine: Machine
    out: Path
    process: subprocess.Popen[bytes]


@dataclass(frozen=True)
class Outcome:
    machine: Machine
    out: Path
    exit_code: int
    console: str
    result: dict[str, Any] | None  # None: the guest wrote nothing back

    def step(self, name: str) -> Any:
        assert self.result is not None, f"{self.machine.name}: no result\n{self.console[-3000:]}"
        error = self.result["errors"].get(name)
        assert error is None, f"{self.machine.name}: step {name} failed in the guest:\n{error}"
        return self.result["steps"][name]

    def bdf(self, device: str) -> str:
        assert self.result is not None
        found = self.result["devices"][device]
        assert found, f"{self.machine.name}: no device at {self.machine.locators[device]}"
        return str(found)


def qemu_argv(kit: Kit, machine: Machine, out: Path) -> list[str]:
    if machine.xen is None:
        boot = [
            "-m", "1024", "-kernel", str(kit.vmlinux), "-initrd", str(kit.initramfs),
            "-append", f"{BASE_CMDLINE} {machine.cmdline}".strip(),
        ]  # fmt: skip
    else:  # Xen boots first; dom0's kernel, its command line and initramfs are its modules
        dom0 = f"{kit.vmlinux} {DOM0_CMDLINE} {machine.cmdline}".strip()
        # QEMU separates multiboot modules with commas: a comma of their own is doubled.
        boot = [
            "-m", "2048", "-kernel", str(kit.xen),
            "-append", f"{XEN_CMDLINE} {machine.xen}".strip(),
            "-initrd", f"{dom0.replace(',', ',,')},{kit.dom0_initramfs}",
        ]  # fmt: skip
    argv = [
        "timeout", "--kill-after=10", str(BOOT_LIMIT),
        str(kit.qemu), "-accel", "tcg,thread=multi", "-machine", "q35,kernel-irqchip=split",
        "-cpu", "qemu64", "-smp", "1", "-nodefaults",
        "-device", "intel-iommu,intremap=on",
        "-display", "none", "-no-reboot",
        "-monitor", f"unix:{out / MONITOR},server=on,wait=off" if machine.hotplug else "none",
        "-serial", f"file:{out / 'console.log'}",
        *boot,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={out},mount_tag=results,security_model=none",
    ]  # fmt: skip
    for device in machine.devices:
        argv += ["-device", device]
    return argv


def guest_script(out: Path, machine: Machine | None = None, kit: Kit | None = None) -> str:
    """run.sh: from the initramfs into the host's root, with the guest's own kernel views
    (in a Xen dom0 also /proc/xen, a writable /var, and Xen's tools from the kit with
    xenstored and xenconsoled started: ``xl create`` waits for a guest's console)."""
    py = shlex.quote(sys.executable)
    paths = shlex.quote(f"{CHECKOUT / 'src'}:{CHECKOUT / 'tests'}")
    target = shlex.quote(f"/host{out}")
    venv = ""
    if sys.prefix != sys.base_prefix:  # a venv: its packages, for the ordinary user's runs
        prefix = shlex.quote(os.path.realpath(sys.prefix))
        venv = f"mkdir /host/run/venv && mount -o bind /host{prefix} /host/run/venv"
    path, xen = "/usr/bin:/bin", ""
    if machine is not None and machine.xen is not None and kit is not None:
        tools = kit.xen_tools
        bins = shlex.quote(f"{tools}/usr/lib/xen-4.17/bin")
        libs = shlex.quote(f"{tools}/usr/lib/x86_64-linux-gnu")
        path = f"{bins}:/usr/bin:/bin LD_LIBRARY_PATH={libs}"
        xen = f"""mount -t xenfs xenfs /host/proc/xen
mount -t tmpfs tmpfs /host/var
mkdir -p /host/var/lib/xen/dump /host/var/lib/xenstored /host/var/log/xen /host/run/xen
ln -s /run /host/var/run
mkdir -p /host/dev/pts && mount -t devpts devpts /host/dev/pts
chroot /host /usr/bin/env -i PATH={path} xenstored --pid-file /run/xenstored.pid
chroot /host /usr/bin/env -i PATH={path} xen-init-dom0 > /dev/null
chroot /host /usr/bin/env -i PATH={path} xenconsoled --pid-file=/run/xenconsoled.pid
"""
    return f"""set -u
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host || exit 1
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mount -t tmpfs tmpfs /host/run
mkdir /host/run/python && mount -o bind /host{shlex.quote(os.path.realpath(sys.base_prefix))} /host/run/python
{venv}
mount -o bind /out {target}
{xen}chroot /host /usr/bin/env -i PATH={path} HOME=/run TMPDIR=/run PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONPATH={paths} {py} -m lab.inside {shlex.quote(str(out / "plan.json"))}
"""


def start(kit: Kit, machine: Machine, out: Path) -> Boot:
    out.mkdir(parents=True, exist_ok=True)
    plan = {"devices": machine.locators, "steps": machine.steps, "kernel": str(kit.vmlinux)}
    (out / "plan.json").write_text(json.dumps(plan))
    (out / "run.sh").write_text(guest_script(out, machine, kit))
    log = open(out / "qemu.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(qemu_argv(kit, machine, out), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if machine.hotplug:
        threading.Thread(target=plug_when_ready, args=(machine, out), daemon=True).start()
    return Boot(machine, out, process)


class Runs:
    """Machines booted as many at a time as the host has cores (each has one virtual
    CPU), in the order given (longest first): TCG guests on more virtual CPUs than the
    host has cores only slow each other past their limits. ``outcome(name)`` waits for
    that machine alone."""

    def __init__(
        self, kit: Kit, machines: tuple[Machine, ...], root: Path, at_once: int | None = None
    ) -> None:
        self._kit, self._root = kit, root
        self._waiting = list(machines)
        self._at_once = at_once or max(2, os.cpu_count() or 1)
        self._boots: dict[str, Boot] = {}
        self._outcomes: dict[str, Outcome] = {}
        self._lock = threading.Condition()
        self._stopped = False
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        while True:
            with self._lock:
                if self._stopped or not self._waiting:
                    return
                running = sum(b.process.poll() is None for b in self._boots.values())
                if running < self._at_once:
                    machine = self._waiting.pop(0)
                    self._boots[machine.name] = start(self._kit, machine, self._root / machine.name)
                    self._lock.notify_all()
                    continue
            time.sleep(0.2)

    def outcome(self, name: str) -> Outcome:
        with self._lock:
            while name not in self._boots:
                self._lock.wait()
            boot = self._boots[name]
        if name not in self._outcomes:
            self._outcomes[name] = finish(boot)
        return self._outcomes[name]

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._waiting.clear()
            boots = list(self._boots.values())
        for boot in boots:
            if boot.process.poll() is None:
                boot.process.kill()
                boot.process.wait()


def plug_when_ready(machine: Machine, out: Path) -> None:
    """The host's side of hot-plugs: each time the guest says it is ready for the next
    round (a file in the shared results folder), plug that round's devices in through
    the QEMU monitor, and say so."""
    deadline = time.monotonic() + BOOT_LIMIT
    with socket.socket(socket.AF_UNIX) as monitor:
        for number, devices in enumerate(machine.hotplug):
            while not (out / f"{HOTPLUG_READY}-{number}").exists():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.1)
            if number == 0:
                monitor.connect(str(out / MONITOR))
                monitor.settimeout(30)
                _until_prompt(monitor)
            answers = []
            for device in devices:
                monitor.sendall(f"device_add {device}\n".encode())
                answers.append(_until_prompt(monitor))
            (out / f"{HOTPLUG_DONE}-{number}").write_text("\n".join(answers))


def _until_prompt(monitor: socket.socket) -> str:
    data = b""
    while not data.endswith(b"(qemu) "):
        chunk = monitor.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def finish(boot: Boot) -> Outcome:
    exit_code = boot.process.wait()
    result_file = boot.out / "result.json"
    console_file = boot.out / "console.log"
    console = console_file.read_text(errors="replace") if console_file.exists() else ""
    qemu_log = (boot.out / "qemu.log").read_text(errors="replace")
    return Outcome(
        machine=boot.machine,
        out=boot.out,
        exit_code=exit_code,
        console=console + ("\n[qemu] " + qemu_log if qemu_log.strip() else ""),
        result=json.loads(result_file.read_text()) if result_file.exists() else None,
    )


# Devices under separate ACS root ports, a switch under a root port without ACS
# (ioh3420), and a PCIe-to-PCI bridge with two conventional devices, in one machine.
# Plus an e1000e NIC, a device a real host driver binds.
TOPOLOGIES = Machine(
    name="topologies",
    devices=(
        "pcie-root-port,id=rp1,chassis=1,slot=1,bus=pcie.0,addr=0x10",
        f"{EDU},id=edu1,bus=rp1",
        "pcie-root-port,id=rp2,chassis=2,slot=2,bus=pcie.0,addr=0x11",
        f"{EDU},id=edu2,bus=rp2",
        "ioh3420,id=rp3,chassis=3,slot=3,bus=pcie.0,addr=0x12",
        "x3130-upstream,id=up,bus=rp3",
        "xio3130-downstream,id=dn1,bus=up,addr=0x0,chassis=4,slot=4",
        "xio3130-downstream,id=dn2,bus=up,addr=0x1,chassis=5,slot=5",
        f"{EDU},id=edu3,bus=dn1",
        f"{EDU},id=edu4,bus=dn2",
        "pcie-root-port,id=rp4,chassis=6,slot=6,bus=pcie.0,addr=0x13",
        "pcie-pci-bridge,id=br,bus=rp4",
        f"{EDU},id=edu5,bus=br,addr=0x1",
        f"{EDU},id=edu6,bus=br,addr=0x2",
        "pcie-root-port,id=rp5,chassis=7,slot=7,bus=pcie.0,addr=0x14",
        "e1000e,id=nic,bus=rp5",
    ),
    locators={
        "rp1": "00:10.0",
        "edu1": "00:10.0/00.0",
        "edu2": "00:11.0/00.0",
        "ioh3420": "00:12.0",
        "switch-up": "00:12.0/00.0",
        "edu3": "00:12.0/00.0/00.0/00.0",
        "edu4": "00:12.0/00.0/01.0/00.0",
        "pci-bridge": "00:13.0/00.0",
        "edu5": "00:13.0/00.0/01.0",
        "edu6": "00:13.0/00.0/02.0",
        "nic": "00:14.0/00.0",
    },
    steps=(
        {"do": "truth", "name": "truth"},
        {"do": "audit", "name": "audit"},
        {"do": "audit", "name": "audit-as-nobody", "user": 65534},
        {"do": "audit-table", "name": "audit-table"},
        {"do": "snapshot", "name": "snapshot"},
        {"do": "probe", "name": "probe-edu1-dma", "device": "edu1"},
        {"do": "probe", "name": "probe-edu5-dma", "device": "edu5"},
        {"do": "group-type", "name": "edu1-to-identity", "device": "edu1", "type": "identity"},
        {"do": "probe", "name": "probe-edu1-identity", "device": "edu1"},
        {"do": "audit", "name": "audit-edu1-identity"},
        {"do": "truth", "name": "truth-edu1-identity"},
        # Enforcement: quarantine a driver-less edu and the e1000e NIC, then give them back.
        {"do": "pciguard", "name": "quarantine-edu2", "args": ["quarantine", "{edu2}", *STATE]},
        {"do": "pciguard", "name": "quarantine-nic", "args": ["quarantine", "{nic}", *STATE]},
        {"do": "probe", "name": "probe-edu2-quarantined", "device": "edu2"},
        {"do": "nic-probe", "name": "probe-nic-quarantined", "device": "nic"},
        {"do": "audit", "name": "audit-quarantined"},
        {"do": "truth", "name": "truth-quarantined"},
        # A VM's process (uid 65534) cannot take the group before assign, and can after.
        {"do": "vfio-session", "name": "vfio-before-assign", "device": "edu2", "user": VM_USER},
        {
            "do": "pciguard",
            "name": "assign-edu2",
            "args": ["assign", "{edu2}", "--to", "vm1", "--user", str(VM_USER), *STATE],
        },
        {"do": "vfio-session", "name": "vfio-assigned", "device": "edu2", "user": VM_USER},
        {"do": "pciguard", "name": "release-edu2", "args": ["release", "{edu2}", *STATE]},
        {"do": "truth", "name": "truth-released"},
        {"do": "pciguard", "name": "unquarantine-nic", "args": ["unquarantine", "{nic}", *STATE]},
        {"do": "pciguard", "name": "unquarantine-edu2", "args": ["unquarantine", "{edu2}", *STATE]},
        {"do": "truth", "name": "truth-unquarantined"},
        {"do": "pciguard", "name": "journal", "args": ["journal", *STATE]},
        # The NIC probe's other half: driver-less in an identity group, its DMA lands.
        {"do": "unbind", "name": "nic-unbound", "device": "nic"},
        {"do": "group-type", "name": "nic-to-identity", "device": "nic", "type": "identity"},
        {"do": "nic-probe", "name": "probe-nic-identity", "device": "nic"},
    ),
)

ONE_EDU = ("pcie-root-port,id=rp1,chassis=1,slot=1,bus=pcie.0,addr=0x10", f"{EDU},id=edu1,bus=rp1")
ONE_EDU_STEPS = (
    {"do": "truth", "name": "truth"},
    {"do": "audit", "name": "audit"},
    {"do": "probe", "name": "probe-edu1", "device": "edu1"},
    {"do": "pciguard", "name": "quarantine-edu1", "args": ["quarantine", "{edu1}", *STATE]},
    {"do": "truth", "name": "truth-after-quarantine"},
    {"do": "probe", "name": "probe-edu1-after-quarantine", "device": "edu1"},
    {
        "do": "pciguard",
        "name": "assign-edu1",
        "args": ["assign", "{edu1}", "--to", "vm1", "--user", str(VM_USER), *STATE],
    },
    {"do": "vfio-session", "name": "vfio-as-root", "device": "edu1"},  # VFIO's own check
    {"do": "pciguard", "name": "release-edu1", "args": ["release", "{edu1}", *STATE]},
    {"do": "pciguard", "name": "unquarantine-edu1", "args": ["unquarantine", "{edu1}", *STATE]},
    {"do": "truth", "name": "truth-after-unquarantine"},
    {"do": "probe", "name": "probe-edu1-after-unquarantine", "device": "edu1"},
)


def one_edu(name: str, cmdline: str) -> Machine:
    """One edu under a root port, on a kernel booted with ``cmdline``."""
    return Machine(
        name=name, cmdline=cmdline, devices=ONE_EDU, locators={"edu1": "00:10.0/00.0"}, steps=ONE_EDU_STEPS
    )


PASSTHROUGH = one_edu("iommu-pt", "iommu=pt")
NO_INTREMAP = one_edu("intremap-off", "intremap=off")

# Empty root ports. First, without the guard and with drivers_autoprobe=0, an e1000e
# is plugged in: the kernel binds e1000e all the same. Then, with the guard running, two
# edu (no Linux driver claims them) and two more e1000e; the policy rejects the edu on
# 00:15.0, allows the NIC on 00:12.0 and quarantines the rest. Last, through the guard's
# socket, the first NIC is quarantined and given back.
EDU_ID, E1000E_ID = "1234:11e8", "8086:10d3"
HOTPLUG = Machine(
    name="hotplug",
    devices=tuple(
        f"pcie-root-port,id=hp{n},chassis={10 + n},slot={10 + n},bus=pcie.0,addr=0x{0x10 + n:x}"
        for n in (1, 2, 3, 4, 5)
    ),
    locators={},
    steps=(
        {"do": "plug-without-guard", "name": "without-guard", "round": 0, "expect": "00:14.0/00.0"},
        {
            "do": "guard-hotplug",
            "name": "guard",
            "round": 1,
            "policy": (
                f"reject id {EDU_ID} via-port 0000:00:15.0\n"
                f"allow id {E1000E_ID} class 02:00:* via-port 0000:00:12.0\n"
            ),
            "expect": {"edu": "00:11.0/00.0", "nic": "00:12.0/00.0", "nic2": "00:13.0/00.0"},
            "rejected": 1,
            "probe": {"edu": "edu", "nic2": "nic"},
            "control": "00:14.0/00.0",
        },
    ),
    hotplug=(
        ("e1000e,id=early,bus=hp4",),
        (
            f"{EDU},id=hpedu,bus=hp1",
            "e1000e,id=hpnic,bus=hp2",
            "e1000e,id=hpnic2,bus=hp3",
            f"{EDU},id=hpedu2,bus=hp5",
        ),
    ),
)


# A PV guest, created paused: Xen builds it (memory, IOMMU context) but it never runs.
DOMU_CONFIG = 'name = "vm1"\ntype = "pv"\nkernel = "{kernel}"\nmemory = 192\npassthrough = "enabled"\n'
# In the PV domU vm1: pciguard gives it the quarantined edu; the edu's DMA between two
# halves of a page of vm1's, and from vm1's page into dom0's memory; then vm1 is
# destroyed behind pciguard's back and the edu probed again; pciguard releases it.
DOMU_STEPS = (
    {"do": "xl-create", "name": "create-vm1", "config": DOMU_CONFIG},
    {"do": "pciguard", "name": "assign", "args": ["assign", "{edu1}", "--to", "vm1", *STATE]},
    {"do": "xl", "name": "pci-list", "args": ["pci-list", "vm1"]},
    {"do": "xen-probe", "name": "probe-domu", "device": "edu1", "domain": "vm1", "towards": "domain"},
    {"do": "xen-probe", "name": "probe-domu-to-dom0", "device": "edu1", "domain": "vm1"},
    {"do": "xl", "name": "destroy-vm1", "args": ["destroy", "vm1"]},
    {"do": "xl", "name": "assignable-after-destroy", "args": ["pci-assignable-list"]},
    {"do": "xen-probe", "name": "probe-after-destroy", "device": "edu1"},
    {"do": "pciguard", "name": "release", "args": ["release", "{edu1}", *STATE]},
)


def xen_machine(name: str, xen: str, domu: bool = False, seized: bool = False) -> Machine:
    """Xen 4.17 with the lab's kernel as its PV dom0 and one edu under a root port: the
    audit in dom0; the edu's DMA from dom0 before, (``seized``: after xen-pciback seized
    it, as ``xen-pciback.hide=`` does,) after ``pciguard quarantine`` made it assignable
    (xen-pciback, DOMID_IO), (``domu``: given to a PV domU and taken back, ``DOMU_STEPS``)
    and after ``pciguard unquarantine`` gave it back."""
    seize = (
        {"do": "pciback-seize", "name": "seize", "device": "edu1"},
        {"do": "audit", "name": "audit-seized", "args": STATE},
        {"do": "xen-probe", "name": "probe-seized", "device": "edu1"},
    )
    return Machine(
        name=name,
        devices=ONE_EDU,
        locators={"edu1": "00:10.0/00.0"},
        steps=(
            {"do": "xl", "name": "xl-info", "args": ["info"]},
            {"do": "xl", "name": "xl-dmesg", "args": ["dmesg"]},
            {"do": "audit", "name": "audit", "args": STATE},
            {"do": "xen-probe", "name": "probe-dom0", "device": "edu1"},
            *(seize if seized else ()),
            {"do": "pciguard", "name": "quarantine", "args": ["quarantine", "{edu1}", *STATE]},
            {"do": "xl", "name": "assignable", "args": ["pci-assignable-list"]},
            {"do": "audit", "name": "audit-quarantined", "args": STATE},
            {"do": "xen-probe", "name": "probe-quarantined", "device": "edu1"},
            *(DOMU_STEPS if domu else ()),
            {"do": "pciguard", "name": "unquarantine", "args": ["unquarantine", "{edu1}", *STATE]},
            {"do": "xl", "name": "assignable-after", "args": ["pci-assignable-list"]},
            {"do": "xen-probe", "name": "probe-given-back", "device": "edu1"},
            {"do": "pciguard", "name": "journal", "args": ["journal", *STATE]},
        ),
        xen=xen,
    )


XEN = xen_machine("xen", "", domu=True)
XEN_SCRATCH = xen_machine("xen-scratch", "iommu=quarantine=scratch-page", seized=True)
# The guard in a dom0: two empty root ports; with the guard running, an edu and an
# e1000e are plugged in. xen-pciback (loaded before e1000e) seizes both at enumeration;
# the policy allows the NIC on 00:12.0, and the edu goes to quarantine (DOMID_IO).
XEN_HOTPLUG = Machine(
    name="xen-hotplug",
    devices=tuple(
        f"pcie-root-port,id=hp{n},chassis={10 + n},slot={10 + n},bus=pcie.0,addr=0x{0x10 + n:x}"
        for n in (1, 2)
    ),
    locators={},
    steps=(
        {
            "do": "guard-hotplug",
            "name": "guard",
            "round": 0,
            "policy": f"allow id {E1000E_ID} class 02:00:* via-port 0000:00:12.0\n",
            "expect": {"edu": "00:11.0/00.0", "nic": "00:12.0/00.0"},
            "probe": {"edu": "xen-edu"},
        },
        {"do": "xl", "name": "assignable", "args": ["pci-assignable-list"]},
        {"do": "audit", "name": "audit", "args": STATE},
    ),
    hotplug=((f"{EDU},id=hpedu,bus=hp1", "e1000e,id=hpnic,bus=hp2"),),
    xen="",
)

MACHINES = (TOPOLOGIES, HOTPLUG, XEN, XEN_HOTPLUG, XEN_SCRATCH, PASSTHROUGH, NO_INTREMAP)  # the longest first
