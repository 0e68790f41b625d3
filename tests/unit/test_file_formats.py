"""Platform and scenario files: every bundled example loads; every file of the bad
corpus fails with the error and the place its header names."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CORPUS, EXAMPLES, header
from pciguard.errors import InputError
from pciguard.formats.platform_file import load_platform, parse_platform
from pciguard.formats.scenario_file import load_scenario

BAD_PLATFORMS = sorted((CORPUS / "platform" / "bad").glob("*.yaml"))
BAD_SCENARIOS = sorted((CORPUS / "scenario" / "bad").glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("**/*.yaml")), ids=lambda p: p.name)
def test_bundled_files_load(path: Path) -> None:
    if {"scenarios", "verify"} & set(path.relative_to(EXAMPLES).parts):
        scenario = load_scenario(path)
        assert scenario.steps or scenario.explore
    else:
        assert len(load_platform(path).topology) > 0


@pytest.mark.parametrize("path", BAD_PLATFORMS + BAD_SCENARIOS, ids=lambda p: p.name)
def test_bad_file_gives_clear_error_with_place(path: Path) -> None:
    message, line, col = header(path)
    loader = load_scenario if path in BAD_SCENARIOS else load_platform
    with pytest.raises(InputError) as caught:
        loader(path)
    error = caught.value
    assert message in str(error)
    assert str(error).startswith(str(path))  # names the file
    if line is not None:
        assert error.line == line, str(error)
    if col is not None:
        assert error.column == col, str(error)


def test_corpora_are_not_empty() -> None:
    assert len(BAD_PLATFORMS) >= 12 and len(BAD_SCENARIOS) >= 8


def test_error_names_the_key_path() -> None:
    text = (
        "name: x\ndevices:\n  - bdf: 0000:00:01.0\n    kind: root-port\n    children:\n"
        "      - {bdf: 0000:01:00.0, kind: endpoint, acs: maybe}\n"
    )
    with pytest.raises(InputError) as caught:
        parse_platform(text, "inline.yaml")
    assert caught.value.key_path == "devices[0].children[0].acs"
    assert str(caught.value).startswith("inline.yaml:6:")


def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read the platform file"):
        load_platform(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8"):
        load_platform(binary)


def test_pci_addresses_are_not_read_as_base_60_numbers() -> None:
    host = parse_platform("name: x\ndevices:\n  - {bdf: 00:01.0, kind: rc-endpoint}\n")
    assert [str(b) for b in host.topology] == ["0000:00:01.0"]
