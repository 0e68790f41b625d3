"""PCI configuration space, decoded. Pure: bytes in, facts out, never an exception.

Malformed config space (truncated reads, capability loops, pointers into the
header) is common on real and emulated hardware; each problem becomes a note on
the result and the walk stops where the data stops making sense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pciguard.model import Acs, AcsCapability, Kind

HEADER_SIZE = 0x40  # what an unprivileged reader of sysfs config gets
CONVENTIONAL_SIZE = 0x100
EXTENDED_START = 0x100

CAP_PM = 0x01
CAP_MSI = 0x05
CAP_MSIX = 0x11
CAP_EXP = 0x10
CAP_AF = 0x13
EXT_DSN = 0x0003
EXT_ACS = 0x000D
EXT_ATS = 0x000F
EXT_SRIOV = 0x0010

# Linux's PCI_FIND_CAP_TTL: no sane list has more entries.
_STD_TTL = 48
_EXT_TTL = (4096 - EXTENDED_START) // 8

PORT_KINDS = {
    0x0: Kind.ENDPOINT,
    0x1: Kind.ENDPOINT,  # legacy endpoint
    0x4: Kind.ROOT_PORT,
    0x5: Kind.SWITCH_UPSTREAM,
    0x6: Kind.SWITCH_DOWNSTREAM,
    0x7: Kind.PCIE_TO_PCI_BRIDGE,
    0x8: Kind.PCIE_TO_PCI_BRIDGE,  # PCI/PCI-X to PCIe bridge: aliases like one
    0x9: Kind.RC_ENDPOINT,
    0xA: Kind.RC_ENDPOINT,  # root complex event collector
}
PORT_TYPE_OF = {
    Kind.ENDPOINT: 0x0,
    Kind.ROOT_PORT: 0x4,
    Kind.SWITCH_UPSTREAM: 0x5,
    Kind.SWITCH_DOWNSTREAM: 0x6,
    Kind.PCIE_TO_PCI_BRIDGE: 0x7,
    Kind.RC_ENDPOINT: 0x9,
}


@dataclass(frozen=True)
class Sriov:
    total_vfs: int
    num_vfs: int
    offset: int
    stride: int
    vf_device: int  # the Device ID every VF has (VFs themselves read all ones there)

    def vf_rids(self, pf_rid: int) -> list[int]:
        return [pf_rid + self.offset + i * self.stride for i in range(self.num_vfs)]


@dataclass
class ConfigSpace:
    size: int
    vendor: int = 0xFFFF
    device: int = 0xFFFF
    class_code: int = 0
    header_type: int = 0
    multifunction: bool = False
    secondary_bus: int | None = None
    interrupt_pin: int = 0  # INTA..INTD as 1..4; 0: the function raises no INTx
    capabilities: dict[int, int] = field(default_factory=dict)  # id -> offset
    extended: dict[int, int] = field(default_factory=dict)
    port_type: int | None = None
    flr: bool = False  # PCIe Function Level Reset
    af_flr: bool = False  # Advanced Features FLR (conventional devices)
    pm_reset: bool = False  # D3hot->D0 resets (No_Soft_Reset clear)
    phantom_functions: int = 0  # in use: 0 unless enabled in Device Control
    acs: AcsCapability | None = None
    ats: bool = False
    sriov: Sriov | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def header_only(self) -> bool:
        """Only the first 64 bytes: sysfs gives no more to ordinary users."""
        return self.size <= HEADER_SIZE

    @property
    def intx_only(self) -> bool:
        """It raises INTx and nothing else: a pin, and no MSI or MSI-X capability seen
        (beyond the header, which ordinary users cannot read, none is seen)."""
        return bool(self.interrupt_pin) and not (self.capabilities.keys() & {CAP_MSI, CAP_MSIX})

    @property
    def is_bridge_header(self) -> bool:
        return self.header_type == 1

    def kind(self) -> Kind | None:
        """What the capabilities say the function is; None when they cannot be seen."""
        if self.port_type is not None:
            return PORT_KINDS.get(self.port_type, Kind.ENDPOINT)
        if self.header_only:
            return None
        if self.is_bridge_header:
            return Kind.PCIE_TO_PCI_BRIDGE  # a conventional PCI-to-PCI bridge groups like one
        return Kind.PCI_ENDPOINT


def _u8(data: bytes, at: int) -> int:
    return data[at]


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "little")


def parse_config(data: bytes) -> ConfigSpace:
    cfg = ConfigSpace(size=len(data))
    if len(data) < HEADER_SIZE:
        cfg.problems.append(f"config space is {len(data)} bytes, shorter than the 64-byte header")
        return cfg
    cfg.vendor, cfg.device = _u16(data, 0), _u16(data, 2)
    cfg.class_code = _u32(data, 8) >> 8
    cfg.header_type = _u8(data, 0x0E) & 0x7F
    cfg.multifunction = bool(_u8(data, 0x0E) & 0x80)
    if cfg.is_bridge_header:
        cfg.secondary_bus = _u8(data, 0x19)
    cfg.interrupt_pin = _u8(data, 0x3D)
    if _u16(data, 6) & 0x10:  # Status: Capabilities List
        _walk_standard(data, cfg)
    if len(data) > EXTENDED_START and cfg.port_type is not None:
        _walk_extended(data, cfg)
    return cfg


def _walk_standard(data: bytes, cfg: ConfigSpace) -> None:
    if cfg.header_only:
        return  # the list lives beyond the header; not visible
    pointer = _u8(data, 0x34) & 0xFC
    seen: set[int] = set()
    for _ in range(_STD_TTL):
        if pointer == 0:
            return
        if pointer < HEADER_SIZE or pointer + 2 > len(data):
            cfg.problems.append(f"capability pointer {pointer:#x} points outside the capability area")
            return
        if pointer in seen:
            cfg.problems.append(f"capability list loops back to {pointer:#x}")
            return
        seen.add(pointer)
        cap_id = _u8(data, pointer)
        cfg.capabilities.setdefault(cap_id, pointer)
        if cap_id == CAP_EXP and pointer + 12 <= len(data):
            flags, devcap, devctl = _u16(data, pointer + 2), _u32(data, pointer + 4), _u16(data, pointer + 8)
            cfg.port_type = (flags >> 4) & 0xF
            cfg.flr = bool(devcap & (1 << 28))
            if devctl & (1 << 9):  # Phantom Functions Enable
                cfg.phantom_functions = (devcap >> 3) & 0x3
        elif cap_id == CAP_AF and pointer + 4 <= len(data):
            cfg.af_flr = (_u8(data, pointer + 3) & 0x3) == 0x3  # TP and FLR capable
        elif cap_id == CAP_PM and pointer + 6 <= len(data):
            cfg.pm_reset = not (_u16(data, pointer + 4) & 0x8)  # PMCSR No_Soft_Reset
        pointer = _u8(data, pointer + 1) & 0xFC
    cfg.problems.append("capability list does not end after 48 entries")


def _walk_extended(data: bytes, cfg: ConfigSpace) -> None:
    pointer = EXTENDED_START
    seen: set[int] = set()
    for _ in range(_EXT_TTL):
        if pointer + 4 > len(data):
            cfg.problems.append(f"extended capability at {pointer:#x} runs past the {len(data)} bytes read")
            return
        header = _u32(data, pointer)
        if header in (0, 0xFFFFFFFF):
            return
        if pointer in seen:
            cfg.problems.append(f"extended capability list loops back to {pointer:#x}")
            return
        seen.add(pointer)
        cap_id = header & 0xFFFF
        cfg.extended.setdefault(cap_id, pointer)
        if cap_id == EXT_ACS and pointer + 8 <= len(data):
            cfg.acs = AcsCapability(Acs(_u16(data, pointer + 4) & 0x7F), Acs(_u16(data, pointer + 6) & 0x7F))
        elif cap_id == EXT_ATS:
            cfg.ats = True
        elif cap_id == EXT_SRIOV and pointer + 0x18 <= len(data):
            cfg.sriov = Sriov(
                total_vfs=_u16(data, pointer + 0x0E),
                num_vfs=_u16(data, pointer + 0x10),
                offset=_u16(data, pointer + 0x14),
                stride=_u16(data, pointer + 0x16),
                vf_device=_u16(data, pointer + 0x1A),
            )
        nxt = header >> 20
        if nxt == 0:
            return
        if nxt < EXTENDED_START or nxt & 0x3:
            cfg.problems.append(f"extended capability pointer {nxt:#x} is not in extended space")
            return
        pointer = nxt
    cfg.problems.append("extended capability list does not end")


def reset_methods_from_config(cfg: ConfigSpace, on_root_bus: bool, alone_on_bus: bool) -> tuple[str, ...]:
    """The reset methods Linux would find, for kernels without ``reset_method`` (< 5.15)."""
    methods = []
    if cfg.flr:
        methods.append("flr")
    if cfg.af_flr:
        methods.append("af_flr")
    if cfg.pm_reset and CAP_PM in cfg.capabilities:
        methods.append("pm")
    if not on_root_bus and alone_on_bus:
        methods.append("bus")
    return tuple(methods)
