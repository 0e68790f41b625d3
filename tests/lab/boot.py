"""Boot lab machines by hand and show what their guests saw.

    python3 tests/lab/boot.py                 # every machine
    python3 tests/lab/boot.py iommu-pt --out /tmp/lab

Prints, per machine, the DMA probes' verdicts and the audit's findings and groups, and
leaves everything (console.log, result.json, snapshot.tar.gz) in the output folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.kit import LabUnavailable, prepare
from lab.machines import MACHINES, Outcome, Runs


def show(outcome: Outcome) -> None:
    print(f"== {outcome.machine.name} (QEMU exit {outcome.exit_code}) in {outcome.out}")
    if outcome.result is None:
        print(outcome.console[-3000:])
        return
    for name, error in outcome.result["errors"].items():
        print(f"step {name} failed:\n{error}")
    for name, step in outcome.result["steps"].items():
        if name.startswith("probe"):
            print(f"{name}: {step['verdict']} at {step['target']:#x} ({step['why']})")
        elif "json" in step:
            report = step["json"]
            print(f"{name}: exit {step['exit']}")
            for finding in report["findings"]:
                print(f"  {finding['severity']:8} {finding['message']}")
            for group in report["groups"]:
                members = ", ".join(m["bdf"] for m in group["members"])
                print(f"  group {group['number']} {group['domain']}: {group['verdict']}: {members}")


def main() -> int:
    names = [m.name for m in MACHINES]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "machines", nargs="*", metavar="MACHINE", help=f"any of {', '.join(names)} (default: all)"
    )
    parser.add_argument("--out", type=Path, help="where results go (default: a new temp folder)")
    args = parser.parse_args()
    if unknown := set(args.machines) - set(names):
        parser.error(f"no machine named {', '.join(sorted(unknown))}; there are {', '.join(names)}")
    chosen = args.machines or names
    try:
        kit = prepare()
    except LabUnavailable as exc:
        print(f"lab unavailable: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="pciguard-lab-"))
    began = time.monotonic()
    picked = tuple(m for m in MACHINES if m.name in chosen)
    runs = Runs(kit, picked, out)
    try:
        for machine in picked:
            show(runs.outcome(machine.name))
    finally:
        runs.stop()
    print(f"{len(picked)} machine(s) in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
