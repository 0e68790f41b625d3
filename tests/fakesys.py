"""Render a simulated host as the sysfs, /proc and ACPI tree a Linux kernel would show.

``render(host, root)`` writes ``root/sys/...`` and ``root/proc/...`` (config space
bytes with capability lists, SR-IOV links, IOMMU groups, /sys/class/iommu, a DMAR
table, /proc/interrupts); ``pciguard.platforms.linux.read_host(root)`` must read the
same host back. ``Kernel`` says how the pretend kernel is set up.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pciguard.model import Arch, Bdf, Feature, Host, Topology
from pciguard.platforms.linux.config import PORT_TYPE_OF
from pciguard.platforms.linux.sysfs import IORESOURCE_MEM

DSN_SERIAL = 0x1122334455667788  # a serial number that snapshots must not carry


@dataclass
class Kernel:
    release: str = "6.8.0-fake"
    domain: str = "DMA"  # every group's default domain type
    groups: tuple[tuple[Bdf, ...], ...] | None = None  # None: the host's derived groups
    dmar_flags: int | None = None  # None: INTR_REMAP when a unit can remap interrupts
    cmdline: str = "root=/dev/nvme0n1p2 quiet"
    module_parameters: Mapping[str, str] = field(
        default_factory=dict
    )  # "vfio/enable_unsafe_noiommu_mode": "Y"
    header_only: bool = False  # config space as an ordinary user reads it
    dmar_mode: int = 0o444
    thunderbolt: Mapping[str, str] | None = None  # domain0 attributes, e.g. {"security": "user"}
    boot_vga: frozenset[Bdf] = frozenset()
    interrupts_remapped: bool | None = None  # None: as the host's IOMMUs say
    root_disk: Bdf | None = None


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def config_space(host: Host, bdf: Bdf) -> bytes:
    topo = host.topology
    fn = topo[bdf]
    pcie = fn.kind in PORT_TYPE_OF
    data = bytearray(4096 if pcie else 256)
    vendor, device = (int(x, 16) for x in fn.ids.split(":"))
    if fn.physfn is not None:
        vendor = device = 0xFFFF  # VFs read all ones here; sysfs's vendor file tells the truth
    data[0:4] = _u16(vendor) + _u16(device)
    data[6:8] = _u16(0x10)  # capability list present
    data[8:12] = _u32(fn.class_code << 8 | 0x01)
    bridge = fn.kind.is_bridge
    data[0x0E] = (1 if bridge else 0) | (0x80 if topo.is_multifunction(bdf) else 0)
    if bridge:
        data[0x18] = bdf.bus
        data[0x19] = topo.secondary_bus(bdf) or 0
        data[0x1A] = max((c.bus for c in topo.subtree(bdf)), default=0)
    data[0x34] = 0x40
    data[0x3D] = 1 if fn.intx is not None else 0  # INTA
    pm_no_soft_reset = 0 if "pm" in fn.reset_methods else 0x8
    data[0x40:0x48] = bytes([0x01, 0x50 if pcie else 0, 0x03, 0x00]) + _u16(pm_no_soft_reset) + bytes(2)
    if pcie:
        flags = 0x2 | PORT_TYPE_OF[fn.kind] << 4
        devcap = (1 << 28 if "flr" in fn.reset_methods else 0) | fn.phantom_functions << 3
        devctl = 1 << 9 if fn.phantom_functions else 0
        data[0x50:0x5C] = bytes([0x10, 0x00]) + _u16(flags) + _u32(devcap) + _u16(devctl) + bytes(2)
        _extended(data, host, bdf)
    return bytes(data)


def _extended(data: bytearray, host: Host, bdf: Bdf) -> None:
    fn = host.topology[bdf]
    caps: list[tuple[int, bytes]] = [(0x0003, struct.pack("<Q", DSN_SERIAL))]
    if fn.acs is not None:
        caps.append((0x000D, _u16(int(fn.acs.capability)) + _u16(int(fn.acs.control))))
    if fn.ats:
        caps.append((0x000F, bytes(4)))
    vfs = host.topology.virtual_functions(bdf)
    if vfs:
        offset = vfs[0].rid - bdf.rid
        stride = vfs[1].rid - vfs[0].rid if len(vfs) > 1 else 1
        body = bytearray(0x40 - 4)
        body[0x0E - 4 : 0x10 - 4] = _u16(len(vfs))  # TotalVFs
        body[0x10 - 4 : 0x12 - 4] = _u16(len(vfs))  # NumVFs
        body[0x14 - 4 : 0x18 - 4] = _u16(offset) + _u16(stride)
        body[0x1A - 4 : 0x1C - 4] = _u16(int(host.topology[vfs[0]].ids.split(":")[1], 16))
        caps.append((0x0010, bytes(body)))
    at = 0x100
    for i, (cap_id, body) in enumerate(caps):
        nxt = at + 4 + len(body) + (-(4 + len(body)) % 8) if i + 1 < len(caps) else 0
        data[at : at + 4] = _u32(cap_id | 1 << 16 | nxt << 20)
        data[at + 4 : at + 4 + len(body)] = body
        at = nxt


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link)


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text + "\n")


def device_dirs(root: Path, topology: Topology) -> dict[Bdf, Path]:
    dirs: dict[Bdf, Path] = {}
    for bdf in sorted(topology, key=lambda b: len(topology.path_to_root(b))):
        fn = topology[bdf]
        if fn.parent is None:
            dirs[bdf] = root / "sys/devices" / f"pci{bdf.segment:04x}:{bdf.bus:02x}" / str(bdf)
        else:
            dirs[bdf] = dirs[fn.parent] / str(bdf)
    return dirs


def render(host: Host, root: Path, kernel: Kernel | None = None) -> Path:
    kernel = kernel or Kernel()
    topo = host.topology
    dirs = device_dirs(root, topo)
    translating = [u for u in host.iommus if u.dma_remapping is Feature.ENABLED]
    groups = kernel.groups if kernel.groups is not None else tuple(g.members for g in host.derived_groups)
    group_of = {b: n for n, members in enumerate(groups) for b in members} if translating else {}
    external = {b for b in topo if topo.is_behind_external_port(b) and not topo[b].external}
    for bdf, path in dirs.items():
        fn = topo[bdf]
        vendor, device = fn.ids.split(":")
        config = config_space(host, bdf)
        _write(path / "config", config[:64] if kernel.header_only else config)
        _write(path / "vendor", f"0x{vendor}")
        _write(path / "device", f"0x{device}")
        _write(path / "class", f"0x{fn.class_code:06x}")
        _write(path / "driver_override", "(null)")
        _write(path / "irq", str(fn.intx or 0))  # lspci needs irq and resource to list a device
        unused = "0x0000000000000000 0x0000000000000000 0x0000000000000000"
        bars = [f"0x{b.start:016x} 0x{b.end:016x} 0x{IORESOURCE_MEM:016x}" for b in fn.bars]
        _write(path / "resource", "\n".join([*bars, *[unused] * (13 - len(bars))]))
        _write(path / "removable", "removable" if bdf in external else "fixed")
        if fn.reset_methods:
            _write(path / "reset_method", " ".join(fn.reset_methods))
        if bdf in kernel.boot_vga:
            _write(path / "boot_vga", "1")
        if fn.driver:
            drivers = root / "sys/bus/pci/drivers" / fn.driver
            drivers.mkdir(parents=True, exist_ok=True)
            _link(path / "driver", drivers)
        if fn.physfn is not None:
            _link(path / "physfn", dirs[fn.physfn])
            index = topo.virtual_functions(fn.physfn).index(bdf)
            _link(dirs[fn.physfn] / f"virtfn{index}", path)
        unit = host.iommu_of(bdf)
        if unit is not None and unit in translating:
            unit_dir = root / "sys/devices/virtual/iommu" / unit.name
            _link(path / "iommu", unit_dir)
            _link(unit_dir / "devices" / str(bdf), path)
        if bdf in group_of:
            _link(path / "iommu_group", root / "sys/kernel/iommu_groups" / str(group_of[bdf]))
        _link(root / "sys/bus/pci/devices" / str(bdf), path)
    for number, members in enumerate(groups if translating else ()):
        group_dir = root / "sys/kernel/iommu_groups" / str(number)
        for bdf in members:
            _link(group_dir / "devices" / str(bdf), dirs[bdf])
        _write(group_dir / "type", kernel.domain)
        regions = ["0x00000000fee00000 0x00000000feefffff msi"]
        for r in dict.fromkeys(r for b in members for r in topo[b].reserved_regions):
            regions.append(f"0x{r.start:016x} 0x{r.end:016x} direct")
        _write(group_dir / "reserved_regions", "\n".join(regions))
    for unit in translating:
        unit_dir = root / "sys/devices/virtual/iommu" / unit.name
        if host.arch is Arch.X86:
            ecap = 0xF0205E if unit.interrupt_remapping is not Feature.ABSENT else 0xF02056
            _write(unit_dir / "intel-iommu/ecap", f"{ecap:x}")
            _write(unit_dir / "intel-iommu/cap", "d2008c40660462")
        _link(root / "sys/class/iommu" / unit.name, unit_dir)
    if host.arch is Arch.X86 and host.iommus:
        dmar = dmar_table(host, kernel)
        _write(root / "sys/firmware/acpi/tables/DMAR", dmar)
        os.chmod(root / "sys/firmware/acpi/tables/DMAR", kernel.dmar_mode)
    _write(root / "proc/interrupts", interrupts(host, kernel.interrupts_remapped))
    _write(root / "proc/cmdline", kernel.cmdline)
    _write(root / "proc/sys/kernel/osrelease", kernel.release)
    _write(root / "proc/sys/kernel/arch", "aarch64" if host.arch is Arch.ARM else "x86_64")
    _write(root / "proc/sys/kernel/hostname", host.name)
    for name, value in kernel.module_parameters.items():
        module, parameter = name.split("/")
        _write(root / "sys/module" / module / "parameters" / parameter, value)
    if kernel.thunderbolt is not None:
        domain = root / "sys/devices/pci0000:00/domain0"
        for attribute, value in kernel.thunderbolt.items():
            _write(domain / attribute, value)
        _link(root / "sys/bus/thunderbolt/devices/domain0", domain)
    if kernel.root_disk is not None:
        disk = dirs[kernel.root_disk] / "nvme/nvme0/nvme0n1"
        disk.mkdir(parents=True, exist_ok=True)
        _link(root / "sys/dev/block/259:2", disk / "nvme0n1p2")
        _write(
            root / "proc/self/mountinfo",
            "27 1 259:2 / / rw,relatime - ext4 /dev/nvme0n1p2 rw\n22 27 0:21 / /proc rw - proc proc rw",
        )
    return root


def interrupts(host: Host, remapped: bool | None = None) -> str:
    if remapped is None:
        remapped = any(u.interrupt_remapping is Feature.ENABLED for u in host.iommus)
    if host.arch is Arch.ARM:
        arm_msi = any(u.msi_controller and u.msi_controller.value == "gicv3-its" for u in host.iommus)
        chip = "ITS-MSI" if arm_msi else "GICv2m-MSI"
    else:
        chip = "IR-PCI-MSIX" if remapped else "PCI-MSIX"
    io_apic = "IR-IO-APIC" if remapped and host.arch is Arch.X86 else "IO-APIC"
    return "\n".join(
        [
            "            CPU0       CPU1",
            f"   1:          0          9  {io_apic}    1-edge      i8042",
            f" 120:       1042          0  {chip}-0000:01:00.0    0-edge      nvme0q0",
        ]
    )


def _scope_path(topo: Topology, bdf: Bdf) -> tuple[int, bytes]:
    chain = [*reversed(topo.path_to_root(bdf)), topo[bdf]]
    start_bus = chain[0].bdf.bus
    return start_bus, b"".join(bytes([f.bdf.device, f.bdf.function]) for f in chain)


def _scope(topo: Topology, bdf: Bdf) -> bytes:
    start_bus, path = _scope_path(topo, bdf)
    kind = 2 if topo[bdf].kind.is_bridge else 1
    return bytes([kind, 6 + len(path), 0, 0, 0, start_bus]) + path


def dmar_table(host: Host, kernel: Kernel) -> bytes:
    topo = host.topology
    flags = kernel.dmar_flags
    if flags is None:
        flags = 1 if any(u.interrupt_remapping is not Feature.ABSENT for u in host.iommus) else 0
    body = b""
    for i, unit in enumerate(sorted(host.iommus, key=lambda u: u.scope is None)):  # INCLUDE_ALL last
        scopes = b"".join(_scope(topo, b) for b in unit.scope or ())
        body += _u16(0) + _u16(16 + len(scopes)) + bytes([1 if unit.scope is None else 0, 0])
        body += _u16(0) + struct.pack("<Q", 0xFED90000 + 0x1000 * i) + scopes
    regions: dict[tuple[int, int], list[Bdf]] = {}
    for bdf, fn in topo.items():
        for r in fn.reserved_regions:
            regions.setdefault((r.start, r.end), []).append(bdf)
    for (start, end), owners in regions.items():
        scopes = b"".join(_scope(topo, b) for b in owners)
        body += _u16(1) + _u16(24 + len(scopes)) + _u16(0) + _u16(0) + struct.pack("<QQ", start, end) + scopes
    length = 48 + len(body)
    header = bytearray(b"DMAR" + _u32(length) + bytes([1, 0]) + b"PCIGRD" + b"FAKESYS " + _u32(1))
    header += b"PCGD" + _u32(1) + bytes([38, flags]) + bytes(10)
    table = bytearray(header + body)
    table[9] = (-sum(table)) % 256
    return bytes(table)
