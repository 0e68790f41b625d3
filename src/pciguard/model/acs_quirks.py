"""The kernel's ACS quirks: devices whose isolation Linux decides from their IDs rather
than from a standard ACS capability (``pci_dev_acs_enabled[]`` in drivers/pci/quirks.c,
followed here as in Linux 6.1.176).

Linux asks the table first, in order, whenever it asks whether a device isolates
(``pci_acs_enabled``): the first entry for the device's vendor and device ID (or any
device of that vendor) that applies decides; an entry that does not apply (a rule for
root ports, asked of an endpoint) passes to the next, and with none the standard ACS
capability decides. Each rule below is asked for the flags group formation needs
(SV, RR, CR, UF) and answers as the kernel's function does on a host booted with its
IOMMU on (which is when the kernel enables ACS, and these quirks' enabling writes, at
enumeration).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from pciguard.model.pci import Function, Kind, Topology

KERNEL_RELEASE = "Linux 6.1.176"


class Rule(StrEnum):
    """What a quirk says, as drivers/pci/quirks.c's functions do."""

    MF_ENDPOINT = "mf-endpoint"  # pci_quirk_mf_endpoint_acs: no peer-to-peer between functions
    AMD_SB = "amd-sb"  # pci_quirk_amd_sb_acs: AMD southbridge functions on the root bus
    RCIEP = "rciep"  # pci_quirk_rciep_acs: Intel root-complex integrated endpoints
    INTEL_PCH = "intel-pch"  # pci_quirk_intel_pch_acs: ACS enabled through the chipset
    INTEL_SPT_PCH = "intel-spt-pch"  # pci_quirk_intel_spt_pch_acs: ACS at non-standard offsets
    ISOLATED = "isolated"  # qcom/nxp/xgene/brcm/loongson: no peer-to-peer, whatever ACS says
    CAVIUM = "cavium"  # pci_quirk_cavium_acs: ThunderX root ports
    ZHAOXIN_PORTS = "zhaoxin-ports"  # pci_quirk_zhaoxin_pcie_ports_acs
    AMAZON_AL = "amazon-al"  # pci_quirk_al_acs: Annapurna Labs root ports
    WANGXUN = "wangxun"  # pci_quirk_wangxun_nic_acs


@dataclass(frozen=True)
class Quirk:
    vendor: int
    device: int | None  # None: PCI_ANY_ID
    rule: Rule
    what: str  # how the report names it: "the kernel's ACS quirk for <what>"


@dataclass(frozen=True)
class QuirkDecision:
    isolated: bool
    quirk: Quirk

    def __str__(self) -> str:
        verb = "isolated" if self.isolated else "not isolated"
        return f"{verb} by the kernel's ACS quirk for {self.quirk.what} ({KERNEL_RELEASE})"


INTEL, AMD, ATI = 0x8086, 0x1022, 0x1002


def _each(vendor: int, devices: str, rule: Rule, what: str) -> list[Quirk]:
    return [Quirk(vendor, int(d, 16), rule, what) for d in devices.split()]


_INTEL_MF_ENDPOINTS = (
    "10C6 10DB 10DD 10E1 10F1 10F7 10F8 10F9 10FA 10FB 10FC 1507 1514 151C 1529 152A 154D 154F 1551 1558 "
    "1509 150E 150F 1510 1511 1516 1527 "  # 82580
    "10C9 10E6 10E7 10E8 150A 150D 1518 1526 "  # 82576
    "10A7 10A9 10D6 "  # 82575
    "1521 1522 1523 1524 "  # I350
    "105E 105F 1060 10D9 "  # 82571
    "15b7 15b8"  # I219
)
_AMPERE = "E005 E006 E007 E008 E009 E00A E00B E00C"
_BROADCOM_MF = "16D7 1750 1751 1752 1760 1761 1762 1763"
_LOONGSON = "3C09 3C19 3C29 7A09 7A19 7A29 7A39 7A49 7A59 7A69"
_NXP = (
    "8d81 8da1 8d83 8d80 8da0 8d82 8d90 8db0 8d92 8d91 8db1 8d93 "
    "8d89 8da9 8d8b 8d88 8da8 8d8a 8d98 8db8 8d9a 8d99 8db9 8d9b"
)

# pci_dev_acs_enabled[], in the kernel's order.
QUIRKS: tuple[Quirk, ...] = (
    *_each(ATI, "4385 439c 4383 439d 4384 4399", Rule.AMD_SB, "AMD southbridge functions"),
    *_each(AMD, "780f 7809", Rule.AMD_SB, "AMD southbridge functions"),
    *_each(0x1924, "0903 0923 0A03", Rule.MF_ENDPOINT, "Solarflare multi-function NICs"),
    *_each(INTEL, _INTEL_MF_ENDPOINTS, Rule.MF_ENDPOINT, "Intel multi-function NICs"),
    Quirk(INTEL, None, Rule.RCIEP, "Intel root-complex integrated endpoints"),
    *_each(0x17CB, "0400 0401 0115 0111 0120", Rule.ISOLATED, "Qualcomm root ports"),
    Quirk(0x1DBF, 0x0401, Rule.ISOLATED, "HXT SD4800 root ports"),
    Quirk(INTEL, None, Rule.INTEL_PCH, "Intel PCH root ports"),
    Quirk(INTEL, None, Rule.INTEL_SPT_PCH, "Intel Sunrise Point and later PCH root ports"),
    Quirk(0x19A2, 0x0710, Rule.MF_ENDPOINT, "the Emulex BE3-R"),
    Quirk(0x10DF, 0x0720, Rule.MF_ENDPOINT, "the Emulex Skyhawk-R"),
    Quirk(0x177D, None, Rule.CAVIUM, "Cavium ThunderX root ports"),
    *_each(0x177D, "A026 A059 A060", Rule.MF_ENDPOINT, "Cavium multi-function devices"),
    Quirk(0x10E8, 0xE004, Rule.ISOLATED, "APM X-Gene root ports"),
    *_each(0x1DEF, _AMPERE, Rule.ISOLATED, "Ampere root ports"),
    *_each(0x14E4, _BROADCOM_MF, Rule.MF_ENDPOINT, "Broadcom multi-function devices"),
    Quirk(0x14E4, 0xD714, Rule.ISOLATED, "Broadcom iProc PAXB root ports"),
    *_each(0x0014, _LOONGSON, Rule.ISOLATED, "Loongson root ports"),
    Quirk(0x1C36, 0x0031, Rule.AMAZON_AL, "Amazon Annapurna Labs root ports"),
    *_each(0x1D17, "3038 3104 9083", Rule.MF_ENDPOINT, "Zhaoxin multi-function devices"),
    *_each(0x1957, _NXP, Rule.ISOLATED, "NXP LX2xx0 root ports"),
    Quirk(0x1D17, None, Rule.ZHAOXIN_PORTS, "Zhaoxin root and downstream ports"),
    Quirk(0x8088, None, Rule.WANGXUN, "Wangxun NICs"),
)

# pci_quirk_intel_pch_acs_ids[]
_INTEL_PCH_ROOT_PORTS = frozenset(
    [
        *range(0x3B42, 0x3B52),  # Ibexpeak
        *range(0x1C10, 0x1C20),  # Cougarpoint
        *range(0x1E10, 0x1E20),  # Pantherpoint
        *range(0x8C10, 0x8C20),  # Lynxpoint-H
        *range(0x9C10, 0x9C1C),  # Lynxpoint-LP
        *range(0x9C90, 0x9C9C),  # Wildcat
        *range(0x1D10, 0x1D1F, 2),  # Patsburg (X79)
        *range(0x8D10, 0x8D1F),  # Wellsburg (X99)
        *range(0x8C90, 0x8C9F, 2),  # Lynx Point (9 series)
    ]
)
_INTEL_SPT_ROOT_PORTS = frozenset(
    [
        *range(0xA110, 0xA120),
        *range(0xA167, 0xA16B),  # Sunrise Point
        *range(0xA290, 0xA2A0),
        *range(0xA2E7, 0xA2EF),  # Union Point
        *range(0x9D10, 0x9D1C),  # 7th and 8th generation mobile
    ]
)
_CAVIUM_ROOT_PORTS = frozenset([*range(0xA000, 0xA800), 0xAF84, 0xB884])
_ZHAOXIN_ISOLATED = frozenset([*range(0x0710, 0x071F), 0x0721, *range(0x0723, 0x0753)])
_WANGXUN_ISOLATED = frozenset(
    [*range(0x0100, 0x0110), 0x1001, 0x2001, 0x5010, 0x5025, 0x5040, 0x5110, 0x5125, 0x5140]
)


def _verdict(rule: Rule, topology: Topology, fn: Function, device: int) -> bool | None:
    """The rule's answer for ``fn``; None: it does not apply (the next entry is asked)."""
    root_port = fn.kind is Kind.ROOT_PORT
    match rule:
        case Rule.MF_ENDPOINT | Rule.ISOLATED:
            return True
        case Rule.AMD_SB:  # multi-function on the root bus, with an AMD IOMMU (IVRS): RR and CR
            return True if topology.is_multifunction(fn.bdf) and fn.parent is None else None
        case Rule.RCIEP:
            return True if fn.kind is Kind.RC_ENDPOINT else None
        case Rule.INTEL_PCH:  # the kernel enables their ACS through the chipset at boot
            return True if root_port and device in _INTEL_PCH_ROOT_PORTS else None
        case Rule.INTEL_SPT_PCH:
            # ACS control at a non-standard offset: the kernel sets there every bit the
            # capability offers, and asks only for those.
            return True if root_port and device in _INTEL_SPT_ROOT_PORTS and fn.acs is not None else None
        case Rule.CAVIUM:
            return True if root_port and device in _CAVIUM_ROOT_PORTS else None
        case Rule.ZHAOXIN_PORTS:
            if fn.kind not in (Kind.ROOT_PORT, Kind.SWITCH_DOWNSTREAM):
                return None
            return device in _ZHAOXIN_ISOLATED
        case Rule.AMAZON_AL:
            return True if root_port else None
        case Rule.WANGXUN:
            return device in _WANGXUN_ISOLATED
    return None


@lru_cache(maxsize=4096)
def _candidates(ids: str) -> tuple[int, tuple[Quirk, ...]]:
    """The device ID and the table's entries for its vendor, in order."""
    try:
        vendor, device = (int(part, 16) for part in ids.split(":"))
    except ValueError:
        return 0, ()
    return device, tuple(q for q in QUIRKS if q.vendor == vendor and q.device in (None, device))


def quirk_decision(topology: Topology, fn: Function) -> QuirkDecision | None:
    """What the kernel's quirk table decides of ``fn``'s isolation; None: no quirk
    applies and its ACS capability decides."""
    device, candidates = _candidates(fn.ids)
    for quirk in candidates:
        verdict = _verdict(quirk.rule, topology, fn, device)
        if verdict is not None:
            return QuirkDecision(verdict, quirk)
    return None
