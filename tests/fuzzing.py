"""Fuzz targets: every parser and decoder of outside input, with the inputs to mutate
and the only exceptions each may raise (the typed errors that become a clear message).
``tests/unit/test_fuzz.py`` runs each for a few seconds; ``bench/fuzz.py`` for longer."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, ClassVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pciguard.errors import InputError, TopologyError
from pciguard.formats.lspci import parse_lspci
from pciguard.formats.platform_file import parse_platform
from pciguard.formats.scenario_file import parse_scenario
from pciguard.platforms.linux.acpi import MalformedTable, parse_dmar, parse_ivrs
from pciguard.platforms.linux.config import parse_config
from pciguard.platforms.linux.guard import handle
from pciguard.platforms.linux.snapshot import load_snapshot
from pciguard.policy.rules import parse_policy

TESTS = Path(__file__).parent
EXAMPLES = TESTS.parent / "examples"


@dataclass(frozen=True)
class Target:
    name: str
    inputs: st.SearchStrategy[Any]
    run: Callable[[Any], object]
    allowed: tuple[type[BaseException], ...]  # what it may raise: a clear, typed error


def _mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Seeds cut, spliced and overwritten at random places, and plain random bytes."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 6))):
            if not data:
                break
            at = draw(st.integers(0, len(data) - 1))
            action = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
            if action == "flip":
                data[at] = draw(st.integers(0, 255))
            elif action == "cut":
                del data[at : at + draw(st.integers(1, 64))]
            elif action == "insert":
                data[at:at] = draw(st.binary(max_size=16))
            else:
                data[at:at] = data[at : at + draw(st.integers(1, 64))]
        return bytes(data)

    return mutate() | st.binary(max_size=512)


def _text(seeds: list[bytes]) -> st.SearchStrategy[str]:
    return _mutated(seeds).map(lambda b: b.decode("utf-8", "replace"))


def _seed_files(pattern: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted(EXAMPLES.glob(pattern))][:12] or [b""]


def _config_seeds() -> list[bytes]:
    from conftest import example
    from fakesys import config_space

    host = example("server")
    return [config_space(host, b) for b in list(host.topology)[:8]]


def _acpi_seeds() -> list[bytes]:
    from conftest import example
    from fakesys import Kernel, render

    with TemporaryDirectory() as scratch:
        root = render(example("workstation"), Path(scratch) / "root", Kernel())
        return [(root / "sys/firmware/acpi/tables/DMAR").read_bytes()]


def _snapshot_seed() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in [("sys/bus/pci/devices/x", b"1\n"), ("proc/cmdline", b"intel_iommu=on\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _read_snapshot_bytes(data: bytes) -> object:
    with TemporaryDirectory() as scratch:
        path = Path(scratch) / "fuzz.tar.gz"
        path.write_bytes(data)
        return load_snapshot(path)


def _handled(line: bytes) -> None:
    class NoGuard:  # a request that parses must never reach a device here
        decisions: ClassVar[dict[str, object]] = {}

        def control(self, device: str, target: object) -> object:
            raise LookupError(f"{device} is not a device here")

    answer = handle(NoGuard(), line)  # type: ignore[arg-type]
    assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool)


def _lspci_hex(config: bytes) -> bytes:
    """One function's entry as `lspci -xxxx` prints it: 16 bytes a line after their offset."""
    lines = [
        f"{at:02x}: " + " ".join(f"{b:02x}" for b in config[at : at + 16]) for at in range(0, len(config), 16)
    ]
    return "\n".join(
        ["00:1c.0 PCI bridge [0604]: Intel Corporation Root Port [8086:a33c]", *lines, ""]
    ).encode()


def targets() -> list[Target]:
    platform_seeds = _seed_files("*.yaml")
    scenario_seeds = _seed_files("scenarios/*.yaml")
    lspci_seeds = [p.read_bytes() for p in sorted((TESTS / "corpus" / "lspci").glob("*.txt"))]
    lspci_seeds += [_lspci_hex(config) for config in _config_seeds()]  # -xxxx: read as config space
    policy_seeds = [p.read_bytes() for p in sorted((TESTS / "corpus" / "policy" / "good").glob("*.rules"))]
    requests = [b'{"op": "list"}', b'{"op": "reject", "device": "0000:03:00.0"}', b'{"op": "watch"}']
    return [
        Target("config space", _mutated(_config_seeds()), parse_config, ()),
        Target("DMAR table", _mutated(_acpi_seeds()), parse_dmar, (MalformedTable,)),
        Target("IVRS table", _mutated([b"IVRS" + bytes(60)]), parse_ivrs, (MalformedTable,)),
        Target("lspci dump", _text(lspci_seeds), parse_lspci, (InputError,)),
        Target("platform file", _text(platform_seeds), parse_platform, (InputError, TopologyError)),
        Target(
            "scenario file",
            _text(scenario_seeds),
            lambda text: parse_scenario(text, "fuzz.yaml", EXAMPLES / "scenarios"),
            (InputError, TopologyError),
        ),
        Target("policy", _text(policy_seeds), parse_policy, (InputError,)),
        Target("snapshot", _mutated([_snapshot_seed()]), _read_snapshot_bytes, (InputError,)),
        Target("guard request", _mutated(requests), _handled, ()),
    ]


@dataclass(frozen=True)
class Fuzzed:
    inputs: int
    seconds: float
    crash: str | None  # the first input that raised something else, with what it raised


def fuzz(target: Target, examples: int) -> Fuzzed:
    """Run ``target`` on ``examples`` generated inputs (Hypothesis shrinks a crash)."""
    seen = 0
    crash: list[str] = []

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(target.inputs)
    def run(data: object) -> None:
        nonlocal seen
        seen += 1
        try:
            target.run(data)
        except target.allowed:
            pass
        except Exception as exc:
            crash[:] = [f"{type(exc).__name__}: {exc} on {data!r:.300}"]
            raise

    started = time.monotonic()
    try:
        run()
    except Exception:
        if not crash:
            raise
    return Fuzzed(seen, time.monotonic() - started, crash[0] if crash else None)
