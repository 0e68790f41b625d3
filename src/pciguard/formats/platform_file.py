"""Platform description files: a simulated host's PCI tree and IOMMU units.

The schema is the pydantic models below; ``docs/platform-format.md`` describes it
with examples. ``parse_platform(text, source)`` is pure; ``load_platform(path)`` reads.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path as FsPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pciguard.errors import TopologyError
from pciguard.formats.yamlpos import Path, at, load, read_input, render, validate
from pciguard.model import (
    Acs,
    AcsCapability,
    Arch,
    Bar,
    Bdf,
    Feature,
    Function,
    Host,
    IommuUnit,
    Kind,
    MsiController,
    ReservedRegion,
    Topology,
)

AcsBit = Literal["SV", "TB", "RR", "CR", "UF", "EC", "DT"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AcsSpec(_Strict):
    capability: list[AcsBit]
    control: list[AcsBit]


class BarSpec(_Strict):
    start: int = Field(ge=0, lt=1 << 64)
    end: int = Field(ge=0, lt=1 << 64)


class RegionSpec(BarSpec):
    name: str


class DeviceRange(_Strict):
    first: str
    last: str


class UnityMapSpec(RegionSpec):
    """A firmware 1:1 region that names its devices apart from them, as AMD's IVMD
    entries do (every device, a list, or a range of requester IDs) and an RMRR's device
    scope does: every device named gets the region, so devices named together share it."""

    devices: Literal["all"] | list[str] | DeviceRange


class SriovSpec(_Strict):
    vfs: int = Field(ge=1, le=256, description="virtual functions enabled")
    offset: int = Field(1, ge=1, description="First VF Offset, in routing IDs")
    stride: int = Field(1, ge=1, description="VF Stride, in routing IDs")
    vf_name: str = ""


class DeviceSpec(_Strict):
    bdf: str
    kind: Kind
    name: str = ""
    id: str = Field("0000:0000", pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")
    class_code: int = Field(0, alias="class", ge=0, le=0xFFFFFF)
    driver: str | None = None
    acs: Literal["full", "none"] | AcsSpec = "none"
    ats: bool = False
    external: bool = False
    phantom_functions: int = Field(0, ge=0, le=3)
    reset: list[Literal["flr", "pm", "bus"]] = ["flr"]
    reset_may_fail: bool = Field(False, description="a reset can fail and leave the device as it was")
    reserved_regions: list[RegionSpec] = []
    bars: list[BarSpec] = Field([], description="memory BARs, end inclusive")
    intx: int | None = Field(None, ge=0, le=0xFFFF, description="the legacy interrupt line it raises")
    host_critical: bool = False
    hotplug: bool = Field(False, description="absent at boot; a scenario plugs it in")
    sriov: SriovSpec | None = None
    children: list[DeviceSpec] = []

    @field_validator("bdf")
    @classmethod
    def _bdf(cls, value: str) -> str:
        Bdf.parse(value)
        return value


class IommuSpec(_Strict):
    name: str
    dma_remapping: Feature = Feature.ENABLED
    interrupt_remapping: Feature = Feature.ENABLED
    msi_controller: MsiController | None = None
    scope: Literal["all"] | list[str] = "all"


class PlatformFile(_Strict):
    name: str
    arch: Arch = Arch.X86
    description: str = ""
    iommus: list[IommuSpec] = []
    devices: list[DeviceSpec]
    unity_maps: list[UnityMapSpec] = []


def _acs(spec: Literal["full", "none"] | AcsSpec) -> AcsCapability | None:
    if spec == "none":
        return None
    if spec == "full":
        bits = Acs.SV | Acs.RR | Acs.CR | Acs.UF
        return AcsCapability(bits, bits)
    assert isinstance(spec, AcsSpec)

    def flags(names: list[AcsBit]) -> Acs:
        out = Acs(0)
        for n in names:
            out |= Acs[n]
        return out

    return AcsCapability(flags(spec.capability), flags(spec.control))


def _flatten(
    spec: PlatformFile, source: str, positions: dict[Path, tuple[int, int]], prefix: Path
) -> tuple[dict[Bdf, Function], set[Bdf], dict[Bdf, Path]]:
    functions: dict[Bdf, Function] = {}
    later: set[Bdf] = set()
    where: dict[Bdf, Path] = {}

    def add(fn: Function, path: Path, hotplug: bool) -> None:
        if fn.bdf in functions:
            raise at(
                source, f"{fn.bdf} is described twice (first at {render(where[fn.bdf])})", path, positions
            )
        functions[fn.bdf] = fn
        where[fn.bdf] = path
        if hotplug:
            later.add(fn.bdf)

    def walk(dev: DeviceSpec, parent: Bdf | None, path: Path, hotplug: bool) -> None:
        bdf = Bdf.parse(dev.bdf)
        plugged_later = hotplug or dev.hotplug
        regions = tuple(ReservedRegion(r.name, r.start, r.end) for r in dev.reserved_regions)
        spans: list[tuple[str, Sequence[BarSpec]]] = [
            ("reserved_regions", dev.reserved_regions),
            ("bars", dev.bars),
        ]
        for key, ranges in spans:
            for i, r in enumerate(ranges):
                if r.end < r.start:
                    raise at(source, "a range's end comes before its start", (*path, key, i), positions)
        add(
            Function(
                bdf=bdf,
                kind=dev.kind,
                parent=parent,
                name=dev.name,
                ids=dev.id.lower(),
                class_code=dev.class_code,
                driver=dev.driver,
                acs=_acs(dev.acs),
                ats=dev.ats,
                external=dev.external,
                phantom_functions=dev.phantom_functions,
                reset_methods=tuple(dev.reset),
                reset_may_fail=dev.reset_may_fail,
                reserved_regions=regions,
                bars=tuple(Bar(b.start, b.end) for b in dev.bars),
                intx=dev.intx,
                host_critical=(dev.name or "the host needs it") if dev.host_critical else "",
            ),
            path,
            plugged_later,
        )
        if dev.sriov is not None:
            for i in range(dev.sriov.vfs):
                rid = bdf.rid + dev.sriov.offset + i * dev.sriov.stride
                if rid > 0xFFFF:
                    raise at(source, "virtual functions run past bus ff", (*path, "sriov"), positions)
                vf = Bdf.from_rid(bdf.segment, rid)
                name = dev.sriov.vf_name or f"{dev.name or 'PF'} VF{i}"
                add(
                    Function(
                        bdf=vf,
                        kind=Kind.ENDPOINT,
                        parent=parent,
                        name=name,
                        ids=dev.id.lower(),
                        class_code=dev.class_code,
                        physfn=bdf,
                        ats=dev.ats,
                        reset_methods=("flr",),
                    ),
                    (*path, "sriov"),
                    plugged_later,
                )
        for i, child in enumerate(dev.children):
            if not dev.kind.is_bridge:
                raise at(
                    source,
                    f"{dev.bdf} is a {dev.kind.value}; only bridges have children",
                    (*path, "children"),
                    positions,
                )
            walk(child, bdf, (*path, "children", i), plugged_later)

    for i, dev in enumerate(spec.devices):
        walk(dev, None, (*prefix, "devices", i), False)
    return functions, later, where


def _named(
    devices: Literal["all"] | list[str] | DeviceRange,
    functions: dict[Bdf, Function],
    ordered: list[Bdf],
    source: str,
    path: Path,
    positions: dict[Path, tuple[int, int]],
) -> list[Bdf]:
    """The devices a unity map names, each of which must be described (``ordered``:
    the functions' addresses, sorted once for every map)."""

    def parse(text: str, where: Path) -> Bdf:
        try:
            return Bdf.parse(text)
        except ValueError as exc:
            raise at(source, str(exc), where, positions) from None

    if devices == "all":
        return ordered
    if isinstance(devices, DeviceRange):
        first, last = parse(devices.first, (*path, "first")), parse(devices.last, (*path, "last"))
        if last < first:
            raise at(source, f"the range ends ({last}) before it starts ({first})", path, positions)
        named = ordered[bisect_left(ordered, first) : bisect_right(ordered, last)]
        if not named:
            raise at(source, f"no device described lies in {first}..{last}", path, positions)
        return named
    named = []
    for i, text in enumerate(devices):
        bdf = parse(text, (*path, i))
        if bdf not in functions:
            raise at(source, f"{bdf} is not a device of this platform", (*path, i), positions)
        named.append(bdf)
    return named


def parse_platform(text: str, source: str = "<platform>") -> Host:
    data, positions = load(text, source)
    return build_host(data, positions, source)


def build_host(data: Any, positions: dict[Path, tuple[int, int]], source: str, prefix: Path = ()) -> Host:
    """Validate already-parsed YAML (a platform file, or one inlined in a scenario at
    key path ``prefix``)."""
    spec = validate(PlatformFile, data, positions, source, prefix)
    functions, later, where = _flatten(spec, source, positions, prefix)
    ordered = sorted(functions)
    for i, unity in enumerate(spec.unity_maps):
        path = (*prefix, "unity_maps", i)
        if unity.end < unity.start:
            raise at(source, "a range's end comes before its start", path, positions)
        region = ReservedRegion(unity.name, unity.start, unity.end)
        for bdf in _named(unity.devices, functions, ordered, source, (*path, "devices"), positions):
            fn = functions[bdf]
            functions[bdf] = replace(fn, reserved_regions=(*fn.reserved_regions, region))
    try:
        topology = Topology(functions)
    except TopologyError as exc:
        culprit = next((b for b in where if str(exc).startswith(str(b))), None)
        path = where[culprit] if culprit else (*prefix, "devices")
        raise at(source, str(exc), path, positions) from None
    units = []
    for i, unit in enumerate(spec.iommus):
        if spec.arch is Arch.ARM and unit.msi_controller is None:
            raise at(
                source,
                "an ARM IOMMU needs msi_controller: gicv3-its or gicv2m",
                (*prefix, "iommus", i),
                positions,
            )
        scope = None
        if unit.scope != "all":
            try:
                scope = tuple(Bdf.parse(b) for b in unit.scope)
            except ValueError as exc:
                raise at(source, str(exc), (*prefix, "iommus", i, "scope"), positions) from None
        units.append(
            IommuUnit(unit.name, unit.dma_remapping, unit.interrupt_remapping, unit.msi_controller, scope)
        )
    try:
        return Host(spec.name, spec.arch, topology, tuple(units), frozenset(later))
    except TopologyError as exc:
        raise at(source, str(exc), (*prefix, "iommus"), positions) from None


def load_platform(path: str | FsPath) -> Host:
    path = FsPath(path)
    text = read_input(path, "platform file")
    return parse_platform(text, str(path))
