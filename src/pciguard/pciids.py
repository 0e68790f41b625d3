"""Device names from the pci.ids database (Debian's pci.ids package), as lspci shows them.

Names are for people reading the report; nothing is judged by them. Without the
database the report shows vendor:device IDs only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from pciguard.model import Host

DATABASES = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"), Path("/usr/share/pci.ids"))


def lookup(ids: Iterable[str], databases: Iterable[Path] = DATABASES) -> dict[str, str]:
    """``vendor:device`` -> "Vendor Device", for the IDs the database knows."""
    wanted: dict[str, set[str]] = {}
    for pair in ids:
        vendor, _, device = pair.partition(":")
        wanted.setdefault(vendor, set()).add(device)
    path = next((p for p in databases if p.is_file()), None)
    if path is None or not wanted:
        return {}
    names: dict[str, str] = {}
    vendor_id, vendor_name = "", ""
    last_vendor = max(wanted)  # the database lists vendors in order: stop after the last one
    with path.open(encoding="utf-8", errors="replace") as db:
        for line in db:
            if line.startswith("C "):
                break  # the class list follows the vendors
            if not line.strip() or line.startswith("#"):
                continue
            if not line.startswith("\t"):
                vendor_id, _, vendor_name = line.rstrip().partition("  ")
                if vendor_id > last_vendor:
                    break
            elif not line.startswith("\t\t") and vendor_id in wanted:
                device_id, _, device_name = line.strip().partition("  ")
                if device_id in wanted[vendor_id]:
                    names[f"{vendor_id}:{device_id}"] = f"{_short(vendor_name)} {device_name}"
    return names


def _short(vendor: str) -> str:
    for suffix in (" Corporation", ", Inc.", " Inc.", " Co., Ltd.", " Technology", " Semiconductor"):
        vendor = vendor.replace(suffix, "")
    return vendor


def name_devices(host: Host, databases: Iterable[Path] = DATABASES) -> Host:
    """``host`` with names filled in where its functions have none."""
    names = lookup({f.ids for f in host.topology.values() if not f.name}, databases)
    if not names:
        return host
    named = {b: names[f.ids] for b, f in host.topology.items() if not f.name and f.ids in names}
    return replace(host, topology=host.topology.renamed(named))
