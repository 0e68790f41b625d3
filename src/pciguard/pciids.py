"""Device names from the pci.ids database (Debian's pci.ids package), as lspci shows them.

Names are for people reading the report; nothing is judged by them. Without the
database the report shows vendor:device IDs only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from pciguard.model import Host
from pciguard.model.pci import UNKNOWN_IDS

DATABASES = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"), Path("/usr/share/pci.ids"))


def _devices(databases: Iterable[Path]) -> Iterator[tuple[str, str, str, str]]:
    """(vendor ID, vendor name, device ID, device name) of each device the first database
    found lists, in its order (vendors by ID)."""
    path = next((p for p in databases if p.is_file()), None)
    if path is None:
        return
    vendor_id, vendor_name = "", ""
    with path.open(encoding="utf-8", errors="replace") as db:
        for line in db:
            if line.startswith("C "):
                return  # the class list follows the vendors
            if not line.strip() or line.startswith("#"):
                continue
            if not line.startswith("\t"):
                vendor_id, _, vendor_name = line.rstrip().partition("  ")
            elif not line.startswith("\t\t"):
                device_id, _, device_name = line.strip().partition("  ")
                yield vendor_id, vendor_name, device_id, device_name


def lookup(ids: Iterable[str], databases: Iterable[Path] = DATABASES) -> dict[str, str]:
    """``vendor:device`` -> "Vendor Device", for the IDs the database knows."""
    wanted: dict[str, set[str]] = {}
    for pair in ids:
        vendor, _, device = pair.partition(":")
        wanted.setdefault(vendor, set()).add(device)
    if not wanted:
        return {}
    names: dict[str, str] = {}
    last_vendor = max(wanted)  # the database lists vendors in order: stop after the last one
    for vendor_id, vendor_name, device_id, device_name in _devices(databases):
        if vendor_id > last_vendor:
            break
        if device_id in wanted.get(vendor_id, ()):
            names[f"{vendor_id}:{device_id}"] = f"{short_name(vendor_name)} {device_name}"
    return names


# How lspci spells vendors, and the short name people use for each.
_VENDOR_SPELLINGS = re.compile(
    r"Advanced Micro Devices, Inc\. \[(?P<short>[^\]]+)\]"
    r"| (?:Corporation|Corp\.?|Co\., Ltd\.|Co Ltd|Inc\. and subsidiaries|Inc\.?|Semiconductor|Technology"
    r" Group Ltd\.|Technology)(?= |$)|, Inc\."
)


def short_name(name: str) -> str:
    """A name as people say it: AMD's bracketed short name for "Advanced Micro Devices,
    Inc. [AMD/ATI]", and no "Corporation", "Inc." or "Co., Ltd." after a vendor."""
    return _VENDOR_SPELLINGS.sub(lambda m: m["short"] or "", name)


def ids_by_name(names: Iterable[str], databases: Iterable[Path] = DATABASES) -> dict[str, str]:
    """lspci's "Vendor Device" name -> ``vendor:device``, for names the database gives
    to one device only (a dump taken without -nn names devices but shows no IDs)."""
    wanted = set(names)
    if not wanted:
        return {}
    found: dict[str, set[str]] = {}
    for vendor_id, vendor_name, device_id, device_name in _devices(databases):
        name = f"{vendor_name} {device_name}"
        if name in wanted:
            found.setdefault(name, set()).add(f"{vendor_id}:{device_id}")
    return {name: next(iter(ids)) for name, ids in found.items() if len(ids) == 1}


def name_devices(host: Host, databases: Iterable[Path] = DATABASES) -> Host:
    """``host`` with names filled in where its functions have none, and IDs where a dump
    named a function but showed no IDs (the kernel's ACS quirks go by ID)."""
    unnamed = {f.ids for f in host.topology.values() if not f.name}
    names = lookup(unnamed, databases) if unnamed else {}
    nameless_ids = {f.name for f in host.topology.values() if f.name and f.ids == UNKNOWN_IDS}
    ids = ids_by_name(nameless_ids, databases) if nameless_ids else {}
    if not names and not ids:
        return host
    named = {b: names[f.ids] for b, f in host.topology.items() if not f.name and f.ids in names}
    identified = {b: ids[f.name] for b, f in host.topology.items() if f.ids == UNKNOWN_IDS and f.name in ids}
    return replace(host, topology=host.topology.renamed(named, identified))
