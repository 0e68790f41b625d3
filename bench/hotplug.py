#!/usr/bin/env python3
"""Hot-plug decision latency: from a device appearing to the guard's decision applied.

Two measurements:
- lab (real kernel, QEMU under TCG, one emulated CPU): the ``hotplug`` machine of
  tests/lab has ``pciguard guard`` running while an edu and two e1000e NICs are plugged
  into empty root ports, and an edu the policy rejects. Printed per device, from an
  independent watcher's first sight of it in sysfs (it polls every 2 ms, on the one
  CPU the guard also needs): when vfio-pci held it and when the guard's decision was
  applied (both on the guest's CLOCK_MONOTONIC), with the guard's own time from the
  event, split into reading and judging, and acting. Goal: under 100 ms from
  appearance to decision.
- native: the same decision code on this machine against a fake sysfs tree (tests/
  fakekernel.py), a device plugged and unplugged ``--plugs`` times, per target.

Usage: python3 bench/hotplug.py [--plugs N] [--no-lab]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakekernel import installed, plug, prepare, unplug  # noqa: E402
from fakesys import Kernel, render  # noqa: E402
from pciguard.formats.platform_file import load_platform  # noqa: E402
from pciguard.model import Bdf  # noqa: E402
from pciguard.platforms.linux.guard import Guard  # noqa: E402
from pciguard.policy.rules import parse_policy  # noqa: E402

ENCLOSURE = "0000:05:00.0"
POLICIES = {"quarantine": "", "allow": "allow id 1987:5012", "reject": "reject if external"}


def native(plugs: int) -> None:
    host = load_platform(ROOT / "examples" / "workstation.yaml")
    print(f"native, fake sysfs tree of the workstation example ({plugs} plugs per target):")
    print(f"  {'target':11} {'median':>8} {'p95':>8}   (event to decision applied; of which reading+judging)")
    for target, rules in POLICIES.items():
        with tempfile.TemporaryDirectory(prefix="pciguard-bench-") as tmp:
            root = render(host, Path(tmp), Kernel(root_disk=Bdf(0, 2, 0, 0)))
            prepare(root, host)
            unplug(root, ENCLOSURE)
            unplug(root, "0000:06:00.0")
            with installed(root):
                guard = Guard(parse_policy(rules), str(root), root / "state")
                guard.start()
                totals, decides = [], []
                for _ in range(plugs):
                    plug(root, ENCLOSURE)
                    decision = guard.added("pci", ENCLOSURE, time.monotonic())
                    assert decision is not None and decision.target == target, decision
                    totals.append(decision.latency_ms)
                    decides.append(decision.decide_ms)
                    guard.decisions.clear()
                    if target != "reject":  # a rejected device is off the bus already
                        unplug(root, ENCLOSURE)
                guard.stop()
        p95 = statistics.quantiles(totals, n=20)[-1]
        print(
            f"  {target:11} {statistics.median(totals):6.1f}ms {p95:6.1f}ms"
            f"   ({statistics.median(decides):.1f} ms reading and judging)"
        )


def lab() -> None:
    from lab.kit import LabUnavailable
    from lab.kit import prepare as prepare_lab
    from lab.machines import HOTPLUG, finish, start

    try:
        kit = prepare_lab()
    except LabUnavailable as exc:
        print(f"lab: unavailable ({exc})")
        return
    with tempfile.TemporaryDirectory(prefix="pciguard-bench-lab-") as tmp:
        outcome = finish(start(kit, HOTPLUG, Path(tmp) / "hotplug"))
        ran = outcome.step("guard")
    print("lab, Linux guest under QEMU TCG (1 emulated CPU), devices plugged through the QEMU monitor;")
    print("milliseconds after a watcher first saw each device in sysfs:")
    columns = f"{'device':6} {'target':11} {'vfio-pci':>9} {'applied':>8}"
    print(f"  {columns}   guard: event to applied")
    names = {bdf: name for name, bdf in ran["devices"].items()}
    for bdf, decision in sorted(ran["decisions"].items()):
        name, watched = names.get(bdf, "edu2"), ran["watched"][bdf]  # edu2: rejected, gone
        held = next((t for t, driver in watched["drivers"] if driver == "vfio-pci"), None)
        held_text = "never" if held is None else "at once" if held == 0 else f"{held:.0f}"
        applied = (decision["monotonic"] - watched["appeared"]) * 1000
        acting = decision["latency_ms"] - decision["decide_ms"]
        print(
            f"  {name:6} {decision['target']:11} {held_text:>9} {applied:8.0f}"
            f"   {decision['latency_ms']:.0f} ms ({decision['decide_ms']:.0f} reading and judging,"
            f" {acting:.0f} acting)"
        )
    print("  (quarantines and rejections first; an allow waits until nothing else is pending)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugs", type=int, default=50)
    parser.add_argument("--no-lab", action="store_true", help="skip the QEMU measurement")
    args = parser.parse_args()
    native(args.plugs)
    if not args.no_lab:
        lab()


if __name__ == "__main__":
    main()
