"""PCI functions and the topology they form. Pure values, no I/O."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import IntFlag, StrEnum
from functools import cached_property, lru_cache

from pciguard.errors import TopologyError

_BDF_RE = re.compile(
    r"^(?:(?P<seg>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<dev>[0-9a-fA-F]{2})\.(?P<fn>[0-7])$"
)


_ADDRESSES: dict[int, Bdf] = {}


UNKNOWN_IDS = "0000:0000"  # a function's vendor:device when nothing showed them


@lru_cache(maxsize=1 << 16)
def _bdf_text(value: int) -> str:
    """Reports write each address many times over; formatting it once is enough."""
    return f"{value >> 16:04x}:{value >> 8 & 0xFF:02x}:{value >> 3 & 0x1F:02x}.{value & 7}"


class Bdf(int):
    """segment:bus:device.function; also the requester ID the IOMMU sees.

    The value is the integer segment << 16 | requester ID, and each address exists
    once (``Bdf(0, 3, 0, 0) is Bdf(0, 3, 0, 0)``): hashing and ordering are the
    integer's own and a table lookup matches by identity. BDFs are the keys of every
    table the verifier snapshots millions of times and of every map an audit of
    10,000 functions builds. A BDF never equals a plain integer.
    """

    __slots__ = ()

    def __new__(cls, segment: int, bus: int, device: int, function: int) -> Bdf:
        if not (
            0 <= segment <= 0xFFFFFFFF and 0 <= bus <= 0xFF and 0 <= device <= 0x1F and 0 <= function <= 7
        ):
            raise ValueError(f"out of range: Bdf({segment}, {bus}, {device}, {function})")
        value = segment << 16 | bus << 8 | device << 3 | function
        found = _ADDRESSES.get(value)
        if found is None:
            found = _ADDRESSES[value] = int.__new__(cls, value)
        return found

    def __getnewargs__(self) -> tuple[int, int, int, int]:  # type: ignore[override]
        return (self.segment, self.bus, self.device, self.function)

    def __eq__(self, other: object) -> bool:
        return self is other  # one object per address

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = int.__hash__

    @property
    def segment(self) -> int:
        return int(self) >> 16

    @property
    def bus(self) -> int:
        return (int(self) >> 8) & 0xFF

    @property
    def device(self) -> int:
        return (int(self) >> 3) & 0x1F

    @property
    def function(self) -> int:
        return int(self) & 7

    def __repr__(self) -> str:
        return f"Bdf({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> Bdf:
        match = _BDF_RE.match(text.strip())
        if not match:
            raise ValueError(f"'{text}' is not a PCI address; expected SSSS:BB:DD.F such as 0000:03:00.0")
        device = int(match["dev"], 16)
        if device > 0x1F:
            raise ValueError(f"'{text}': device number {device:#x} is above 0x1f")
        return cls(int(match["seg"] or "0", 16), int(match["bus"], 16), device, int(match["fn"]))

    @classmethod
    def from_rid(cls, segment: int, rid: int) -> Bdf:
        return cls(segment, (rid >> 8) & 0xFF, (rid >> 3) & 0x1F, rid & 7)

    @property
    def rid(self) -> int:
        """The 16-bit requester ID (bus << 8 | devfn)."""
        return int(self) & 0xFFFF

    @property
    def slot(self) -> tuple[int, int, int]:
        return (self.segment, self.bus, self.device)

    def __str__(self) -> str:
        return _bdf_text(int(self))


class Kind(StrEnum):
    """What a function is, in PCIe port-type terms."""

    ROOT_PORT = "root-port"
    SWITCH_UPSTREAM = "switch-upstream"
    SWITCH_DOWNSTREAM = "switch-downstream"
    PCIE_TO_PCI_BRIDGE = "pcie-to-pci-bridge"
    ENDPOINT = "endpoint"
    RC_ENDPOINT = "rc-endpoint"
    PCI_ENDPOINT = "pci-endpoint"  # conventional PCI, behind a PCIe-to-PCI bridge

    @property
    def is_bridge(self) -> bool:
        return self in _BRIDGES

    @property
    def is_pcie(self) -> bool:
        return self is not Kind.PCI_ENDPOINT


_BRIDGES = {Kind.ROOT_PORT, Kind.SWITCH_UPSTREAM, Kind.SWITCH_DOWNSTREAM, Kind.PCIE_TO_PCI_BRIDGE}


class Acs(IntFlag):
    """ACS capability/control bits (PCIe base spec, ACS extended capability)."""

    SV = 0x01  # source validation
    TB = 0x02  # translation blocking
    RR = 0x04  # P2P request redirect
    CR = 0x08  # P2P completion redirect
    UF = 0x10  # upstream forwarding
    EC = 0x20  # P2P egress control
    DT = 0x40  # direct translated P2P


#: The bits Linux requires on every port before it trusts isolation (REQ_ACS_FLAGS).
REQUIRED_ACS = Acs.SV | Acs.RR | Acs.CR | Acs.UF


@dataclass(frozen=True)
class AcsCapability:
    capability: Acs
    control: Acs

    def isolates(self) -> bool:
        """True when the required ACS features are enabled.

        As in Linux's pci_acs_flags_enabled(): a feature missing from the capability
        register is hard-wired enabled, so only controllable features must be set.
        """
        wanted = REQUIRED_ACS & (self.capability | Acs.EC)
        return (self.control & wanted) == wanted


@dataclass(frozen=True)
class ReservedRegion:
    """A firmware-required 1:1 mapping (RMRR on Intel, unity map on AMD)."""

    name: str
    start: int
    end: int  # inclusive

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.start <= address <= self.end

    def overlaps(self, other: ReservedRegion) -> bool:
        """Whether the two share any byte: a guest given either can reach the other's."""
        return self.start <= other.end and other.start <= self.end

    def __str__(self) -> str:
        return f"{self.name} [{self.start:#x}-{self.end:#x}]"


#: The smallest unit a CPU maps into a guest: BARs in one page are exposed together.
PAGE_SIZE = 4096


@dataclass(frozen=True)
class Bar:
    """A memory BAR: the MMIO range a device decodes."""

    start: int
    end: int  # inclusive

    @property
    def pages(self) -> tuple[int, int]:
        """The first and last page the BAR touches."""
        return self.start // PAGE_SIZE, self.end // PAGE_SIZE

    def __str__(self) -> str:
        return f"[{self.start:#x}-{self.end:#x}]"


class Resource(StrEnum):
    BAR_PAGE = "bar-page"  # a guest mapping the page reaches every BAR in it
    INTX = "intx"  # a guest can mask the line, or see the other device's interrupts


@dataclass(frozen=True)
class SharedResource:
    """Something one device shares with another, so that whoever gets one reaches the
    other (XSA-461)."""

    other: Bdf
    kind: Resource
    what: str


@dataclass(frozen=True)
class Function:
    """One PCI function as the toolstack sees it."""

    bdf: Bdf
    kind: Kind
    parent: Bdf | None = None  # the port or bridge above; None on a root bus
    name: str = ""
    ids: str = UNKNOWN_IDS  # vendor:device
    class_code: int = 0
    driver: str | None = None  # host driver bound now
    acs: AcsCapability | None = None
    ats: bool = False
    external: bool = False  # an external-facing port (Thunderbolt, hot-plug slot)
    phantom_functions: int = 0  # the Phantom Functions field in use, 0..3
    reset_methods: tuple[str, ...] = ()
    reset_may_fail: bool = False  # a reset can leave it as it was (quirky GPUs, some NICs)
    reserved_regions: tuple[ReservedRegion, ...] = ()
    bars: tuple[Bar, ...] = ()  # memory BARs
    intx: int | None = None  # the legacy interrupt line it raises, if it has one
    physfn: Bdf | None = None  # set on SR-IOV virtual functions
    host_critical: str = ""  # why the host needs it (the root disk, the console); "": it does not

    @property
    def label(self) -> str:
        return f"{self.bdf} ({self.name})" if self.name else str(self.bdf)

    @property
    def root_complex_part(self) -> bool:
        """A host bridge or the IOMMU itself (classes 06/00 and 08/06): infrastructure
        Linux may leave out of every IOMMU group (AMD's IOMMU does not translate its own
        root complex) and that is never given to a guest."""
        return self.class_code >> 8 in (0x0600, 0x0806)

    def phantom_rids(self) -> tuple[Bdf, ...]:
        """Requester IDs this function also uses through phantom functions.

        Same rule as Xen's phantom_stride: the field takes the top bits of the
        function number, so the stride is 8 >> field.
        """
        if not self.phantom_functions:
            return ()
        stride = 8 >> self.phantom_functions
        return tuple(
            Bdf(self.bdf.segment, self.bdf.bus, self.bdf.device, fn)
            for fn in range(self.bdf.function + stride, 8, stride)
        )


def ancestors(bdf: Bdf, parent_of: Callable[[Bdf], Bdf | None]) -> list[Bdf]:
    """The bridges above ``bdf``, nearest first, in a tree that may still be malformed
    (readers build topologies from it): stops at a loop or an unknown parent."""
    out: list[Bdf] = []
    node = parent_of(bdf)
    while node is not None and node not in out and node != bdf:
        out.append(node)
        node = parent_of(node)
    return out


@dataclass(frozen=True)
class Topology(Mapping[Bdf, Function]):
    """The functions of one host, keyed by BDF, checked for consistency on creation."""

    functions: Mapping[Bdf, Function] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for fn in self.functions.values():
            self._check(fn)

    def _check(self, fn: Function) -> None:
        if fn.parent is not None:
            parent = self.functions.get(fn.parent)
            if parent is None:
                raise TopologyError(f"{fn.bdf}: parent {fn.parent} is not in the topology")
            if not parent.kind.is_bridge:
                raise TopologyError(f"{fn.bdf}: parent {fn.parent} is a {parent.kind}, not a bridge")
            if parent.kind is Kind.SWITCH_UPSTREAM and fn.kind is not Kind.SWITCH_DOWNSTREAM:
                raise TopologyError(
                    f"{fn.bdf}: only switch-downstream ports sit below switch-upstream {fn.parent}"
                )
        elif fn.kind is Kind.SWITCH_UPSTREAM or fn.kind is Kind.SWITCH_DOWNSTREAM:
            raise TopologyError(f"{fn.bdf}: a {fn.kind} cannot sit on a root bus; give it a parent")
        # Conventional PCI and PCI bridges sit on root buses too (older chipsets, many VMs).
        if fn.kind is Kind.PCI_ENDPOINT and fn.parent is not None and not self._behind_pci_bridge(fn):
            raise TopologyError(f"{fn.bdf}: conventional PCI devices sit behind a pcie-to-pci-bridge")
        if fn.physfn is not None and fn.physfn not in self.functions:
            raise TopologyError(f"{fn.bdf}: physical function {fn.physfn} is not in the topology")
        buses = {self.functions[c].bdf.bus for c in self.children.get(fn.bdf, ())}
        if len(buses) > 1:
            raise TopologyError(f"{fn.bdf}: its children sit on several buses {sorted(buses)}")

    def _behind_pci_bridge(self, fn: Function) -> bool:
        return any(b.kind is Kind.PCIE_TO_PCI_BRIDGE for b in self.path_to_root(fn.bdf))

    def renamed(self, names: Mapping[Bdf, str], ids: Mapping[Bdf, str] | None = None) -> Topology:
        """The same topology with display names (and IDs) set; they change no structure, so
        the checks of a new topology are not run again (they cost on hosts of 10,000 functions)."""
        ids = ids or {}
        functions = {
            b: replace(f, name=names.get(b, f.name), ids=ids.get(b, f.ids)) if b in names or b in ids else f
            for b, f in self.functions.items()
        }
        new = object.__new__(Topology)
        object.__setattr__(new, "functions", functions)
        return new

    # Mapping protocol
    def __getitem__(self, bdf: Bdf) -> Function:
        return self.functions[bdf]

    def __iter__(self) -> Iterator[Bdf]:
        return iter(sorted(self.functions))

    def __len__(self) -> int:
        return len(self.functions)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.functions)))

    @cached_property
    def children(self) -> dict[Bdf, tuple[Bdf, ...]]:
        kids: dict[Bdf, list[Bdf]] = {}
        for fn in self.functions.values():
            if fn.parent is not None:
                kids.setdefault(fn.parent, []).append(fn.bdf)
        return {k: tuple(sorted(v)) for k, v in kids.items()}

    def secondary_bus(self, bridge: Bdf) -> int | None:
        kids = self.children.get(bridge, ())
        return kids[0].bus if kids else None

    @cached_property
    def _paths(self) -> dict[Bdf, tuple[Function, ...]]:
        return {}

    def path_to_root(self, bdf: Bdf) -> list[Function]:
        """The bridges above ``bdf``, nearest first (remembered: audits ask for every device)."""
        known = self._paths.get(bdf)
        if known is None:
            path: list[Function] = []
            parent = self.functions[bdf].parent
            seen: set[Bdf] = set()
            while parent is not None:
                if parent in seen:
                    raise TopologyError(f"{bdf}: the parent chain loops at {parent}")
                seen.add(parent)
                bridge = self.functions[parent]
                path.append(bridge)
                parent = bridge.parent
            known = self._paths[bdf] = tuple(path)
        return list(known)

    def subtree(self, bdf: Bdf) -> list[Bdf]:
        """``bdf`` and everything below it."""
        out = [bdf]
        for child in self.children.get(bdf, ()):
            out.extend(self.subtree(child))
        return out

    @cached_property
    def _by_slot(self) -> dict[tuple[int, int, int], list[Function]]:
        slots: dict[tuple[int, int, int], list[Function]] = {}
        for f in self.functions.values():
            if f.physfn is None:
                slots.setdefault(f.bdf.slot, []).append(f)
        return slots

    def slot_siblings(self, bdf: Bdf) -> list[Function]:
        """The other non-VF functions in the same slot."""
        return [f for f in self._by_slot.get(bdf.slot, ()) if f.bdf != bdf]

    def is_multifunction(self, bdf: Bdf) -> bool:
        return self.functions[bdf].physfn is None and bool(self.slot_siblings(bdf))

    @cached_property
    def _vfs(self) -> dict[Bdf, list[Bdf]]:
        vfs: dict[Bdf, list[Bdf]] = {}
        for f in sorted(self.functions.values(), key=lambda f: f.bdf):
            if f.physfn is not None:
                vfs.setdefault(f.physfn, []).append(f.bdf)
        return vfs

    def virtual_functions(self, pf: Bdf) -> list[Bdf]:
        return list(self._vfs.get(pf, ()))

    @cached_property
    def _external(self) -> frozenset[Bdf]:
        return frozenset(b for f in self.functions.values() if f.external for b in self.subtree(f.bdf))

    def is_behind_external_port(self, bdf: Bdf) -> bool:
        return bdf in self._external

    @cached_property
    def _shared(self) -> dict[Bdf, tuple[SharedResource, ...]]:
        """Pairs that share a BAR page or an INTx line, found by one sweep over the BARs
        sorted by page (a host has thousands; only neighbours can share a page)."""
        found: dict[Bdf, dict[Bdf, tuple[Resource, str]]] = {}

        def note(a: Bdf, b: Bdf, kind: Resource, what: str) -> None:
            found.setdefault(a, {}).setdefault(b, (kind, what))
            found.setdefault(b, {}).setdefault(a, (kind, what))

        bars = sorted(
            ((bar, f.bdf) for f in self.functions.values() for bar in f.bars), key=lambda x: x[0].pages
        )
        open_bars: list[tuple[Bar, Bdf]] = []
        for bar, owner in bars:
            open_bars = [(o, b) for o, b in open_bars if o.pages[1] >= bar.pages[0]]
            for other, other_owner in open_bars:
                if other_owner != owner:
                    page = max(bar.pages[0], other.pages[0]) * PAGE_SIZE
                    note(
                        owner,
                        other_owner,
                        Resource.BAR_PAGE,
                        f"the 4 KiB page at {page:#x} (BARs {other} and {bar})",
                    )
            open_bars.append((bar, owner))
        lines: dict[int, list[Bdf]] = {}
        for f in self.functions.values():
            # A bridge's own INTx (PME, AER, hot-plug) is host infrastructure every device
            # below relies on anyway; sharing a line with it ties no two owners together.
            if f.intx is not None and not f.kind.is_bridge:
                lines.setdefault(f.intx, []).append(f.bdf)
        for line, devices in lines.items():
            for a in devices:
                for b in devices:
                    if a != b:
                        note(a, b, Resource.INTX, f"the legacy interrupt line {line}")
        return {
            d: tuple(SharedResource(o, kind, what) for o, (kind, what) in sorted(others.items()))
            for d, others in found.items()
        }

    def shared_resources(self, bdf: Bdf) -> tuple[SharedResource, ...]:
        """The other devices that share a BAR page or an INTx line with ``bdf``."""
        return self._shared.get(bdf, ())
