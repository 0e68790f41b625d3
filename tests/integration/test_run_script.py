"""``run.sh``, the README's two commands: its refusals, and the audit through it in the
virtual environment the tests run in (``sh run.sh test`` made it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import EXAMPLES

CHECKOUT = EXAMPLES.parent


def run_sh(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(CHECKOUT / "run.sh"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def test_an_unknown_job_is_a_usage_error() -> None:
    run = run_sh("deploy")
    assert run.returncode == 2 and "usage: sh run.sh audit" in run.stderr


def test_a_python_older_than_3_11_is_refused_by_name(tmp_path: object) -> None:
    run = run_sh("audit", PYTHON="false")
    assert run.returncode == 2 and "needs Python 3.11 or newer" in run.stderr


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="runs in the venv of `sh run.sh test`")
def test_the_audit_command_installs_and_audits_this_host() -> None:
    run = run_sh("audit", "--json", VIRTUAL_ENV=sys.prefix)
    assert run.returncode in (0, 1), run.stderr
    assert '"schema_version"' in run.stdout
