"""The edu DMA probe in a Xen PV dom0: the same copy as ``edu_probe``, aimed at machine
addresses, with faults counted from Xen's console.

A PV dom0's ``/proc/self/pagemap`` gives pseudo-physical frames; the device sees
machine frames. The machine frame of a page is found in Xen's machine-to-phys table
(``xc_map_m2p`` of libxenguest, over privcmd): the entry whose value is the page's
pseudo-physical frame. dom0 gets no DMAR fault interrupt (Xen owns the IOMMU), so
faults are the ``[VT-D]DMAR:[DMA ...] Request device [BDF]`` lines Xen writes.

A third verdict beside LANDED and BLOCKED: CONTAINED, when the engine finished,
nothing arrived and Xen reported no fault (``iommu=quarantine=scratch-page``: the DMA
went to the device's scratch page).
"""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import re
import subprocess
import time

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

_FAULT = re.compile(r"DMAR:\[DMA (?:Read|Write)\] Request device \[([0-9a-f:.]+)\]")


def xen_faults(bdf: str) -> int:
    """Xen's DMA fault lines for ``bdf`` in its console ring."""
    ring = subprocess.run(["xl", "dmesg"], capture_output=True, text=True, timeout=60).stdout
    return sum(found.group(1) == bdf for found in _FAULT.finditer(ring))


def machine_frames(pfns: list[int]) -> list[int]:
    """The machine frames of this domain's pseudo-physical frames ``pfns``."""
    libs = os.environ.get("LD_LIBRARY_PATH", "").split(":")[0]
    ctrl = ctypes.CDLL(os.path.join(libs, "libxenctrl.so.4.17"))
    guest = ctypes.CDLL(os.path.join(libs, "libxenguest.so.4.17"))
    ctrl.xc_interface_open.restype = ctypes.c_void_p
    ctrl.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    ctrl.xc_maximum_ram_page.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
    guest.xc_map_m2p.restype = ctypes.c_void_p
    guest.xc_map_m2p.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_void_p]
    handle = ctrl.xc_interface_open(None, None, 0)
    if not handle:
        raise ProbeError("xc_interface_open failed (is this dom0, with privcmd?)")
    max_mfn = ctypes.c_ulong()
    if ctrl.xc_maximum_ram_page(handle, ctypes.byref(max_mfn)) != 0:
        raise ProbeError("xc_maximum_ram_page failed")
    table = guest.xc_map_m2p(handle, max_mfn.value, mmap.PROT_READ, None)
    if not table:
        raise ProbeError("xc_map_m2p failed")
    entries = array.array("Q", ctypes.string_at(table, (max_mfn.value + 1) * 8))
    found = []
    for pfn in pfns:
        try:
            found.append(entries.index(pfn))
        except ValueError:
            raise ProbeError(f"no machine frame holds pseudo-physical frame {pfn:#x}") from None
    return found


def probe(bdf: str) -> Probe:
    """Does a DMA from ``bdf`` into a page of dom0's memory land?"""
    with own_pages(2) as (pages, physical):
        source, target = (mfn * PAGE for mfn in machine_frames([p // PAGE for p in physical]))
        pattern = os.urandom(PATTERN_BYTES).replace(b"\x00", b"\x5a")  # no zero byte: see lab notes
        pages[:PATTERN_BYTES] = pattern
        edu = Edu.of(bdf, EDU_IDS, "an edu device")
        try:
            if edu.read(REG_IDENT) != EDU_IDENT:
                raise ProbeError(f"{bdf}: identification register reads {edu.read(REG_IDENT):#x}")
            before = xen_faults(bdf)
            finished = edu.dma(source, DEVICE_BUFFER, PATTERN_BYTES, 0) and edu.dma(
                DEVICE_BUFFER, target, PATTERN_BYTES, DMA_DEVICE_TO_RAM
            )
            time.sleep(0.2)
            faults = xen_faults(bdf) - before
        finally:
            edu.close()
        written = pages[PAGE : PAGE + PATTERN_BYTES]
    outcome, why = verdict(finished, written, pattern, faults)
    if finished and written == bytes(PATTERN_BYTES) and faults == 0:
        outcome, why = "CONTAINED", "nothing arrived and Xen reported no fault: the DMA went elsewhere"
    arrived = sum(a == b for a, b in zip(written, pattern, strict=True))
    return Probe(bdf, outcome, target, arrived, faults, why)
