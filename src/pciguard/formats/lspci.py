"""``pciguard audit --lspci FILE``: a host from the text of ``lspci -vvv``, as people
paste it in forums. Pure apart from ``load_lspci``.

Works with or without ``-nn`` (IDs) and ``-D`` (PCI domains); recent pciutils print
``IOMMU group: N``, and run as root they show the capabilities (port type, ACS, FLR,
phantom functions, SR-IOV). What a dump can never show is listed with the result.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pciguard.errors import InputError, TopologyError
from pciguard.formats.yamlpos import MAX_INPUT, read_input
from pciguard.model import (
    Acs,
    AcsCapability,
    Arch,
    Bdf,
    Feature,
    Function,
    Host,
    IommuGroup,
    IommuUnit,
    Kind,
    Topology,
)
from pciguard.model.kernel import InputProblem, KernelFacts, Unreadable, printable
from pciguard.model.pci import UNKNOWN_IDS, ancestors
from pciguard.platforms.linux.config import (
    CONVENTIONAL_SIZE,
    HEADER_SIZE,
    ConfigSpace,
    parse_config,
    reset_methods_from_config,
)
from pciguard.platforms.linux.sysfs import Reading

_ADDRESS = r"(?:[0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]"
# `lspci -PP` writes each device as the path to it: 0000:00:1c.4/07:00.0/08:00.0.
_HEADER = re.compile(
    rf"^(?P<path>(?:{_ADDRESS}/)*)(?P<bdf>{_ADDRESS}) (?P<class>[^:\[]+?)"
    r"(?: \[(?P<cc>[0-9a-fA-F]{4})\])?: (?P<rest>.*)$"
)
_CLASS_NAMES = {"Host bridge": 0x0600, "ISA bridge": 0x0601, "PCI bridge": 0x0604, "IOMMU": 0x0806}
_IDS = re.compile(r"\[(?P<v>[0-9a-fA-F]{4}):(?P<d>[0-9a-fA-F]{4})\]")
_PROG_IF = re.compile(r"\(prog-if (?P<pi>[0-9a-fA-F]{2})")
_PROG_IF_TEXT = re.compile(r"\s*\(prog-if [0-9a-fA-F]{2}(?: \[[^\]]*\])?\)")
_EXPRESS = re.compile(
    r"Capabilities: \[[0-9a-f]+\] Express \(v\d\) (?P<type>.+?)(?:, MSI|, IntMsgNum| \(Slot|$)"
)
_BUS = re.compile(r"Bus: primary=(?P<p>[0-9a-f]{2}), secondary=(?P<s>[0-9a-f]{2})")
_ACS_BITS = {
    "SrcValid": Acs.SV,
    "TransBlk": Acs.TB,
    "ReqRedir": Acs.RR,
    "CmpltRedir": Acs.CR,
    "UpstreamFwd": Acs.UF,
    "EgressCtrl": Acs.EC,
    "DirectTrans": Acs.DT,
}
_PORT_TYPES = {
    "Root Port": Kind.ROOT_PORT,
    "Upstream Port": Kind.SWITCH_UPSTREAM,
    "Downstream Port": Kind.SWITCH_DOWNSTREAM,
    "PCI-Express to PCI/PCI-X Bridge": Kind.PCIE_TO_PCI_BRIDGE,
    "PCI/PCI-X to PCI-Express Bridge": Kind.PCIE_TO_PCI_BRIDGE,
    "Root Complex Integrated Endpoint": Kind.RC_ENDPOINT,
    "Root Complex Event Collector": Kind.RC_ENDPOINT,
    "Legacy Endpoint": Kind.ENDPOINT,
    "Endpoint": Kind.ENDPOINT,
}
NEVER_SHOWN = (
    ("whether the IOMMU is enabled, and interrupt isolation", "judged as not isolating interrupts"),
    ("groups' default domain types (identity = not translated)", "identity domains go unnoticed"),
    ("the firmware's IOMMU tables: 1:1 regions (RMRR, RMR)", "devices with 1:1 regions look assignable"),
    ("the kernel command line and VFIO's unsafe module options", "unsafe overrides go unnoticed"),
    ("reset methods other than FLR and power-management reset", "bus resets are inferred"),
    ("Thunderbolt security and which ports face the outside", "external ports go unnoticed"),
)


@dataclass
class _Entry:
    bdf: Bdf
    line: int
    class_code: int = 0
    ids: str = UNKNOWN_IDS
    name: str = ""
    bridge: bool = False
    secondary: int | None = None
    kind: Kind | None = None
    acs_cap: Acs | None = None
    acs_ctl: Acs | None = None
    flr: bool = False
    pm_reset: bool = False
    phantom_supported: int = 0
    phantom_enabled: bool = False
    ats: bool = False
    driver: str | None = None
    group: int | None = None
    sriov: dict[str, int] = field(default_factory=dict)
    access_denied: bool = False
    capabilities_seen: bool = False  # a capability line, "Status: Cap-", or the hex beyond the header
    config: bytearray = field(default_factory=bytearray)  # from -x/-xxx/-xxxx, when the dump has it
    hex_broken: bool = False  # its hex dump skipped lines: none of it is used


def parse_lspci(text: str, source: str = "<lspci>") -> Reading:
    problems: list[InputProblem] = []
    entries = _entries(text, source, problems)
    for e in entries:
        if len(e.config) >= HEADER_SIZE:
            _from_config(e, parse_config(bytes(e.config)), problems, source)
    functions = _functions(entries, source)
    try:
        topology = Topology(functions)
    except TopologyError as exc:
        line = next((e.line for e in entries if str(exc).startswith(str(e.bdf))), 1)
        raise InputError(source, str(exc), line=line, column=1) from None
    grouped = [e for e in entries if e.group is not None]
    groups = None
    units: tuple[IommuUnit, ...] = ()
    if grouped:
        by_number: dict[int, list[Bdf]] = {}
        for e in grouped:
            by_number.setdefault(e.group, []).append(e.bdf)  # type: ignore[arg-type]
        groups = tuple(IommuGroup(n, tuple(sorted(m))) for n, m in sorted(by_number.items()))
        scope = tuple(sorted(e.bdf for e in grouped))
        units = (IommuUnit("iommu (from lspci)", Feature.ENABLED, Feature.UNKNOWN, None, scope),)
    unreadable = [
        Unreadable(source, "an lspci dump cannot show it", f"{what}: {effect}")
        for what, effect in NEVER_SHOWN
    ]
    if any(e.access_denied for e in entries):
        unreadable.append(
            Unreadable(
                source, "lspci was not run as root (Capabilities: <access denied>)", "port types, ACS, FLR"
            )
        )
    if not grouped:
        unreadable.append(
            Unreadable(
                source, "no 'IOMMU group' lines (old pciutils, or no IOMMU)", "the kernel's IOMMU groups"
            )
        )
    if all(e.ids == UNKNOWN_IDS for e in entries):
        unreadable.append(Unreadable(source, "lspci was run without -nn", "vendor and device IDs"))
    host = Host(Path(source).name, topology=topology, arch=_arch(entries), iommus=units, kernel_groups=groups)
    # A function without a PCI Express capability (a host bridge, conventional PCI) is
    # fully seen too: a dump taken as an ordinary user, or without -vv, hides them.
    complete = not any(e.access_denied for e in entries) and any(e.capabilities_seen for e in entries)
    return Reading(
        host,
        KernelFacts(
            source_kind="lspci",
            unreadable=tuple(unreadable),
            problems=tuple(problems),
            topology_complete=complete,
        ),
    )


_FLAGS_GROUP = re.compile(r"IOMMU group ([^,\s]*)")
_MAIL_QUOTE = re.compile(r"^(?:>[ ]?)+")  # "> " or ">> " before each line of a reply
_HEX_DUMP = re.compile(r"^(?P<at>[0-9a-f]{2,3}): (?P<bytes>(?:[0-9a-f]{2} ?){1,16})$")  # -x, -xxx, -xxxx
_NOT_A_DEVICE = "not a device line such as '0000:00:1f.3 Audio device [0403]: Intel ...'; skipped"


# A dump does not say what machine it came from; the root complex does. Vendors whose
# functions on a root bus mean an ARM SoC or server (their add-in cards sit below ports).
_ARM_ROOT_VENDORS = {
    "1957": "Freescale",  # NXP Layerscape
    "1def": "Ampere",
    "17cb": "Qualcomm",
    "1d87": "Rockchip",
    "19e5": "Huawei",  # HiSilicon Kunpeng
    "177d": "Cavium",
}


def _arch(entries: list[_Entry]) -> Arch:
    on_root_bus = [e for e in entries if e.bdf.bus == 0]
    arm = any(
        e.ids.split(":")[0] in _ARM_ROOT_VENDORS or e.name.startswith(tuple(_ARM_ROOT_VENDORS.values()))
        for e in on_root_bus
    )
    return Arch.ARM if arm else Arch.X86


def _entries(text: str, source: str, problems: list[InputProblem]) -> list[_Entry]:
    """The device entries of a dump as people paste it: CRLF line ends, mail quoting,
    `pcilib:` warnings and hex dumps between entries, a shell prompt or other text
    around them (each such line named in ``problems``, the rest still read)."""
    entries: list[_Entry] = []
    skipped: list[tuple[int, str]] = []  # (line, why)
    current: _Entry | None = None
    capability = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = _MAIL_QUOTE.sub("", raw.rstrip()) if raw.startswith(">") else raw.rstrip()
        if not line.strip():
            current = None
            continue
        if line.startswith("pcilib:"):
            continue
        if (hex_line := _HEX_DUMP.match(line)) is not None:
            if current is not None:
                _hex_line(current, hex_line, number, problems, source)
            continue
        if not line[0].isspace():
            match = _HEADER.match(line)
            if match is None:
                skipped.append((number, f"{printable(line[:60])!r} is {_NOT_A_DEVICE}"))
                current = None
                continue
            current = _header(match, number, source)
            if any(e.bdf == current.bdf for e in entries):
                raise InputError(source, f"{current.bdf} appears twice", line=number, column=1)
            entries.append(current)
            capability = ""
            continue
        if current is None:
            skipped.append((number, "an indented line outside any device entry; skipped"))
            continue
        _body_line(current, line.strip(), capability, source, number)
        if line.strip().startswith("Capabilities:"):
            capability = line.strip()
    if not entries:
        first, why = skipped[0] if skipped else (1, "no device entries")
        raise InputError(source, f"{why}: is this the output of `lspci -vvv`?", line=first, column=1)
    problems.extend(InputProblem(f"{source}:{number}", why) for number, why in skipped)
    return entries


def _hex_line(
    entry: _Entry, line: re.Match[str], number: int, problems: list[InputProblem], source: str
) -> None:
    """One line of lspci's hex dump: the function's config space, 16 bytes at a time."""
    if entry.hex_broken:
        return
    at, data = int(line["at"], 16), bytes.fromhex(line["bytes"])
    if at != len(entry.config):
        problems.append(
            InputProblem(
                f"{source}:{number}", f"hex dump of {entry.bdf} skips to {at:#x}; its hex is not used"
            )
        )
        entry.config.clear()
        entry.hex_broken = True
        return
    entry.config.extend(data)


def _header(match: re.Match[str], number: int, source: str) -> _Entry:
    bdf_text = match["bdf"]
    if bdf_text.count(":") == 1:  # the domain, if any, is the path's (-PP -D) or 0000
        first = match["path"].split("/")[0]
        bdf_text = (first.rsplit(":", 2)[0] if first.count(":") == 2 else "0000") + ":" + bdf_text
    try:
        bdf = Bdf.parse(bdf_text)
    except ValueError as exc:
        raise InputError(source, str(exc), line=number, column=1) from None
    entry = _Entry(bdf, number)
    rest = match["rest"]
    if match["cc"]:
        prog = _PROG_IF.search(rest)
        entry.class_code = int(match["cc"], 16) << 8 | (int(prog["pi"], 16) if prog else 0)
        entry.bridge = match["cc"].lower() in ("0604", "0609")
    else:  # a dump without -n: the class by its name, for those the audit tells apart
        entry.class_code = _CLASS_NAMES.get(match["class"].strip(), 0) << 8
        entry.bridge = match["class"].strip() in ("PCI bridge", "CardBus bridge")
    ids = _IDS.search(rest)
    if ids:
        entry.ids = f"{ids['v'].lower()}:{ids['d'].lower()}"
        rest = rest[: ids.start()]
    name = _PROG_IF_TEXT.sub("", re.sub(r"\s*\(rev [0-9a-f]+\).*$", "", rest)).strip()
    if entry.ids and (name.endswith(" Device") or name == "Device"):
        name = f"{name} {entry.ids}"  # pci.ids had no name for it: the IDs are all there is
    entry.name = printable(name)
    return entry


def _body_line(entry: _Entry, line: str, capability: str, source: str, line_number: int) -> None:
    if line.startswith("Capabilities: <access denied>"):
        entry.access_denied = True
    elif line.startswith("Status: Cap-"):
        entry.capabilities_seen = not entry.access_denied  # it has none
    elif line.startswith("Capabilities:"):
        entry.capabilities_seen = True
        express = _EXPRESS.match(line)
        if express:
            entry.kind = next(
                (k for name, k in _PORT_TYPES.items() if express["type"].startswith(name)), Kind.ENDPOINT
            )
        elif "Address Translation Service" in line:
            entry.ats = True
    elif line.startswith("IOMMU group:") or (line.startswith("Flags:") and "IOMMU group " in line):
        # -vv and more: a line of its own; -v: the end of "Flags: bus master, ..., IOMMU group 7"
        number = line.split(":", 1)[1].strip() if line[0] == "I" else _FLAGS_GROUP.findall(line)[-1]
        if not (number.isascii() and number.isdigit() and len(number) <= 9):
            raise InputError(
                source,
                f"'IOMMU group: {printable(number[:20])}' names no group number",
                line=line_number,
                column=1,
            )
        entry.group = int(number)
    elif line.startswith("Kernel driver in use:"):
        entry.driver = line.split(":", 1)[1].strip() or None
    elif (bus := _BUS.search(line)) is not None:
        entry.secondary = int(bus["s"], 16)
        entry.bridge = True
    elif line.startswith(("ACSCap:", "ACSCtl:")):
        bits = Acs(0)
        for word in line.split()[1:]:
            name, sign = word[:-1], word[-1:]
            if name in _ACS_BITS and sign == "+":
                bits |= _ACS_BITS[name]
        if line.startswith("ACSCap:"):
            entry.acs_cap = bits
        else:
            entry.acs_ctl = bits
    elif "Express" in capability:
        if phantom := re.search(r"PhantFunc (\d)", line):  # DevCap: what is supported
            entry.phantom_supported = int(phantom[1])
        entry.flr = entry.flr or "FLReset+" in line  # only DevCap shows it set
        entry.phantom_enabled = entry.phantom_enabled or "PhantFunc+" in line  # DevCtl: in use
    elif "Power Management" in capability and line.startswith("Status:") and "NoSoftRst-" in line:
        entry.pm_reset = True
    elif "SR-IOV" in capability:
        for key, value in re.findall(r"(Number of VFs|VF offset|stride): (\d+)", line):
            entry.sriov[key] = int(value)


def _from_config(e: _Entry, cfg: ConfigSpace, problems: list[InputProblem], source: str) -> None:
    """What the hex dump's bytes say, decoded as from sysfs: they are what lspci printed its
    text from, so they win where they reach (the header always; capabilities with -xxx;
    ACS, ATS and SR-IOV, which live in extended space, with -xxxx)."""
    problems.extend(InputProblem(f"{source}:{e.line}", f"config space of {e.bdf}: {p}") for p in cfg.problems)
    if e.ids == UNKNOWN_IDS and cfg.vendor != 0xFFFF:  # VFs read all ones; lspci -nn has the truth
        e.ids = f"{cfg.vendor:04x}:{cfg.device:04x}"
    e.class_code = cfg.class_code
    e.bridge = cfg.is_bridge_header
    e.secondary = cfg.secondary_bus
    if cfg.header_only:
        return
    e.capabilities_seen = True
    e.access_denied = False
    e.kind = cfg.kind() if cfg.port_type is not None else None  # else placed as the text's are
    methods = reset_methods_from_config(cfg, on_root_bus=True, alone_on_bus=False)  # bus resets: below
    e.flr = "flr" in methods or "af_flr" in methods
    e.pm_reset = "pm" in methods
    e.phantom_supported, e.phantom_enabled = cfg.phantom_functions, bool(cfg.phantom_functions)
    if cfg.size > CONVENTIONAL_SIZE:
        e.acs_cap, e.acs_ctl = (cfg.acs.capability, cfg.acs.control) if cfg.acs else (None, None)
        e.ats = cfg.ats
        vfs = cfg.sriov
        e.sriov = {"Number of VFs": vfs.num_vfs, "VF offset": vfs.offset, "stride": vfs.stride} if vfs else {}


def _functions(entries: list[_Entry], source: str) -> dict[Bdf, Function]:
    bridges = {(e.bdf.segment, e.secondary): e for e in entries if e.secondary is not None}
    physfn: dict[Bdf, Bdf] = {}
    for e in entries:
        count, offset = e.sriov.get("Number of VFs", 0), e.sriov.get("VF offset", 0)
        for i in range(count):
            rid = e.bdf.rid + offset + i * e.sriov.get("stride", 1)
            if rid <= 0xFFFF:
                physfn[Bdf.from_rid(e.bdf.segment, rid)] = e.bdf
    by_bdf = {e.bdf: e for e in entries}
    kinds: dict[Bdf, Kind] = {}
    parents: dict[Bdf, Bdf | None] = {}
    for e in sorted(entries, key=lambda e: e.bdf):
        bridge = bridges.get((e.bdf.segment, e.bdf.bus))
        parents[e.bdf] = bridge.bdf if bridge is not None and bridge.bdf != e.bdf else None
    for e in sorted(entries, key=lambda e: len(ancestors(e.bdf, parents.get))):
        parent = parents[e.bdf]
        if e.kind is not None:
            kinds[e.bdf] = e.kind
        elif e.bridge:
            kinds[e.bdf] = Kind.ROOT_PORT if parent is None else Kind.PCIE_TO_PCI_BRIDGE
        elif any(kinds.get(b) is Kind.PCIE_TO_PCI_BRIDGE for b in ancestors(e.bdf, parents.get)):
            kinds[e.bdf] = Kind.PCI_ENDPOINT
        elif parent is None:
            # On a root bus and no PCI Express capability shown: conventional PCI to the
            # kernel (no ACS, grouped with its slot's other functions). With capabilities
            # hidden that is also the fail-closed reading.
            kinds[e.bdf] = Kind.PCI_ENDPOINT
        else:
            kinds[e.bdf] = Kind.ENDPOINT
    functions = {}
    for e in entries:
        resets = tuple(m for m, on in (("flr", e.flr), ("pm", e.pm_reset)) if on)
        if parents[e.bdf] is not None and all(
            o.bdf.slot == e.bdf.slot for o in entries if parents[o.bdf] == parents[e.bdf]
        ):
            resets += ("bus",)
        acs = AcsCapability(e.acs_cap, e.acs_ctl or Acs(0)) if e.acs_cap is not None else None
        pf = physfn.get(e.bdf)
        functions[e.bdf] = Function(
            bdf=e.bdf,
            kind=kinds[e.bdf],
            parent=parents[e.bdf],
            name=e.name,
            ids=e.ids,
            class_code=e.class_code,
            driver=e.driver,
            acs=acs,
            ats=e.ats,
            phantom_functions=e.phantom_supported if e.phantom_enabled else 0,
            reset_methods=resets,
            physfn=pf if pf in by_bdf else None,
        )
    return functions


def load_lspci(path: Path) -> Reading:
    if str(path) == "-":
        data = sys.stdin.buffer.read(MAX_INPUT + 1)
        if len(data) > MAX_INPUT:
            raise InputError("<stdin>", f"the lspci dump is larger than {MAX_INPUT >> 20} MiB")
        try:
            return parse_lspci(data.decode("utf-8"), "<stdin>")
        except UnicodeDecodeError as exc:
            raise InputError("<stdin>", f"the lspci dump is not UTF-8 text (byte {exc.start})") from None
    return parse_lspci(read_input(path, "lspci dump"), str(path))
