"""The edu DMA probe in a Xen PV dom0: the same copy as ``edu_probe``, aimed at machine
addresses, with faults counted from Xen's console.

A PV dom0's ``/proc/self/pagemap`` gives pseudo-physical frames; the device sees
machine frames. The machine frame of a page is found in Xen's machine-to-phys table
(``xc_map_m2p`` of libxenguest, over privcmd): an entry whose value is the page's
pseudo-physical frame and whose frame is dom0's (each domain numbers its frames from
0). dom0 gets no DMAR fault interrupt (Xen owns the IOMMU), so faults are the
``[VT-D]DMAR:[DMA ...] Request device [BDF]`` lines Xen writes.

A third verdict beside LANDED and BLOCKED: CONTAINED, when the engine finished,
nothing arrived and Xen reported no fault (``iommu=quarantine=scratch-page``: the DMA
went to the device's scratch page).

Towards a PV domU the device is told a machine address of a page of that domain: its
console ring, whose machine frame the toolstack wrote in xenstore (``console/ring-ref``),
mapped here with ``xc_map_foreign_range``. A PV domain's IOMMU context maps each of
its pages writable by the CPU at the page's own machine address (Xen keeps it so as
page types change), so the domain's page is where its device can write.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lab.edu_probe import (
    DEVICE_BUFFER,
    DMA_DEVICE_TO_RAM,
    EDU_IDENT,
    EDU_IDS,
    PAGE,
    PATTERN_BYTES,
    REG_IDENT,
    Edu,
    Probe,
    ProbeError,
    own_pages,
    verdict,
)

DOMID_SELF = 0x7FF0  # Xen refuses a domain's own id as the "foreign" owner of a mapping
_FAULT = re.compile(r"DMAR:\[DMA (?:Read|Write)\] Request device \[([0-9a-f:.]+)\]")


def xen_faults(bdf: str) -> int:
    """Xen's DMA fault lines for ``bdf`` in its console ring."""
    ring = subprocess.run(["xl", "dmesg"], capture_output=True, text=True, timeout=60).stdout
    return sum(found.group(1) == bdf for found in _FAULT.finditer(ring))


def _library(name: str) -> ctypes.CDLL:
    """One of the Xen libraries of the lab's kit (on LD_LIBRARY_PATH in dom0)."""
    return ctypes.CDLL(os.path.join(os.environ.get("LD_LIBRARY_PATH", "").split(":")[0], name))


def _xc() -> tuple[ctypes.CDLL, int]:
    """libxenctrl and an open handle on it."""
    ctrl = _library("libxenctrl.so.4.17")
    ctrl.xc_interface_open.restype = ctypes.c_void_p
    ctrl.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    handle = ctrl.xc_interface_open(None, None, 0)
    if not handle:
        raise ProbeError("xc_interface_open failed (is this dom0, with privcmd?)")
    return ctrl, handle


def m2p_entries() -> array.array[int]:
    """Xen's machine-to-phys table: for each machine frame, its owner's pseudo-physical
    frame (``xc_map_m2p`` of libxenguest)."""
    ctrl, handle = _xc()
    guest = _library("libxenguest.so.4.17")
    ctrl.xc_maximum_ram_page.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
    guest.xc_map_m2p.restype = ctypes.c_void_p
    guest.xc_map_m2p.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_void_p]
    max_mfn = ctypes.c_ulong()
    if ctrl.xc_maximum_ram_page(handle, ctypes.byref(max_mfn)) != 0:
        raise ProbeError("xc_maximum_ram_page failed")
    table = guest.xc_map_m2p(handle, max_mfn.value, mmap.PROT_READ, None)
    if not table:
        raise ProbeError("xc_map_m2p failed")
    return array.array("Q", ctypes.string_at(table, (max_mfn.value + 1) * 8))


@contextmanager
def foreign_page(domid: int, mfn: int) -> Iterator[Any]:
    """Machine frame ``mfn`` of domain ``domid`` mapped here, writable (a ctypes array
    of its bytes); None when that domain does not own the frame."""
    ctrl, handle = _xc()
    ctrl.xc_map_foreign_range.restype = ctypes.c_void_p
    ctrl.xc_map_foreign_range.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_int, ctypes.c_ulong,
    ]  # fmt: skip
    mapped = ctrl.xc_map_foreign_range(handle, domid, PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mfn)
    try:
        yield (ctypes.c_char * PAGE).from_address(mapped) if mapped else None
    finally:
        if mapped:
            ctypes.CDLL(None).munmap(ctypes.c_void_p(mapped), ctypes.c_size_t(PAGE))


def machine_frame(entries: array.array[int], page: mmap.mmap, offset: int, pfn: int) -> int:
    """The machine frame of dom0's pseudo-physical frame ``pfn``, whose bytes are
    ``page[offset:]``. Every domain numbers its frames from 0, so several machine
    frames carry ``pfn`` in the table: the one is dom0's and shows a marker written
    into the page."""
    marker = os.urandom(32)
    page[offset : offset + 32] = marker
    try:
        start = 0
        while True:
            try:
                mfn = entries.index(pfn, start)
            except ValueError:
                raise ProbeError(f"no machine frame of dom0 holds pseudo-physical frame {pfn:#x}") from None
            with foreign_page(DOMID_SELF, mfn) as seen:
                if seen is not None and seen[:32] == marker:
                    return mfn
            start = mfn + 1
    finally:
        page[offset : offset + 32] = bytes(32)


def xenstore_read(path: str) -> str:
    store = _library("libxenstore.so.4")
    store.xs_open.restype = ctypes.c_void_p
    store.xs_open.argtypes = [ctypes.c_ulong]
    store.xs_read.restype = ctypes.c_void_p
    store.xs_read.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint),
    ]  # fmt: skip
    store.xs_close.argtypes = [ctypes.c_void_p]
    handle = store.xs_open(0)
    if not handle:
        raise ProbeError("xs_open failed (is xenstored running?)")
    try:
        length = ctypes.c_uint()
        value = store.xs_read(handle, 0, path.encode(), ctypes.byref(length))
        if not value:
            raise ProbeError(f"xenstore has no {path}")
        text = ctypes.string_at(value, length.value).decode()
        ctypes.CDLL(None).free(ctypes.c_void_p(value))
        return text
    finally:
        store.xs_close(handle)


@dataclass(frozen=True)
class Spot:
    """Where the probe reads or writes (``page[offset:]``) and the machine address the
    device is told for the same bytes."""

    page: Any  # an mmap, or a ctypes array over a foreign mapping: both slice to bytes
    offset: int
    address: int


@contextmanager
def dom0_pages() -> Iterator[tuple[Spot, Spot]]:
    """Two locked pages of dom0's (this process's) memory."""
    with own_pages(2) as (pages, physical):
        entries = m2p_entries()
        first, second = (
            machine_frame(entries, pages, n * PAGE, address // PAGE) for n, address in enumerate(physical)
        )
        yield Spot(pages, 0, first * PAGE), Spot(pages, PAGE, second * PAGE)


@contextmanager
def domain_page(domain: str) -> Iterator[tuple[Spot, Spot]]:
    """The two halves of a page of PV domain ``domain`` (its console ring), mapped here
    writable."""
    listed = subprocess.run(["xl", "domid", domain], capture_output=True, text=True, timeout=60)
    if listed.returncode != 0:
        raise ProbeError(f"xl domid {domain}: {listed.stderr.strip()}")
    domid = int(listed.stdout)
    mfn = int(xenstore_read(f"/local/domain/{domid}/console/ring-ref"))
    with foreign_page(domid, mfn) as page:
        if page is None:
            raise ProbeError(f"cannot map machine frame {mfn:#x} of {domain}")
        page[:] = bytes(PAGE)
        half = PAGE // 2
        yield Spot(page, 0, mfn * PAGE), Spot(page, half, mfn * PAGE + half)


def copy(bdf: str, source: Spot, target: Spot) -> Probe:
    """The device copies a pattern from ``source`` to ``target``: where did it go?"""
    pattern = os.urandom(PATTERN_BYTES).replace(b"\x00", b"\x5a")  # no zero byte: see lab notes
    source.page[source.offset : source.offset + PATTERN_BYTES] = pattern
    edu = Edu.of(bdf, EDU_IDS, "an edu device")
    try:
        if edu.read(REG_IDENT) != EDU_IDENT:
            raise ProbeError(f"{bdf}: identification register reads {edu.read(REG_IDENT):#x}")
        before = xen_faults(bdf)
        finished = edu.dma(source.address, DEVICE_BUFFER, PATTERN_BYTES, 0) and edu.dma(
            DEVICE_BUFFER, target.address, PATTERN_BYTES, DMA_DEVICE_TO_RAM
        )
        time.sleep(0.2)
        faults = xen_faults(bdf) - before
    finally:
        edu.close()
    written = bytes(target.page[target.offset : target.offset + PATTERN_BYTES])
    outcome, why = verdict(finished, written, pattern, faults)
    if finished and written == bytes(PATTERN_BYTES) and faults == 0:
        outcome, why = "CONTAINED", "nothing arrived and Xen reported no fault: the DMA went elsewhere"
    arrived = sum(a == b for a, b in zip(written, pattern, strict=True))
    return Probe(bdf, outcome, target.address, arrived, faults, why)


def probe(bdf: str, domain: str | None = None, towards: str = "dom0") -> Probe:
    """Does a DMA from ``bdf`` land? Without ``domain``: from one page of dom0's memory
    into another. With a PV ``domain``: read from a page of that domain, written to the
    same page (``towards="domain"``) or into dom0's memory (``towards="dom0"``)."""
    if domain is None:
        with dom0_pages() as (source, target):
            return copy(bdf, source, target)
    with domain_page(domain) as (source, inside):
        if towards == "domain":
            return copy(bdf, source, inside)
        with dom0_pages() as (_, target):
            return copy(bdf, source, target)
