"""README's sample outputs are what the commands print today.

A sample is a fenced block right after a line ``<!-- sample: ARGS -->`` (ARGS are
pciguard's arguments, run from the checkout at 100 columns). In a sample, a line whose
text starts with ``...`` stands for any number of lines, and ``…`` inside a line for
any text (timings, this machine's name); spacing and where lines break do not count."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES

CHECKOUT = EXAMPLES.parent
README = CHECKOUT / "README.md"
SAMPLE = re.compile(r"<!-- sample: (?P<args>.+?) -->\n+```[a-z]*\n(?P<body>.*?)```", re.S)


def samples() -> list[tuple[str, str]]:
    return [(m["args"], m["body"]) for m in SAMPLE.finditer(README.read_text())]


def matches(sample: str, output: str) -> bool:
    """Word for word; where lines break does not count (it moves with the width of
    the timings a line holds)."""
    parts = []
    for line in sample.strip().splitlines():
        if line.strip().startswith("..."):
            parts.append(r"(?:.*?\s)?")  # any lines, or none
        else:
            words = (".*?".join(re.escape(p) for p in word.split("…")) for word in line.split())
            parts.append(r"\s+".join(words) + r"\s+")
    return re.fullmatch("".join(parts), output.strip() + "\n", re.S) is not None


def test_readme_has_samples() -> None:
    assert len(samples()) >= 4


@pytest.mark.parametrize(("args", "body"), samples(), ids=[a for a, _ in samples()])
def test_a_readme_sample_is_what_the_command_prints(args: str, body: str, tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "100", "TERM": "dumb"}
    run = subprocess.run(
        [sys.executable, "-m", "pciguard", *shlex.split(args)],
        cwd=CHECKOUT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    for written in CHECKOUT.glob("*-counterexample.yaml"):  # verify writes one where it runs
        written.unlink()
    output = run.stdout + run.stderr
    assert matches(body, output), f"README's sample of `pciguard {args}` is out of date; it prints:\n{output}"


def test_elision_matches_only_what_it_should() -> None:
    assert matches("a\n...\nd\n", "a\nb\nc\nd\n")
    assert matches("x … z\n", "x anything z\n")
    assert not matches("a\nd\n", "a\nb\nd\n")
    assert not matches("x … z\n", "x anything y\n")
    assert matches("a b;\nc d\n", "a b; c\nd\n")  # wrapped elsewhere: the same words
    assert not matches("a b c\n", "a bc\n")
