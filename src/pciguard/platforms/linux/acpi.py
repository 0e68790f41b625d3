"""The ACPI tables that describe IOMMUs: Intel's DMAR and AMD's IVRS. Pure.

Layouts follow the VT-d specification (chapter 8, "BIOS Considerations") and AMD's
IOMMU specification (IVRS). Only what the audit needs is decoded; a malformed table
raises ``MalformedTable`` naming the byte offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from pciguard.model import Bdf

ACPI_HEADER = 36
DMAR_HEADER = 48
IVRS_HEADER = 48


class MalformedTable(ValueError):
    def __init__(self, table: str, offset: int, message: str) -> None:
        super().__init__(f"{table} table, byte {offset:#x}: {message}")
        self.table = table
        self.offset = offset


class DmarFlags(IntFlag):
    INTR_REMAP = 0x1
    X2APIC_OPT_OUT = 0x2
    DMA_CTRL_PLATFORM_OPT_IN = 0x4


class ScopeType(IntEnum):
    ENDPOINT = 1
    SUBHIERARCHY = 2
    IOAPIC = 3
    HPET = 4
    NAMESPACE = 5


@dataclass(frozen=True)
class DeviceScope:
    type: int
    start_bus: int
    path: tuple[tuple[int, int], ...]  # (device, function) hops from start_bus

    def resolve(self, segment: int, secondary_bus: Callable[[Bdf], int | None]) -> Bdf | None:
        """The device the path ends at; None when a bridge on the way is not present."""
        bus = self.start_bus
        bdf = None
        for i, (dev, fn) in enumerate(self.path):
            if dev > 0x1F or fn > 7:
                return None
            bdf = Bdf(segment, bus, dev, fn)
            if i + 1 < len(self.path):
                nxt = secondary_bus(bdf)
                if nxt is None:
                    return None
                bus = nxt
        return bdf


@dataclass(frozen=True)
class Drhd:
    segment: int
    address: int
    include_all: bool
    scopes: tuple[DeviceScope, ...]


@dataclass(frozen=True)
class Rmrr:
    segment: int
    base: int
    limit: int  # inclusive
    scopes: tuple[DeviceScope, ...]


@dataclass(frozen=True)
class Dmar:
    host_address_width: int
    flags: DmarFlags
    drhds: tuple[Drhd, ...]
    rmrrs: tuple[Rmrr, ...]
    checksum_ok: bool


def _u(data: bytes, at: int, size: int) -> int:
    return int.from_bytes(data[at : at + size], "little")


def _header(data: bytes, signature: bytes, minimum: int) -> int:
    name = signature.decode()
    if len(data) < minimum:
        raise MalformedTable(name, len(data), f"only {len(data)} bytes; the header alone is {minimum}")
    if data[:4] != signature:
        raise MalformedTable(name, 0, f"signature is {data[:4]!r}, not {signature!r}")
    length = _u(data, 4, 4)
    if length > len(data) or length < minimum:
        raise MalformedTable(name, 4, f"length field says {length} bytes; {len(data)} were read")
    return length


def _scopes(data: bytes, at: int, end: int) -> tuple[DeviceScope, ...]:
    scopes = []
    while at < end:
        if at + 6 > end:
            raise MalformedTable("DMAR", at, "device scope truncated")
        kind, length = data[at], data[at + 1]
        if length < 6 or at + length > end or (length - 6) % 2:
            raise MalformedTable("DMAR", at, f"device scope length {length} is invalid")
        path = tuple((data[p], data[p + 1]) for p in range(at + 6, at + length, 2))
        scopes.append(DeviceScope(kind, data[at + 5], path))
        at += length
    return tuple(scopes)


def parse_dmar(data: bytes) -> Dmar:
    length = _header(data, b"DMAR", DMAR_HEADER)
    drhds, rmrrs = [], []
    at = DMAR_HEADER
    while at < length:
        if at + 4 > length:
            raise MalformedTable("DMAR", at, "remapping structure header truncated")
        kind, size = _u(data, at, 2), _u(data, at + 2, 2)
        if size < 4 or at + size > length:
            raise MalformedTable("DMAR", at + 2, f"structure length {size} runs past the table")
        if kind == 0:
            if size < 16:
                raise MalformedTable("DMAR", at, "DRHD shorter than 16 bytes")
            drhds.append(
                Drhd(
                    segment=_u(data, at + 6, 2),
                    address=_u(data, at + 8, 8),
                    include_all=bool(data[at + 4] & 1),
                    scopes=_scopes(data, at + 16, at + size),
                )
            )
        elif kind == 1:
            if size < 24:
                raise MalformedTable("DMAR", at, "RMRR shorter than 24 bytes")
            base, limit = _u(data, at + 8, 8), _u(data, at + 16, 8)
            if limit < base:
                raise MalformedTable("DMAR", at + 16, f"RMRR limit {limit:#x} is below its base {base:#x}")
            rmrrs.append(Rmrr(_u(data, at + 6, 2), base, limit, _scopes(data, at + 24, at + size)))
        at += size
    return Dmar(
        host_address_width=data[36] + 1,
        flags=DmarFlags(data[37] & 0x7),
        drhds=tuple(drhds),
        rmrrs=tuple(rmrrs),
        checksum_ok=sum(data[:length]) % 256 == 0,
    )


IVINFO_PREBOOT_DMA_PROTECTION = 0x2  # IVinfo bit 1: the IOMMU guarded DMA before the OS


@dataclass(frozen=True)
class Ivmd:
    """An AMD unity-mapped region (the RMRR of AMD): devices it applies to, by RID range."""

    segment: int
    first: int | None  # None: every device
    last: int | None
    start: int
    end: int  # inclusive


@dataclass(frozen=True)
class Ivrs:
    ivinfo: int
    units: tuple[tuple[int, int], ...]  # (segment, requester ID of the IOMMU itself)
    unity_maps: tuple[Ivmd, ...] = field(default=())
    checksum_ok: bool = True

    @property
    def preboot_dma_protection(self) -> bool:
        return bool(self.ivinfo & IVINFO_PREBOOT_DMA_PROTECTION)


def parse_ivrs(data: bytes) -> Ivrs:
    length = _header(data, b"IVRS", IVRS_HEADER)
    units: list[tuple[int, int]] = []
    maps: list[Ivmd] = []
    at = IVRS_HEADER
    while at < length:
        if at + 4 > length:
            raise MalformedTable("IVRS", at, "block header truncated")
        kind, size = data[at], _u(data, at + 2, 2)
        if size < 4 or at + size > length:
            raise MalformedTable("IVRS", at + 2, f"block length {size} runs past the table")
        if kind in (0x10, 0x11, 0x40):
            if size < 24:
                raise MalformedTable("IVRS", at, "IVHD shorter than 24 bytes")
            units.append((_u(data, at + 16, 2), _u(data, at + 4, 2)))
        elif kind in (0x20, 0x21, 0x22):
            if size < 32:
                raise MalformedTable("IVRS", at, "IVMD shorter than 32 bytes")
            device, aux = _u(data, at + 4, 2), _u(data, at + 6, 2)
            start, span = _u(data, at + 16, 8), _u(data, at + 24, 8)
            if span == 0:
                raise MalformedTable("IVRS", at + 24, "IVMD region of length 0")
            first, last = {0x20: (None, None), 0x21: (device, device), 0x22: (device, aux)}[kind]
            maps.append(Ivmd(0, first, last, start, start + span - 1))
        at += size
    return Ivrs(_u(data, 36, 4), tuple(units), tuple(maps), sum(data[:length]) % 256 == 0)
