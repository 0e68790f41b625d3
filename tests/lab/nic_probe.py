"""A user-space DMA probe for an Intel 82574 (e1000e) NIC with no driver, or held by
vfio-pci: it gives the NIC one transmit descriptor in a page of host memory, asking
for a status write-back, and rings the doorbell. The NIC must then read the descriptor
and write its "descriptor done" bit back into that page: LANDED if the bit arrives
with no DMAR fault, BLOCKED if nothing arrives and the IOMMU counted faults.

Run as root inside the lab guest: ``python3 -m lab.nic_probe 0000:09:00.0``.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import asdict

from lab.edu_probe import (
    Probe,
    Registers,
    dmar_fault_interrupts,
    faults_since,
    own_pages,
)

NIC_IDS = ("0x8086", "0x10d3")
TCTL, TDBAL, TDBAH, TDLEN, TDH, TDT = 0x400, 0x3800, 0x3804, 0x3808, 0x3810, 0x3818
TCTL_EN, TCTL_PSP = 0x2, 0x8
CMD_EOP, CMD_IFCS, CMD_RS = 0x01, 0x02, 0x08
STATUS_DD = 0x01
RING = 8  # descriptors of 16 bytes: the ring length must be a multiple of 128 bytes
FRAME = 64


def probe(bdf: str) -> Probe:
    nic = Registers.of(bdf, NIC_IDS, "an 82574 NIC")
    try:
        with own_pages(1) as (page, (ring,)):
            frame = ring + RING * 16  # the frame to send, after the ring, in the same page
            page[RING * 16 : RING * 16 + FRAME] = b"\xff" * 6 + bytes(FRAME - 6)
            page[:16] = struct.pack("<QHBBBBH", frame, FRAME, 0, CMD_EOP | CMD_IFCS | CMD_RS, 0, 0, 0)
            before = dmar_fault_interrupts()
            for register, value in ((TDBAL, ring), (TDBAH, 0), (TDLEN, RING * 16), (TDH, 0), (TDT, 0)):
                nic.write(register, value)
            nic.write(TCTL, TCTL_EN | TCTL_PSP)
            nic.write(TDT, 1)  # one descriptor to send
            faults = faults_since(before, lambda: bool(page[12] & STATUS_DD))
            done = bool(page[12] & STATUS_DD)
            nic.write(TCTL, 0)
    finally:
        nic.close()
    if done and faults == 0:
        verdict, why = "LANDED", "the NIC read its descriptor and wrote it back; no IOMMU fault"
    elif not done and faults > 0:
        verdict, why = "BLOCKED", "the descriptor was never written back and the IOMMU reported DMA faults"
    else:
        verdict, why = (
            "INCONCLUSIVE",
            f"write-back {'seen' if done else 'not seen'} with {faults} DMAR faults",
        )
    return Probe(bdf, verdict, ring, int(done), faults, why)  # what arrives: the status byte


if __name__ == "__main__":
    print(json.dumps(asdict(probe(sys.argv[1]))))
