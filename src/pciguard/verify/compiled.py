"""Which of the verifier's modules run compiled, and when.

The build (``setup.py``) compiles the modules named here with mypyc, where the machine
can, into ``_compiled/`` beside them, with a stamp of every source of the package it was
built from. ``use_compiled`` puts that directory first on the package's path only while
the stamp matches the sources as they are: an edited checkout, or a build that failed,
runs the same modules as Python. ``PCIGUARD_COMPILED=0`` always runs them as Python;
under ``PCIGUARD_COMPILED=required`` a search refuses to start as Python (``required``).

This module is pure Python and imports nothing of pciguard: the build reads it too.
"""

from __future__ import annotations

import hashlib
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

#: The hot modules of a search (the toolstack and platforms are never compiled: the
#: verifier runs the product's own, as a host does).
COMPILED = ("pciguard.verify.memo", "pciguard.verify.explorer")
OUTPUT = Path("pciguard", "verify", "_compiled")  # under the directory holding the package
STAMP = "SOURCES"
SWITCH = "PCIGUARD_COMPILED"


def sources_stamp(root: Path) -> str:
    """A digest of every Python source of the package under ``root`` (the directory
    holding ``pciguard``), by path and content."""
    digest = hashlib.sha256()
    for path in sorted((root / "pciguard").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def why_not_compiled(package_dir: Path) -> str | None:
    """None if the compiled modules beside ``package_dir`` (``pciguard/verify``) match
    its sources; else why they are not used."""
    if os.environ.get(SWITCH) == "0":
        return f"{SWITCH}=0"
    stamp = package_dir / OUTPUT.name / STAMP
    try:
        built_from = stamp.read_text().strip()
    except OSError:
        return "not compiled by this install (no C compiler or Python headers when installed?)"
    if built_from != sources_stamp(package_dir.parent.parent):
        return "the sources changed since they were compiled (install again to compile them)"
    for module in COMPILED:
        name = module.rpartition(".")[2]
        if not any((stamp.parent / (name + suffix)).exists() for suffix in EXTENSION_SUFFIXES):
            return f"the compiled {module} is missing (install again to compile it)"
    return None


def use_compiled(package_path: list[str]) -> str | None:
    """Put the compiled modules first on ``package_path`` (``pciguard.verify.__path__``)
    if they may be used; return why not otherwise."""
    package_dir = Path(package_path[0])
    reason = why_not_compiled(package_dir)
    if reason is None:
        package_path.insert(0, str(package_dir / OUTPUT.name))
    return reason


def required(reason: str | None) -> str | None:
    """Why a search must not start (``PCIGUARD_COMPILED=required`` and the verifier runs
    as Python for ``reason``), or None."""
    if reason is None or os.environ.get(SWITCH) != "required":
        return None
    return f"{SWITCH}=required, but the verifier would run as Python: {reason}"
