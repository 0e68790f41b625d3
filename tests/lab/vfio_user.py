"""A minimal VFIO user, as a VM's process would be: it opens the VFIO container and the
device's group node, attaches the group to an IOMMU domain of its own (type 1) and maps
one page of its memory at ``IOVA``. Then, on standard input: ``fill`` puts a random
pattern in the page's first half and prints it (hex); ``show`` prints the second half;
end of input ends it. On failure it prints ``error ...`` and exits 1.

    python3 -m lab.vfio_user GROUP
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import sys

IOVA = 0x1000000  # where the VM's page appears to the device
UNMAPPED_IOVA = 0x2000000  # mapped for nobody
PAGE = 4096
HALF = PAGE // 2
VFIO_API_VERSION = 0
VFIO_TYPE1V2_IOMMU = 3
GROUP_VIABLE = 0x1


def _io(number: int) -> int:
    return (ord(";") << 8) | (100 + number)  # _IO(VFIO_TYPE, VFIO_BASE + number)


GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU = _io(0), _io(1), _io(2)
GROUP_GET_STATUS, GROUP_SET_CONTAINER, IOMMU_MAP_DMA = _io(3), _io(4), _io(13)
MAP_READ, MAP_WRITE = 0x1, 0x2


def attach(group: str) -> mmap.mmap:
    container = os.open("/dev/vfio/vfio", os.O_RDWR)
    if fcntl.ioctl(container, GET_API_VERSION) != VFIO_API_VERSION:
        raise OSError("unknown VFIO API version")
    if not fcntl.ioctl(container, CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU):
        raise OSError("no type 1 v2 IOMMU")
    node = os.open(f"/dev/vfio/{group}", os.O_RDWR)  # refused unless the group was handed to us
    status = bytearray(struct.pack("<II", 8, 0))
    fcntl.ioctl(node, GROUP_GET_STATUS, status)
    if not struct.unpack("<II", status)[1] & GROUP_VIABLE:
        raise OSError(f"group {group} is not viable: a member is bound to a host driver")
    fcntl.ioctl(node, GROUP_SET_CONTAINER, bytearray(struct.pack("<i", container)))
    fcntl.ioctl(container, SET_IOMMU, VFIO_TYPE1V2_IOMMU)  # the group now has our domain
    page = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    vaddr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    mapping = bytearray(struct.pack("<IIQQQ", 32, MAP_READ | MAP_WRITE, vaddr, IOVA, PAGE))
    fcntl.ioctl(container, IOMMU_MAP_DMA, mapping)
    return page


def main(group: str) -> int:
    try:
        page = attach(group)
    except OSError as exc:
        print(f"error {exc}", flush=True)
        return 1
    print(f"ready {IOVA:#x}", flush=True)
    for line in sys.stdin:
        if line.strip() == "fill":
            pattern = os.urandom(HALF)
            page[:HALF] = pattern
            print(pattern.hex(), flush=True)
        elif line.strip() == "show":
            print(page[HALF:].hex(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
