"""A user-space DMA probe for QEMU's ``edu`` device: does a DMA the device makes into a
chosen page of host memory land, or does the IOMMU block it?

The probe needs no driver: it enables bus mastering through the device's ``config``
file, drives the DMA engine through ``resource0``, and finds the physical address of a
locked page of its own through ``/proc/self/pagemap``. The device first reads a random
pattern from one page into its buffer, then writes its buffer to a second, zeroed page.
The verdict rests on evidence, not on log text: whether the pattern arrived in the
second page, and how many DMAR fault interrupts ``/proc/interrupts`` counted meanwhile.

Run as root inside the lab guest: ``python3 edu_probe.py 0000:01:00.0``.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

EDU_IDS = ("0x1234", "0x11e8")
EDU_IDENT = 0x010000ED
REG_IDENT, REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x00, 0x80, 0x88, 0x90, 0x98
DMA_RUN, DMA_DEVICE_TO_RAM = 0x1, 0x2  # direction bit clear: RAM to the device buffer
DEVICE_BUFFER = 0x40000  # the edu's 4 KiB DMA buffer, in the device's own address space
PAGE = 4096
PATTERN_BYTES = 256
MAP_LOCKED = 0x2000  # x86; not exported by the mmap module
COMMAND_MEMORY, COMMAND_BUS_MASTER = 0x2, 0x4
SYSFS_DEVICES = Path("/sys/bus/pci/devices")


@dataclass(frozen=True)
class Probe:
    bdf: str
    verdict: str  # LANDED, BLOCKED or INCONCLUSIVE
    target: int  # physical address of the page the device was told to write
    bytes_arrived: int  # how many of the pattern's bytes arrived there
    dmar_faults: int  # DMAR fault interrupts counted during the probe
    why: str


class ProbeError(Exception):
    """The probe could not run (wrong device, not root, ...)."""


def dmar_fault_interrupts(interrupts: str | None = None) -> int:
    """Sum over CPUs of the DMAR fault interrupt lines of /proc/interrupts."""
    text = Path("/proc/interrupts").read_text() if interrupts is None else interrupts
    lines = text.splitlines()
    cpus = len(lines[0].split()) if lines else 0
    total = 0
    for line in lines[1:]:
        if "DMAR" in line:
            total += sum(int(n) for n in line.split()[1 : 1 + cpus] if n.isdigit())
    return total


def physical_address(virtual: int) -> int:
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(virtual // PAGE * 8)
        (entry,) = struct.unpack("<Q", pagemap.read(8))
    pfn = entry & ((1 << 55) - 1)
    if not entry >> 63 or pfn == 0:
        raise ProbeError("pagemap gave no physical address (not present, or not root)")
    return pfn * PAGE + virtual % PAGE


def enable_bus_mastering(device: Path) -> None:
    # The kernel lets user space enable only a device no driver holds (vfio-pci enables
    # its devices when opened); the command register below is what DMA needs.
    if not (device / "driver").exists() and (device / "enable").read_text().strip() == "0":
        (device / "enable").write_text("1")
    with open(device / "config", "r+b", buffering=0) as config:
        config.seek(4)
        command = int.from_bytes(config.read(2), "little")
        config.seek(4)
        config.write((command | COMMAND_MEMORY | COMMAND_BUS_MASTER).to_bytes(2, "little"))


class Registers:
    """A device's BAR 0 registers, through 32-bit accesses only (edu ignores others)."""

    def __init__(self, resource: Path) -> None:
        fd = os.open(resource, os.O_RDWR | os.O_SYNC)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._regs = memoryview(self._map).cast("I")

    @classmethod
    def of(cls, bdf: str, ids: tuple[str, str], what: str) -> Self:
        """The registers of ``bdf``, which must have ``ids``, with bus mastering on."""
        device = SYSFS_DEVICES / bdf
        found = ((device / "vendor").read_text().strip(), (device / "device").read_text().strip())
        if found != ids:
            raise ProbeError(f"{bdf} is {found[0]}:{found[1]}, not {what}")
        enable_bus_mastering(device)
        return cls(device / "resource0")

    def read(self, offset: int) -> int:
        return int(self._regs[offset // 4])

    def write(self, offset: int, value: int) -> None:
        self._regs[offset // 4] = value

    def close(self) -> None:
        self._regs.release()
        self._map.close()


class Edu(Registers):
    def dma(self, src: int, dst: int, count: int, cmd: int, timeout: float = 5.0) -> bool:
        """Run one DMA; False if the engine did not finish in time."""
        for offset, value in ((REG_DMA_SRC, src), (REG_DMA_DST, dst), (REG_DMA_COUNT, count)):
            if value >= 1 << 32:
                raise ProbeError(f"address {value:#x} needs more than 32 bits")
            self.write(offset, value)
        self.write(REG_DMA_CMD, cmd | DMA_RUN)
        deadline = time.monotonic() + timeout
        while self.read(REG_DMA_CMD) & DMA_RUN:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def faults_since(before: int, arrived: Callable[[], bool], timeout: float = 3.0) -> int:
    """DMAR fault interrupts counted since ``before``, once the outcome is in: the data
    ``arrived()``, or a fault was counted (then a moment more, for the faults of the
    same DMA), or ``timeout`` passed. A loaded host may be slow to run the handler."""
    deadline = time.monotonic() + timeout
    while not arrived() and dmar_fault_interrupts() == before and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    return dmar_fault_interrupts() - before


def copy(
    bdf: str,
    source: int,
    target: int,
    count: int = PATTERN_BYTES,
    arrived: Callable[[], bool] = lambda: False,
) -> tuple[bool, int]:
    """Have the device copy ``count`` bytes from ``source`` to ``target`` (addresses as
    the device sees them: physical, or IOVAs of a VFIO user) through its buffer.
    Returns whether the engine finished, and the DMAR fault interrupts meanwhile
    (``arrived`` tells early when the data is there)."""
    edu = Edu.of(bdf, EDU_IDS, "an edu device")
    try:
        if edu.read(REG_IDENT) != EDU_IDENT:
            raise ProbeError(f"{bdf}: identification register reads {edu.read(REG_IDENT):#x}")
        before = dmar_fault_interrupts()
        finished = edu.dma(source, DEVICE_BUFFER, count, 0) and edu.dma(
            DEVICE_BUFFER, target, count, DMA_DEVICE_TO_RAM
        )
        return finished, faults_since(before, arrived)
    finally:
        edu.close()


def verdict(finished: bool, written: bytes, pattern: bytes, faults: int) -> tuple[str, str]:
    arrived = sum(a == b for a, b in zip(written, pattern, strict=True))
    if not finished:
        return "INCONCLUSIVE", "the DMA engine did not finish"
    if written == pattern and faults == 0:
        return "LANDED", "the pattern arrived and the IOMMU reported no fault"
    if written == bytes(len(pattern)) and faults > 0:
        return "BLOCKED", "nothing arrived and the IOMMU reported DMA faults"
    return "INCONCLUSIVE", f"{arrived} of {len(pattern)} bytes arrived with {faults} DMAR faults"


@contextmanager
def own_pages(count: int) -> Iterator[tuple[mmap.mmap, list[int]]]:
    """``count`` zeroed pages of this process, locked in memory, with their physical addresses."""
    pages = mmap.mmap(
        -1, count * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE | MAP_LOCKED
    )
    try:
        anchor = ctypes.c_char.from_buffer(pages)
        addresses = [physical_address(ctypes.addressof(anchor) + n * PAGE) for n in range(count)]
        del anchor
        yield pages, addresses
    finally:
        pages.close()


def probe(bdf: str) -> Probe:
    """Does a DMA from ``bdf`` into a page of host memory land?"""
    with own_pages(2) as (pages, (source, target)):
        pattern = os.urandom(PATTERN_BYTES)
        pages[:PATTERN_BYTES] = pattern
        finished, faults = copy(
            bdf, source, target, arrived=lambda: pages[PAGE : PAGE + PATTERN_BYTES] == pattern
        )
        written = pages[PAGE : PAGE + PATTERN_BYTES]
    outcome, why = verdict(finished, written, pattern, faults)
    arrived = sum(a == b for a, b in zip(written, pattern, strict=True))
    return Probe(bdf, outcome, target, arrived, faults, why)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", argv[0]):
        print("usage: edu_probe.py DOMAIN:BUS:DEVICE.FUNCTION", file=sys.stderr)
        return 2
    try:
        result = probe(argv[0])
    except (ProbeError, OSError) as exc:
        print(f"edu_probe: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)))
    return 0 if result.verdict != "INCONCLUSIVE" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
