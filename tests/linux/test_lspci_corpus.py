"""Real machines' `lspci` dumps (tests/corpus/lspci, each one's source in SOURCES.yaml):
every one parses, and with its `IOMMU group` lines taken out, pciguard's own derivation
is checked against those groups, the kernel's.

For each dump SOURCES.yaml records how many of the kernel's groups the derivation
reproduces exactly; the test fails when that number changes either way, so a gain is
written down and a loss is seen. On every dump the derivation must be at least as coarse
as the kernel (never a group split the kernel keeps whole: that would claim isolation
the machine lacks), and on every dump taken as root it must match the kernel exactly."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import CORPUS, audit_reading
from pciguard.cli.main import app
from pciguard.formats.lspci import parse_lspci
from pciguard.model import Bdf
from pciguard.model.groups import derive_groups
from pciguard.pciids import DATABASES, name_devices

DUMPS = CORPUS / "lspci"
SOURCES: dict[str, dict[str, Any]] = yaml.safe_load((DUMPS / "SOURCES.yaml").read_text())


def kernel_and_derived(name: str) -> tuple[set[frozenset[Bdf]], set[frozenset[Bdf]], bool]:
    """The kernel's groups and the derived ones over the functions the kernel grouped
    (on ARM and AMD some functions are in no group), and whether ACS was visible."""
    text = (DUMPS / name).read_text()
    with_groups = parse_lspci(text, name)
    kernel = {frozenset(g.members) for g in with_groups.host.kernel_groups or ()}
    grouped = set().union(*kernel)
    stripped = parse_lspci("\n".join(x for x in text.splitlines() if "IOMMU group" not in x), name)
    host = name_devices(stripped.host)  # as the audit does: IDs from names where -nn was not used
    derived = {frozenset(grouped & set(g.members)) for g in derive_groups(host.topology)} - {frozenset()}
    return kernel, derived, stripped.facts.topology_complete


def test_every_dump_in_the_corpus_has_its_source_written_down() -> None:
    assert sorted(p.name for p in DUMPS.glob("*.txt")) == sorted(SOURCES)
    for name, source in SOURCES.items():
        assert {"source", "machine", "taken", "kernel_groups", "derived_exactly"} <= source.keys(), name


@pytest.mark.skipif(not any(p.is_file() for p in DATABASES), reason="pci.ids is not installed")
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_the_derivation_against_a_real_machines_groups(name: str) -> None:
    kernel, derived, acs_visible = kernel_and_derived(name)
    exact = len(kernel & derived)
    recorded = SOURCES[name]
    assert (len(kernel), exact) == (recorded["kernel_groups"], recorded["derived_exactly"])
    assert all(any(k <= d for d in derived) for k in kernel), "a kernel group split: isolation claimed"
    assert acs_visible == (recorded["taken"] == "root")
    if acs_visible:
        assert derived == kernel


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_dump_in_the_corpus_is_audited_without_a_traceback(name: str) -> None:
    reading = parse_lspci((DUMPS / name).read_text(), name)
    report = audit_reading(replace(reading, host=name_devices(reading.host)))  # as `pciguard audit`
    assert report.groups
    codes = {f.code for f in report.findings}
    assert "groups-differ" not in codes  # the derivation agrees wherever it is compared
    assert report.arch == ("arm" if "arm64" in name else "x86")
    assert "uncovered-devices" not in codes or "arm64" in name  # AMD's IOMMU and root complex are in no group
    root_complex = sorted(
        n.message.split()[0] for g in report.groups for n in g.notes if n.code == "root-complex"
    )
    assert root_complex == (["0000:00:00.0", "0000:00:00.2"] if "amd" in name else [])
    skipped = [f.message for f in report.findings if f.code == "derivation-skipped"]
    assert bool(skipped) == (SOURCES[name]["taken"] == "user")
    assert all("lspci was not run as root" in m for m in skipped)
    msi = " ".join(f.message for f in report.findings if f.code == "msi-not-isolated")
    assert ("which MSI controller" in msi) == ("arm64" in name)


def test_a_laptops_report_fits_a_screen_and_verbose_says_everything() -> None:
    runner = CliRunner(env={"COLUMNS": "100"})
    dump = str(DUMPS / "macbook-titan-ridge-root.txt")
    short = runner.invoke(app, ["audit", "--lspci", dump]).stdout
    full = runner.invoke(app, ["audit", "--lspci", dump, "--verbose"]).stdout
    assert len(short.splitlines()) < 70 < len(full.splitlines())
    assert short.count("could raise any interrupt") == 1  # said once, above the table
    assert "EVERY" in short and "EVERY" not in full
    assert "03:00.0 AMD/ATI Navi 14 [Radeon RX 5500/5500M / Pro 5500M] [1002:7340]" in " ".join(short.split())
