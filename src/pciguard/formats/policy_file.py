"""Policy files: the rule language of ``pciguard.policy.rules``, read from disk."""

from __future__ import annotations

from pathlib import Path

from pciguard.formats.yamlpos import read_input
from pciguard.policy.rules import Policy, parse_policy


def load_policy(path: str | Path) -> Policy:
    """A rules file; a missing or unreadable one is an InputError naming it."""
    return parse_policy(read_input(Path(path), "policy file"), str(path))
