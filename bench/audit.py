#!/usr/bin/env python3
"""Audit speed: pciguard's full audit of a synthetic sysfs tree with 10,000 PCI
functions (SR-IOV virtual functions behind switches), side by side with
`lspci -vvv` reading the same tree. Target: pciguard takes no longer than lspci.

Each runs as its own process (start-up included), once to warm the page cache and
then several times, taking turns; the medians of wall, user and kernel time are reported.
Usage: python3 bench/audit.py [--functions N] [--runs N]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fake-sysfs builder lives with the tests

from fakesys import render  # noqa: E402
from pciguard.formats.platform_file import build_host  # noqa: E402
from pciguard.model import Host  # noqa: E402

ROOT_PORTS = 10
DOWNSTREAM_PER_SWITCH = 4


def synthetic_host(functions: int) -> Host:
    """Root ports, each with a switch whose downstream ports hold one SR-IOV NIC each;
    the VFs share the PF's bus. Integrated endpoints on bus 0 make up the count."""
    nics = ROOT_PORTS * DOWNSTREAM_PER_SWITCH
    bridges = ROOT_PORTS * (2 + DOWNSTREAM_PER_SWITCH)
    integrated = 20
    vfs = (functions - bridges - integrated) // nics - 1
    if not 1 <= vfs <= 255:
        raise SystemExit(f"{functions} functions do not fit this layout")
    integrated = functions - bridges - nics * (vfs + 1)
    devices: list[dict[str, Any]] = []
    bus = 1
    for port in range(ROOT_PORTS):
        upstream_bus, downstream_bus = bus, bus + 1
        bus += 2
        downstream = []
        for d in range(DOWNSTREAM_PER_SWITCH):
            nic = {
                "bdf": f"0000:{bus:02x}:00.0",
                "kind": "endpoint",
                "id": "8086:1572",
                "class": 0x020000,
                "driver": "i40e",
                "acs": "full",
                "sriov": {"vfs": vfs, "offset": 1, "stride": 1},
            }
            downstream.append(
                {
                    "bdf": f"0000:{downstream_bus:02x}:{d:02x}.0",
                    "kind": "switch-downstream",
                    "acs": "full",
                    "driver": "pcieport",
                    "children": [nic],
                }
            )
            bus += 1
        devices.append(
            {
                "bdf": f"0000:00:{port + 1:02x}.0",
                "kind": "root-port",
                "acs": "full",
                "driver": "pcieport",
                "children": [
                    {
                        "bdf": f"0000:{upstream_bus:02x}:00.0",
                        "kind": "switch-upstream",
                        "driver": "pcieport",
                        "children": downstream,
                    }
                ],
            }
        )
    for i in range(integrated):
        devices.append({"bdf": f"0000:00:{0x10 + i // 8:02x}.{i % 8}", "kind": "rc-endpoint", "acs": "full"})
    spec = {"name": "bench", "iommus": [{"name": "dmar0"}], "devices": devices}
    return build_host(spec, {}, "<bench>")


@dataclass
class Timing:
    wall: float  # median seconds
    user: float  # median CPU seconds in the process itself
    system: float  # median CPU seconds in the kernel on its behalf


def timed(commands: dict[str, list[str]], runs: int) -> dict[str, Timing]:
    """Medians over ``runs`` rounds after one warm-up round (so every command reads a
    tree in the page cache). Each round runs every command once, in turn, so that a
    slow spell of the machine falls on all of them alike."""
    for command in commands.values():
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            samples[name].append((wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))
    return {
        name: Timing(*(statistics.median(column) for column in zip(*rows, strict=True)))
        for name, rows in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--functions", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    lspci = shutil.which("lspci")
    if lspci is None:
        raise SystemExit("lspci not found: install pciutils (Debian: apt-get install pciutils)")
    host = synthetic_host(args.functions)
    with tempfile.TemporaryDirectory(prefix="pciguard-bench-") as tmp:
        start = time.perf_counter()
        render(host, Path(tmp))
        built = time.perf_counter() - start
        pciguard = [sys.executable, "-m", "pciguard.cli.main", "audit", "--root", tmp]
        runs = timed(
            {
                "pciguard audit --json": [*pciguard, "--json"],
                "pciguard audit (table)": pciguard,
                # What the audit imports before it reads anything (only that command's modules)
                "pciguard audit --help (start-up)": [*pciguard[:3], "audit", "--help"],
                "lspci -vvv": [lspci, "-vvv", "-A", "linux-sysfs", "-O", f"sysfs.path={tmp}/sys/bus/pci"],
            },
            args.runs,
        )
    print(f"synthetic tree: {len(host.topology):,} PCI functions, {len(host.groups):,} IOMMU groups")
    print(f"  (tree written in {built:.1f} s; median of {args.runs} warm runs, start-up included)")
    print(f"  {'':33} {'wall':>7} {'user':>7} {'kernel':>7}")
    for name, t in runs.items():
        print(f"  {name:33} {t.wall:6.2f}s {t.user:6.2f}s {t.system:6.2f}s")
    slowest = max(runs["pciguard audit --json"].wall, runs["pciguard audit (table)"].wall)
    ratio = slowest / runs["lspci -vvv"].wall
    verdict = "met" if ratio <= 1 else "NOT met"
    print(f"pciguard / lspci -vvv: {ratio:.2f}x (target: at most 1.00x): {verdict}")


if __name__ == "__main__":
    main()
