#!/usr/bin/env python3
"""Verifier figures: distinct states, transitions, states per second, peak memory and
time to verdict on the reference suite (every reduction on), the symmetry reduction
on the symmetric scenario, and time to catch each legacy flaw.

Each run is its own `pciguard verify --json` process, so peak memory is its own.
Usage: python3 bench/verify.py [--quick] [--large] [--breakdown]
  --quick skips the per-reduction comparison; --large adds examples/verify/large/;
  --breakdown also shows where a transition's time goes (the workstation scenario
  under cProfile, which slows every call alike).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERIFY = ROOT / "examples" / "verify"
TARGET_STATES_PER_SECOND = 50_000
TARGET_SYMMETRY_RATIO = 10


def verify(path: Path, *flags: str) -> dict[str, object]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pciguard.cli.main",
            "verify",
            str(path),
            "--json",
            "--out",
            "/dev/null",
            *flags,
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if done.returncode not in (0, 1):
        raise SystemExit(f"{path.name}: exit {done.returncode}\n{done.stderr}")
    return json.loads(done.stdout)


def row(name: str, r: dict[str, object]) -> str:
    return (
        f"{name:<42} {r['verdict']:<10} {r['states']:>9,} {r['transitions']:>11,} "
        f"{r['states_per_second']:>10,} {r['peak_rss_mib']:>8} {r['seconds']:>9}"
    )


def main() -> None:
    header = (
        f"{'scenario':<42} {'verdict':<10} {'states':>9} {'transitions':>11} "
        f"{'states/s':>10} {'MiB':>8} {'seconds':>9}"
    )
    print("Reference suite, every reduction on:")
    print(header)
    rates = []
    for path in sorted(VERIFY.glob("ref-*.yaml")):
        r = verify(path)
        rates.append((r["states"], r["seconds"]))
        print(row(path.stem, r))
    total_states = sum(s for s, _ in rates)
    total_seconds = sum(t for _, t in rates)
    rate = total_states / total_seconds
    print(
        f"suite: {total_states:,} states in {total_seconds:.1f} s = {rate:,.0f} states/s "
        f"(target {TARGET_STATES_PER_SECOND:,}: {'met' if rate >= TARGET_STATES_PER_SECOND else 'NOT met'})"
    )

    print("\nSymmetry on the symmetric scenario:")
    print(header)
    symmetric = VERIFY / "ref-symmetric.yaml"
    with_symmetry = verify(symmetric)
    without = verify(symmetric, "--no-symmetry")
    print(row("ref-symmetric", with_symmetry))
    print(row("ref-symmetric --no-symmetry", without))
    ratio = without["states"] / with_symmetry["states"]
    print(
        f"symmetry: {ratio:.1f}x fewer states (target {TARGET_SYMMETRY_RATIO}x: "
        f"{'met' if ratio >= TARGET_SYMMETRY_RATIO else 'NOT met'})"
    )
    if "--quick" not in sys.argv:
        print("\nEach reduction alone on the reference workstation scenario:")
        print(header)
        workstation = VERIFY / "ref-workstation.yaml"
        for flags in ([], ["--no-symmetry"], ["--no-independence"], ["--no-symmetry", "--no-independence"]):
            print(row("ref-workstation " + " ".join(flags), verify(workstation, *flags)))

    if "--large" in sys.argv:
        print("\nLarger scenarios (minutes):")
        print(header)
        for path in sorted((VERIFY / "large").glob("*.yaml")):
            print(row(path.stem, verify(path)))

    print("\nLegacy flaws, time to the shortest counterexample:")
    print(header)
    for path in sorted((VERIFY / "legacy").glob("*.yaml")):
        print(row(path.stem, verify(path)))

    if "--breakdown" in sys.argv:
        breakdown(VERIFY / "ref-workstation.yaml")


# What a transition is made of, by the explorer's and toolstack's own functions.
PARTS = {
    "restore a state (platform and ledger)": "load",
    "the toolstack's step (advance or begin)": ("advance", "begin"),
    "snapshot the result": "capture",
    "symmetry: canonical renaming": "_canonical",
    "invariants (once per platform and ledger)": "_check",
    "what may happen next": "actions",
}


def breakdown(path: Path) -> None:
    import cProfile
    import pstats

    from pciguard.formats.scenario_file import load_scenario
    from pciguard.verify.explorer import Explorer

    explorer = Explorer(load_scenario(path))
    profile = cProfile.Profile()
    result = profile.runcall(explorer.run)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(t for (_, _, name), (_, _, _, t, _) in stats.items() if name == "run")
    print(f"\nWhere the time goes ({path.stem}, {result.stats.transitions:,} transitions, under cProfile):")
    for label, names in PARTS.items():
        wanted = (names,) if isinstance(names, str) else names
        spent = sum(
            cumulative
            for (filename, _, name), (_, _, _, cumulative, _) in stats.items()
            if name in wanted and ("explorer" in filename or "toolstack" in filename)
        )
        print(f"  {label:<44} {spent / total:6.1%}")


if __name__ == "__main__":
    main()
