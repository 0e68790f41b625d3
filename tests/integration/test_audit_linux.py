"""`pciguard audit` of Linux hosts end to end: this machine, fake trees, snapshots,
lspci dumps and drawings."""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CORPUS, EXAMPLES
from pciguard.cli.main import app
from pciguard.report import Verdict, load_report

runner = CliRunner(env={"COLUMNS": "200"})


def test_audit_with_no_arguments_audits_this_host() -> None:
    result = runner.invoke(app, ["audit", "--json"])
    report = json.loads(result.stdout)
    assert report["source"] == "sysfs under /"
    assert {m["bdf"] for g in report["groups"] for m in g["members"]} == set(
        os.listdir("/sys/bus/pci/devices")
    )
    if not os.listdir("/sys/kernel/iommu_groups"):
        assert result.exit_code == 1  # nothing on this host is isolated, and the exit code says so
        plain = runner.invoke(app, ["audit"])
        assert "no IOMMU: every device can DMA to all of memory" in plain.output
        assert "not assignable" in plain.output


def test_audit_of_a_fake_tree_names_devices_and_notes(tree: Callable[..., Path]) -> None:
    result = runner.invoke(app, ["audit", "--root", str(tree("workstation"))])
    assert result.exit_code == 0, result.output
    assert "GP104 [GeForce GTX 1080]" in result.output or "10de:1b80" in result.output
    assert "multi-function device without ACS" in result.output


def test_one_source_at_a_time(tree: Callable[..., Path]) -> None:
    result = runner.invoke(app, ["audit", "--root", str(tree("server")), "--lspci", "x.txt"])
    assert result.exit_code == 2
    assert "--root and --lspci" in result.output


def test_snapshot_then_audit_it(tree: Callable[..., Path], tmp_path: Path) -> None:
    root = tree("server")
    snap = tmp_path / "host.tar.gz"
    made = runner.invoke(app, ["snapshot", str(snap), "--root", str(root)])
    assert made.exit_code == 0, made.output
    assert "serial number" in made.output
    direct_text = runner.invoke(app, ["audit", "--root", str(root), "--json"]).stdout
    load_report(direct_text)  # what the audit prints follows its own schema
    direct = json.loads(direct_text)
    packed = json.loads(runner.invoke(app, ["audit", "--snapshot", str(snap), "--json"]).stdout)
    assert packed["groups"] == direct["groups"] and packed["findings"] == direct["findings"]


def test_a_bad_snapshot_exits_two_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_text("nope")
    result = runner.invoke(app, ["audit", "--snapshot", str(bad)])
    assert result.exit_code == 2
    assert str(bad) in result.output


def test_lspci_from_standard_input() -> None:
    text = (CORPUS / "lspci" / "forum-non-root.txt").read_text()
    result = runner.invoke(app, ["audit", "--lspci", "-", "--json"], input=text)
    report = json.loads(result.stdout)
    assert report["source"] == "lspci dump -"
    assert any("lspci dump cannot show" in lim["why"] for lim in report["limitations"])
    assert result.exit_code == 1  # interrupt isolation cannot be seen, so it is not assumed


def test_a_line_of_a_dump_that_is_not_lspci_is_named_and_the_rest_audited(tmp_path: Path) -> None:
    dump = tmp_path / "dump.txt"
    dump.write_text("00:01.0 Ethernet controller: X\n\tIOMMU group: 1\nnonsense here\n")
    result = runner.invoke(app, ["audit", "--lspci", str(dump), "--json"])
    report = json.loads(result.stdout)
    assert any(f"{dump}:3" in f["message"] for f in report["findings"] if f["code"] == "malformed-input")
    assert [m["bdf"] for g in report["groups"] for m in g["members"]] == ["0000:00:01.0"]


def test_a_dump_with_no_device_exits_two_with_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "dump.txt"
    bad.write_text("\nnonsense here\n")
    result = runner.invoke(app, ["audit", "--lspci", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:2:1" in result.output


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed (.ci/run installs it)")
def test_svg_draws_groups_coloured_by_verdict(tree: Callable[..., Path], tmp_path: Path) -> None:
    svg = tmp_path / "topology.svg"
    result = runner.invoke(app, ["audit", "--root", str(tree("workstation")), "--svg", str(svg)])
    assert result.exit_code == 0, result.output
    assert f"drew the topology to {svg}" in result.output
    drawing = ElementTree.parse(svg).getroot()
    text = ElementTree.tostring(drawing, encoding="unicode")
    assert "group 7: ready-after-quarantine" in text and "0000:01:00.0" in text
    assert "#c62828" in text  # the USB controller's group is not assignable: red
    titles = {element.text for element in drawing.iter() if element.tag.endswith("title")}
    assert "f0000_00_01_0->f0000_01_00_0" in titles  # the root port's edge to the GPU
    assert "firmware 1:1 regions" in text  # a not-assignable group says its main reason
    assert all(v.value in text for v in Verdict) and "dotted arrow: PF to its virtual function" in text


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed (.ci/run installs it)")
def test_svg_ties_virtual_functions_to_their_pf_and_routes_edges_around_titles(tmp_path: Path) -> None:
    svg = tmp_path / "server.svg"
    result = runner.invoke(app, ["audit", "--platform", str(EXAMPLES / "server.yaml"), "--svg", str(svg)])
    assert "drew the topology" in result.output
    drawing = ElementTree.parse(svg).getroot()
    edges = {
        element.findtext("{http://www.w3.org/2000/svg}title"): element
        for element in drawing.iter()
        if element.get("class") == "edge"
    }
    vf_edge = edges["f0000_12_00_0->f0000_12_00_2"]  # the SR-IOV NIC's PF to its VF0
    assert any(p.get("stroke-dasharray") for p in vf_edge.iter() if p.tag.endswith("path"))
    titles = [
        e
        for e in drawing.iter()
        if e.get("class") == "node" and "title_" in (e.findtext("{http://www.w3.org/2000/svg}title") or "")
    ]
    assert len(titles) == len(
        load_report(
            runner.invoke(
                app, ["audit", "--platform", str(EXAMPLES / "server.yaml"), "--json", "--all"]
            ).stdout
        ).groups
    )  # each group's title is a node, so Graphviz routes edges around it
