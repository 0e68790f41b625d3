"""Hostile sysfs trees and snapshot tarballs (``tests/hostile.py``): each gives findings
or a clear refusal within seconds, never reads or writes outside its root, and never
judges a group it cannot see clearly as isolated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import hostile
from conftest import as_nobody, audit_reading
from pciguard.errors import InputError
from pciguard.platforms.linux import read_host
from pciguard.platforms.linux import snapshot as snapshot_module
from pciguard.platforms.linux.snapshot import load_snapshot, read_snapshot, take_snapshot
from pciguard.report import Verdict, report_json

GPU = "0000:01:00.0"


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def _judge(root: Path) -> str:
    """What the audit makes of the tree, as JSON: findings, the GPU's verdicts."""
    with deadline(20):
        reading = read_host(str(root))
        report = audit_reading(reading)
        report_json(report)  # and the report can be written out
    said = [str(p) for p in (*reading.facts.problems, *reading.facts.unreadable)]
    gpu = next((b for b in reading.host.topology if str(b) == GPU), None)
    return json.dumps(
        {
            "said": said,
            "gpu": [g.verdict.value for g in report.groups if GPU in [m.bdf for m in g.members]],
            "translated": gpu is not None and reading.host.dma_translated(gpu),
        }
    )


def _judged(root: Path, case: hostile.HostileTree) -> dict[str, object]:
    if case.as_user:
        if os.geteuid() != 0:
            pytest.skip("needs root to drop to another user")
        for path in (root, *root.parents):
            if str(path).startswith("/tmp/"):
                os.chmod(path, 0o755)
        answer = as_nobody(lambda: _judge(root))
    else:
        answer = _judge(root)
    return json.loads(answer)  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", hostile.TREES, ids=lambda c: c.name)
def test_a_hostile_tree_gives_findings_in_bounded_time(
    tree: Callable[..., Path], outside: Path, case: hostile.HostileTree
) -> None:
    if case.needs_root and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    root = tree("workstation")
    case.damage(root, outside)
    judged = _judged(root, case)
    assert judged["said"], "the damage went unnoticed"
    assert "SECRET" not in json.dumps(judged)


@pytest.mark.parametrize(
    "case",
    [c for c in hostile.TREES if c.name.startswith(("type-", "group-", "listed"))],
    ids=lambda c: c.name,
)
def test_a_group_pciguard_cannot_see_clearly_is_not_assignable(
    tree: Callable[..., Path], outside: Path, case: hostile.HostileTree
) -> None:
    root = tree("workstation", domain="identity")  # iommu=pt: only a translating domain would isolate
    case.damage(root, outside)
    judged = _judged(root, case)
    assert judged["gpu"] and all(v == Verdict.NOT_ASSIGNABLE for v in judged["gpu"])  # type: ignore[union-attr]
    assert judged["translated"] is False


def test_a_link_out_of_the_root_is_never_read_nor_packed(
    tree: Callable[..., Path], outside: Path, tmp_path: Path
) -> None:
    root = tree("workstation")
    hostile.TREES_BY_NAME["config-outside"].damage(root, outside)
    hostile.TREES_BY_NAME["device-outside"].damage(root, outside)
    summary = take_snapshot(str(root), tmp_path / "snap.tar.gz")
    with tarfile.open(summary.path) as tar:
        blobs = [tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
    assert not any(b"SECRET" in blob for blob in blobs)


@pytest.mark.parametrize("case", hostile.SNAPSHOTS, ids=lambda c: c.name)
def test_a_hostile_snapshot_is_refused_by_name(
    tmp_path: Path, outside: Path, case: hostile.HostileSnapshot
) -> None:
    path = tmp_path / "hostile.tar.gz"
    path.write_bytes(case.make(outside))
    with deadline(20), pytest.raises(InputError, match=case.refusal) as info:
        read_snapshot(path)
    assert str(path) in str(info.value)
    assert list(outside.iterdir()) == []


def test_a_link_then_a_write_through_it_lands_nowhere(tmp_path: Path, outside: Path) -> None:
    """The CVE-2025-4517 shape. The snapshot is read in memory: nothing is unpacked, so
    nothing can land outside, on any Python (3.11.2 has no extraction filters at all)."""
    path = tmp_path / "escape.tar.gz"
    path.write_bytes(hostile.ESCAPES["escape-then-write"](outside))
    fs = load_snapshot(path)
    assert fs.read_bytes("sys/a/pwned") is None and fs.read_bytes("sys/b/pwned2") is None
    assert list(outside.iterdir()) == []


def test_reading_a_snapshot_never_unpacks_it(
    tree: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = take_snapshot(str(tree("workstation")), tmp_path / "snap.tar.gz").path

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("extraction must not be used")

    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)
    monkeypatch.setattr(tarfile.TarFile, "extract", refuse)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    assert read_snapshot(snap).host.topology
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(
    ("limit", "value", "make", "message"),
    [
        ("MAX_MEMBERS", 100, lambda: hostile._many_members(150), "more than 100 members"),
        (
            "MAX_CONTENT",
            1 << 16,
            lambda: hostile._tar([hostile._file(f"sys/f{i}", bytes(4096)) for i in range(20)]),
            "MiB of files",
        ),
        ("MAX_STREAM", 1 << 16, lambda: hostile._many_members(300), "unpacks to more than"),
    ],
)
def test_snapshot_limits_hold(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limit: str,
    value: int,
    make: Callable[[], bytes],
    message: str,
) -> None:
    monkeypatch.setattr(snapshot_module, limit, value)
    path = tmp_path / "big.tar.gz"
    path.write_bytes(make())
    with pytest.raises(InputError, match=message):
        load_snapshot(path)


def test_the_cli_says_what_is_wrong_with_a_snapshot(tmp_path: Path, outside: Path) -> None:
    for case in hostile.SNAPSHOTS:
        path = tmp_path / f"{case.name}.tar.gz"
        path.write_bytes(case.make(outside))
        run = subprocess.run(
            [sys.executable, "-m", "pciguard", "audit", "--snapshot", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, (case.name, run.stderr)
        assert "Traceback" not in run.stderr and str(path) in run.stderr, (case.name, run.stderr)


def test_tens_of_thousands_of_members_are_read_quickly(tmp_path: Path) -> None:
    path = tmp_path / "many.tar.gz"
    path.write_bytes(hostile._many_members(30_000))
    started = time.monotonic()
    with deadline(60):
        read_snapshot(path)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("json_output", [True, False])
def test_undecodable_names_print_as_escapes(
    tree: Callable[..., Path], outside: Path, json_output: bool
) -> None:
    root = tree("workstation")
    hostile.TREES_BY_NAME["undecodable-names"].damage(root, outside)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pciguard",
            "audit",
            "--root",
            str(root),
            *(["--json"] if json_output else []),
        ],
        capture_output=True,
        timeout=60,
    )
    assert run.returncode in (0, 1), run.stderr
    assert b"Traceback" not in run.stderr and b"\x1b" not in run.stdout
    assert b"\\x1b" in run.stdout or b"\\\\x1b" in run.stdout
