"""The compiled verifier: used only while it was built from the sources as they are, and
reaching exactly what the same modules reach as Python."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import pciguard.verify as verify_package
from conftest import EXAMPLES
from pciguard.cli.main import app
from pciguard.verify import NOT_COMPILED, compiled
from pciguard.verify.compiled import OUTPUT, STAMP, SWITCH, required, sources_stamp, use_compiled

VERIFY = EXAMPLES / "verify"
SOURCES = Path(compiled.__file__).resolve().parents[2]  # the directory holding pciguard


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the package's sources, with ``pciguard/verify/_compiled`` stamped as
    built from them (empty stand-ins for the compiled modules)."""
    monkeypatch.delenv(SWITCH, raising=False)
    shutil.copytree(
        SOURCES / "pciguard", tmp_path / "pciguard", ignore=shutil.ignore_patterns("_compiled", "*.so")
    )
    built = tmp_path / OUTPUT
    built.mkdir()
    for module in compiled.COMPILED:
        (built / (module.rpartition(".")[2] + ".cpython-311-x86_64-linux-gnu.so")).touch()
        (built / (module.rpartition(".")[2] + ".so")).touch()
    (built / STAMP).write_text(sources_stamp(tmp_path))
    return tmp_path / "pciguard" / "verify"


def test_a_build_matching_its_sources_comes_first_on_the_package_path(package: Path) -> None:
    path = [str(package)]
    assert use_compiled(path) is None
    assert path == [str(package / OUTPUT.name), str(package)]


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: (p.parent / "toolstack.py").write_text("# edited\n", encoding="utf-8"),
        lambda p: (p / "new.py").write_text("", encoding="utf-8"),
        lambda p: (p / OUTPUT.name / STAMP).unlink(),
        lambda p: [m.unlink() for m in (p / OUTPUT.name).glob("explorer*")],
    ],
    ids=["a-source-edited", "a-source-added", "no-stamp", "a-module-missing"],
)
def test_a_stale_or_partial_build_is_left_alone(package: Path, edit: object) -> None:
    edit(package)  # type: ignore[operator]
    path = [str(package)]
    reason = use_compiled(path)
    assert reason is not None and path == [str(package)]


def test_switched_off_it_runs_as_python_and_required_refuses_that(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SWITCH, "0")
    path = [str(package)]
    assert use_compiled(path) == f"{SWITCH}=0" and path == [str(package)]
    assert required("a reason") is None  # only "required" refuses
    monkeypatch.setenv(SWITCH, "required")
    assert "a reason" in str(required("a reason"))
    assert required(None) is None


def test_required_refuses_to_search_as_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_package, "NOT_COMPILED", "not compiled by this install")
    monkeypatch.setenv(SWITCH, "required")
    done = CliRunner().invoke(app, ["verify", str(VERIFY / "ref-symmetric.yaml")])
    assert done.exit_code == 2
    assert "PCIGUARD_COMPILED=required" in done.output and "not compiled by this install" in done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)


def _build_script() -> Any:
    """The project's setup.py as a module (imported, it builds nothing)."""
    spec = importlib.util.spec_from_file_location("pciguard_build", SOURCES.parent / "setup.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


@pytest.mark.parametrize(
    "refusal",
    [SystemExit(1), RuntimeError("unable to execute 'gcc'")],
    ids=["mypyc-exits-on-a-type-error", "no-compiler"],
)
def test_a_build_that_cannot_compile_installs_the_modules_as_python(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], refusal: BaseException
) -> None:
    def mypycify(*args: object, **kwargs: object) -> list[object]:
        raise refusal

    monkeypatch.setitem(sys.modules, "mypyc.build", types.SimpleNamespace(mypycify=mypycify))
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    monkeypatch.delenv("PCIGUARD_COMPILE", raising=False)
    assert _build_script().compiled_extensions() == []
    assert "the verifier runs as Python" in capsys.readouterr().err


SAME_AS_PYTHON = [
    *sorted((VERIFY / "legacy").glob("*.yaml")),
    VERIFY / "ref-symmetric.yaml",
    VERIFY / "ref-teardown-race.yaml",
    VERIFY / "ref-aliases.yaml",
]


SEARCHED = ("scenario", "verdict", "states", "transitions", "depth")


def verdicts(env: dict[str, str], out: Path) -> list[dict[str, Any]]:
    """Each scenario's report: what the search reached, whether it ran compiled, and
    each counterexample's trace."""
    out.mkdir()
    paths = [str(p) for p in SAME_AS_PYTHON]
    done = subprocess.run(
        [sys.executable, "-m", "pciguard", "verify", "--json", "--out", str(out), *paths],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    reports = json.loads(done.stdout)
    assert len(reports) == len(paths), done.stderr
    return [
        {key: r[key] for key in SEARCHED}
        | {"compiled": r["compiled"], "trace": r["counterexample"] and r["counterexample"]["trace"]}
        for r in reports
    ]


def test_compiled_it_reaches_what_it_reaches_as_python(tmp_path: Path) -> None:
    """Same verdicts, states, transitions and counterexamples, legacy flaws included.
    Skipped where the verifier runs as Python, unless PCIGUARD_COMPILED=required (CI)."""
    if NOT_COMPILED is not None:
        refusal = required(NOT_COMPILED)
        if refusal is not None:
            pytest.fail(refusal)
        pytest.skip(f"the verifier runs as Python here: {NOT_COMPILED}")
    env = {k: v for k, v in os.environ.items() if k != SWITCH}
    fast = verdicts(env, tmp_path / "compiled")
    slow = verdicts(env | {SWITCH: "0"}, tmp_path / "python")
    assert [r.pop("compiled") for r in fast] == [True] * len(fast)
    assert [r.pop("compiled") for r in slow] == [False] * len(slow)
    assert fast == slow
    assert {r["verdict"] for r in fast} == {"violation", "pass"}
