#!/usr/bin/env python3
"""A longer fuzzing run of every parser and decoder of outside input (the targets of
tests/fuzzing.py, which the test suite runs 300 inputs each): N inputs per target,
printing inputs per second and any input that raised something other than the target's
typed error (with the input, so it can be made a regression test).

Usage: python3 bench/fuzz.py [--examples N] [--target NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fuzzing import fuzz, targets  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20_000, help="inputs per target")
    parser.add_argument("--target", help="only this target (by name)")
    args = parser.parse_args()
    crashed = 0
    print(f"{'target':16} {'inputs':>8} {'seconds':>8} {'inputs/s':>9}  result")
    for target in targets():
        if args.target and target.name != args.target:
            continue
        result = fuzz(target, args.examples)
        crashed += result.crash is not None
        rate = result.inputs / result.seconds
        said = result.crash or "no crash"
        print(f"{target.name:16} {result.inputs:>8} {result.seconds:>8.1f} {rate:>9.0f}  {said}")
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
