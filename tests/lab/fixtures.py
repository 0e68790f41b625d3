"""The lab's fixtures, a plugin tests/conftest.py loads: every machine boots once per
test session, as many at a time as the host has cores (one virtual CPU each), and
each test reads what its guest brought back.

Without QEMU and no way to install it (not root), the lab tests are skipped with the
reason; with ``PCIGUARD_LAB=required`` (as in CI) that is a failure instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from lab.kit import LabUnavailable, prepare
from lab.machines import MACHINES, Outcome, Runs


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    try:
        kit = prepare()
    except LabUnavailable as exc:
        if os.environ.get("PCIGUARD_LAB") == "required":
            pytest.fail(f"the lab is required but cannot run: {exc}")
        pytest.skip(f"lab unavailable: {exc}")
    running = Runs(kit, MACHINES, tmp_path_factory.mktemp("lab"))
    yield running
    running.stop()


def _outcome(lab: Runs, name: str) -> Outcome:
    outcome = lab.outcome(name)
    assert outcome.result is not None, (
        f"guest {name} brought nothing back (exit {outcome.exit_code}); console:\n{outcome.console[-4000:]}"
    )
    return outcome


def _machine(fixture: str, machine: str) -> Any:
    """A fixture giving what ``machine`` brought back."""

    def outcome(lab: Runs) -> Outcome:
        return _outcome(lab, machine)

    return pytest.fixture(name=fixture)(outcome)


topologies = _machine("topologies", "topologies")
passthrough = _machine("passthrough", "iommu-pt")
no_intremap = _machine("no_intremap", "intremap-off")
hotplug = _machine("hotplug", "hotplug")
xen = _machine("xen", "xen")
xen_scratch = _machine("xen_scratch", "xen-scratch")
xen_hotplug = _machine("xen_hotplug", "xen-hotplug")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The lab's own closing line, whatever else the session ran."""
    counts = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        reports = terminalreporter.stats.get(outcome, [])
        counts[outcome] = sum(
            1 for r in reports if getattr(r, "when", "call") in ("call", "setup") and _in_lab(r.nodeid)
        )
    if any(counts.values()):
        failed = counts["failed"] + counts["error"]
        line = f"lab: {counts['passed']} passed, {failed} failed"
        terminalreporter.write_line(line + (f", {counts['skipped']} skipped" if counts["skipped"] else ""))


def _in_lab(nodeid: str) -> bool:
    return nodeid.split("::", 1)[0].replace("\\", "/").startswith("tests/lab/") or nodeid.startswith("lab/")
