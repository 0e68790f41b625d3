#!/usr/bin/env python3
"""Verifier figures: time to verdict, distinct states, transitions, CPU seconds and
peak memory on the reference suite (every reduction on) as ``pciguard verify`` runs it
by default (``--workers auto``: a search hands over to one worker per core once it has
run a fifth of a second; several scenarios run one per core at once, in the order given
and with the largest first) and in one process (``--workers 1``), each reduction on and
off in one process (and the search as Python, when it runs compiled), the symmetry
reduction on the symmetric scenario, the suite again with workers from the start (at
least two: one scenario's states shared among them, or as many scenarios at once), the
large scenarios, and each legacy flaw's time to its counterexample. Targets (this 2-core
machine, idle): ref-workstation in at most 2 s, the suite in at most 4 s,
examples/verify/large/aliases.yaml in at most 20 s, and each other large scenario a
verdict within ten minutes, or at least ten million states in them within 4 GiB.

Each run is its own `pciguard verify --json` process, so its memory and CPU are its own
(its workers' included); the suite is also run as one `pciguard verify` of every
scenario (its wall time is the suite's time to verdict), and ref-workstation alone and
as two searches at once, in one process each (how much the cores slow each other).
Compiled modules are kept between runs.
Usage: python3 bench/verify.py [--quick] [--large] [--orbits] [--breakdown]
  --quick skips the per-reduction comparison (and the run without remembered
  outcomes, --no-memo); --large adds examples/verify/large/
  (with workers, each stopped after ten minutes);
  --orbits counts the exact orbits of ref-workstation's states under its symmetries
  (every state without the symmetry reduction, merged with its renamings), to show how
  far the symmetry reduction's canonical forms are from exact;
  --breakdown also shows where a transition's time goes (the workstation scenario
  under cProfile, which slows every call alike).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERIFY = ROOT / "examples" / "verify"
TARGETS = {"ref-workstation": 2.0, "suite": 4.0, "aliases": 20.0}  # seconds to a verdict
TARGET_SYMMETRY_RATIO = 10
REDUCTIONS = ("symmetry", "independence", "messages", "budget")
WORKERS = max(2, min(4, os.cpu_count() or 1))
PARALLEL = ("--workers", str(WORKERS))
ONE_PROCESS = ("--workers", "1")
LARGE_LIMIT = 600  # seconds: the large scenarios' target is a verdict within ten minutes
TARGET_STATES, TARGET_MIB = 10_000_000, 4096  # or, in those ten minutes, so many states within 4 GiB


# Compiled modules are kept (as an installed package has them), not compiled again by
# every run, whatever PYTHONDONTWRITEBYTECODE says; the first run compiles them.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {
    "PYTHONPYCACHEPREFIX": str(Path(tempfile.gettempdir()) / "pciguard-bench-pycache")
}


def verify(path: Path, *flags: str, as_python: bool = False) -> dict[str, object]:
    """One run: its JSON verdict, with the wall and CPU time of the whole process
    (``as_python``: the verifier's compiled modules left unused)."""
    result = verify_all([path], "--out", "/dev/null", *flags, as_python=as_python)
    return result[0] | {"wall": result[0]["process_wall"], "cpu": result[0]["process_cpu"]}


def verify_command(paths: list[Path], *flags: str) -> list[str]:
    return [sys.executable, "-m", "pciguard.cli.main", "verify", *map(str, paths), "--json", *flags]


def verify_all(paths: list[Path], *flags: str, as_python: bool = False) -> list[dict[str, object]]:
    """One ``pciguard verify`` process exploring ``paths`` in turn: each one's JSON
    verdict, each with the wall and CPU time of the whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    command = verify_command(paths, *flags)
    env = CHILD_ENV | {"PCIGUARD_COMPILED": "0"} if as_python else CHILD_ENV
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1, 4):  # 4: incomplete (a limit stopped it)
        raise SystemExit(f"{' '.join(p.name for p in paths)}: exit {done.returncode}\n{done.stderr}")
    found = json.loads(done.stdout)
    results: list[dict[str, object]] = found if isinstance(found, list) else [found]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return [r | {"process_wall": wall, "process_cpu": cpu} for r in results]


HEADER = (
    f"{'scenario':<44} {'verdict':<10} {'to verdict':>10} {'states':>9} {'transitions':>11} "
    f"{'CPU s':>7} {'MiB':>6}"
)


def row(name: str, r: dict[str, object]) -> str:
    return (
        f"{name:<44} {r['verdict']:<10} {r['wall']:>9.2f}s {r['states']:>9,} {r['transitions']:>11,} "
        f"{r['cpu']:>7.2f} {r['peak_rss_mib']:>6}"
    )


def against(what: str, seconds: float) -> str:
    target = TARGETS[what]
    verdict = "met" if seconds <= target else "NOT met"
    return f"{what}: {seconds:.1f} s to a verdict (target {target:g} s: {verdict})"


def breadth(name: str, r: dict[str, object]) -> str:
    """A search a limit stopped against the target for ten minutes' search: so many
    distinct states within so much memory (every worker's peak, in all)."""
    states, mib = int(r["states"]), float(r["peak_rss_mib"])  # type: ignore[call-overload, arg-type]
    met = states >= TARGET_STATES and mib <= TARGET_MIB
    return (
        f"{name}: {states:,} states within {mib:,.0f} MiB "
        f"(target {TARGET_STATES:,} within {TARGET_MIB:,} MiB: {'met' if met else 'NOT met'})"
    )


def reference_suite(*flags: str) -> dict[str, dict[str, object]]:
    """Every reference scenario run with ``flags``: a row each, then the suite's total
    and ref-workstation against their targets."""
    print(HEADER)
    suite = {}
    shown = " ".join(flags)
    for path in sorted(VERIFY.glob("ref-*.yaml")):
        suite[path.stem] = verify(path, *flags)
        print(row(f"{path.stem} {shown}".rstrip(), suite[path.stem]))
    total = sum(float(r["wall"]) for r in suite.values())  # type: ignore[arg-type]
    states = sum(int(r["states"]) for r in suite.values())  # type: ignore[call-overload]
    name = f"suite{', ' + shown if shown else ''}"
    print(f"{name}: {states:,} states; {total:.1f} s as one process per scenario")
    by_name = sorted(VERIFY.glob("ref-*.yaml"))
    with tempfile.TemporaryDirectory() as scratch:  # where counterexamples would go
        together = verify_all(by_name, "--out", scratch, *flags)
    wall = float(together[0]["process_wall"])  # type: ignore[arg-type]
    print(f"{name}, one `pciguard verify` of every scenario: " + against("suite", wall))
    if flags != ONE_PROCESS:  # scenarios start in the order given: the largest first ends soonest
        largest_first = sorted(by_name, key=lambda p: -float(suite[p.stem]["wall"]))  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory() as scratch:
            together = verify_all(largest_first, "--out", scratch, *flags)
        wall = float(together[0]["process_wall"])  # type: ignore[arg-type]
        print(f"{name}, the same, the largest first: " + against("suite", wall))
    print(against("ref-workstation", float(suite["ref-workstation"]["wall"])))  # type: ignore[arg-type]
    return suite


def main() -> None:
    first = verify(VERIFY / "ref-symmetric.yaml")  # compiles the modules once (see CHILD_ENV)
    compiled = first["compiled"]
    print("The verifier runs " + ("compiled" if compiled else f"as Python: {first['why_not_compiled']}"))
    print("Reference suite, every reduction on, as `pciguard verify` runs it (--workers auto):")
    reference_suite()
    print("\nThe same in one process (--workers 1):")
    suite = reference_suite(*ONE_PROCESS)

    print("\nSymmetry on the symmetric scenario:")
    print(HEADER)
    symmetric = VERIFY / "ref-symmetric.yaml"
    with_symmetry, without = verify(symmetric), verify(symmetric, "--no-symmetry")
    print(row("ref-symmetric", with_symmetry))
    print(row("ref-symmetric --no-symmetry", without))
    ratio = int(without["states"]) / int(with_symmetry["states"])  # type: ignore[call-overload]
    print(
        f"symmetry: {ratio:.1f}x fewer states (target {TARGET_SYMMETRY_RATIO}x: "
        f"{'met' if ratio >= TARGET_SYMMETRY_RATIO else 'NOT met'})"
    )
    if "--quick" not in sys.argv:
        print("\nEach reduction left out, and all of them, on ref-workstation (one process):")
        print(HEADER)
        workstation = VERIFY / "ref-workstation.yaml"
        print(row("ref-workstation (every reduction)", suite["ref-workstation"]))
        for flags in ([f"--no-{r}"] for r in REDUCTIONS):
            print(row("ref-workstation " + " ".join(flags), verify(workstation, *ONE_PROCESS, *flags)))
        none = (f"--no-{r}" for r in REDUCTIONS)
        print(row("ref-workstation, none", verify(workstation, *ONE_PROCESS, *none)))
        # Not a reduction: the same states, each transition's outcome reused or run.
        print(row("ref-workstation --no-memo", verify(workstation, *ONE_PROCESS, "--no-memo")))
        if compiled:  # the same modules, run as Python
            print(row("ref-workstation, as Python", verify(workstation, *ONE_PROCESS, as_python=True)))

    print(
        f"\nThe reference suite with {WORKERS} workers from the start (each scenario alone: its "
        f"states shared among them; together: {WORKERS} scenarios at once, one process each):"
    )
    reference_suite(*PARALLEL)
    side_by_side(VERIFY / "ref-workstation.yaml")

    if "--large" in sys.argv:
        print(f"\nLarger scenarios ({WORKERS} workers, at most {LARGE_LIMIT // 60} minutes each):")
        print(HEADER)
        for path in sorted((VERIFY / "large").glob("*.yaml")):
            large = verify(path, *PARALLEL, "--time-limit", str(LARGE_LIMIT))
            print(row(path.stem, large))
            if path.stem in TARGETS:
                print(against(path.stem, float(large["wall"])))  # type: ignore[arg-type]
            elif large["verdict"] == "incomplete":
                print(f"{path.stem}: no verdict within {LARGE_LIMIT // 60} minutes (target: a verdict)")
                print(breadth(path.stem, large))

    print("\nLegacy flaws, time to the shortest counterexample:")
    print(HEADER)
    for path in sorted((VERIFY / "legacy").glob("*.yaml")):
        print(row(path.stem, verify(path)))

    if "--orbits" in sys.argv:
        orbits(VERIFY / "ref-workstation.yaml")
    if "--breakdown" in sys.argv:
        breakdown(VERIFY / "ref-workstation.yaml")


def side_by_side(path: Path) -> None:
    """The same search alone, then as one process per worker at once, right after: how
    much slower each runs when every core is busy (what the workers can gain is
    bounded by it)."""
    command = verify_command([path], "--out", "/dev/null", *ONE_PROCESS)
    alone = float(verify(path, *ONE_PROCESS)["wall"])  # type: ignore[arg-type]
    started = time.perf_counter()
    both = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=ROOT, env=CHILD_ENV) for _ in range(WORKERS)
    ]
    walls = []
    for process in both:
        process.wait()
        walls.append(time.perf_counter() - started)
    slower = max(walls) / alone
    print(
        f"{path.stem}: {alone:.2f} s alone, {' and '.join(f'{w:.2f}' for w in walls)} s as {WORKERS} "
        f"at once ({slower:.2f}x): {WORKERS} workers take it at best to {slower / WORKERS:.0%} of one process"
    )


def orbits(path: Path) -> None:
    """States without symmetry, each merged with its images under every renaming of
    interchangeable VMs (and devices): the exact count the reduction could reach."""
    import itertools

    from pciguard.formats.scenario_file import load_scenario
    from pciguard.verify.explorer import Explorer, Symmetry, rename

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "verify")]  # the tests' brute force
    from test_explorer import brute_force_states

    scenario = load_scenario(path)
    plain = Explorer(scenario, symmetry=False)
    seen = brute_force_states(plain)
    classes = Symmetry(scenario, plain.explore.devices)
    groups = [*classes.vm_classes, *classes.device_classes]
    renamings = [
        {a: b for names, order in zip(groups, choice, strict=True) for a, b in zip(names, order, strict=True)}
        for choice in itertools.product(*(itertools.permutations(g) for g in groups))
    ]
    exact = len({frozenset(rename(s, r) for r in renamings) for s in seen})
    reduced = Explorer(scenario, budget=False).run().stats.states  # symmetry's own count
    print(
        f"\n{path.stem}: {len(seen):,} states without symmetry, {exact:,} exact orbits, "
        f"{reduced:,} with the symmetry reduction ({reduced - exact:,} more than exact)"
    )


# What a transition is made of, by the explorer's, memo's and toolstack's own functions.
PARTS = {
    "restore a state (platform and ledger)": "load",
    "run the toolstack's step (outcome not known)": "_run_action",
    "find and make a remembered outcome": ("find", "after"),
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
            if name in wanted and any(part in filename for part in ("explorer", "memo", "toolstack"))
        )
        print(f"  {label:<44} {spent / total:6.1%}")


if __name__ == "__main__":
    main()
