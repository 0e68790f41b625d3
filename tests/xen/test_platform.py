"""The Platform protocol on a Xen dom0: the secure toolstack's plans as ``xl`` commands
and sysfs writes, exactly, on a fake dom0 tree whose ``xl`` is emulated (fakexen)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import bdf, example
from fakekernel import driver_of, installed, prepare
from fakexen import FakeXl, dom0
from pciguard.errors import PreconditionFailed
from pciguard.platforms.linux.sysfs import Fs
from pciguard.platforms.xen.dom0 import read
from pciguard.platforms.xen.platform import XenPlatform
from pciguard.toolstack import OperationFailed, Toolstack

NIC = "0000:03:00.0"


@pytest.fixture
def xen_host(tree: Callable[..., Path]) -> Iterator[tuple[Path, FakeXl]]:
    root = dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")
    prepare(root, example("workstation"))
    with installed(root):
        yield root, FakeXl(root)


def platform(root: Path, xl: FakeXl, dry_run: bool = False) -> XenPlatform:
    reading = read(Fs(str(root)))
    assert reading.facts.xen is not None
    return XenPlatform(Fs(str(root)), reading.host, reading.facts.xen, {}, run=xl, dry_run=dry_run)


def shown(p: XenPlatform) -> list[str]:
    out, p.writes[:] = [str(w) for w in p.writes], []
    return out


def test_each_operation_is_exactly_these_commands(xen_host: tuple[Path, FakeXl]) -> None:
    root, xl = xen_host
    p = platform(root, xl)
    toolstack = Toolstack(p)
    toolstack.make_assignable(bdf(NIC))
    assert shown(p) == [
        f"echo {NIC} > /sys/bus/pci/devices/{NIC}/driver/unbind",
        f"xl pci-assignable-add {NIC}",
        f"echo 1 > /sys/bus/pci/devices/{NIC}/reset",
    ]
    assert driver_of(root, NIC) == "pciback"
    toolstack.assign(bdf(NIC), "vm1")
    assert shown(p) == [f"echo 1 > /sys/bus/pci/devices/{NIC}/reset", f"xl pci-attach vm1 {NIC}"]
    assert xl.attached == {NIC: "vm1"}
    toolstack.release(bdf(NIC))
    assert shown(p) == [f"xl pci-detach vm1 {NIC}", f"echo 1 > /sys/bus/pci/devices/{NIC}/reset"]
    assert xl.attached == {} and driver_of(root, NIC) == "pciback"  # never back to dom0
    toolstack.make_unassignable(bdf(NIC))
    assert shown(p) == [
        f"echo 1 > /sys/bus/pci/devices/{NIC}/reset",
        f"xl pci-assignable-remove {NIC}",
        f"echo {NIC} > /sys/bus/pci/drivers/e1000e/bind",
    ]
    assert driver_of(root, NIC) == "e1000e"


def test_teardown_stops_the_domain_takes_its_devices_to_pciback_then_destroys_it(
    xen_host: tuple[Path, FakeXl],
) -> None:
    root, xl = xen_host
    p = platform(root, xl)
    toolstack = Toolstack(p)
    toolstack.make_assignable(bdf(NIC))
    toolstack.assign(bdf(NIC), "vm1")
    shown(p)
    toolstack.destroy_vm("vm1")
    assert shown(p) == [
        "xl pause vm1",
        f"xl pci-detach vm1 {NIC}",
        f"echo 1 > /sys/bus/pci/devices/{NIC}/reset",
        "xl destroy vm1",
    ]
    assert driver_of(root, NIC) == "pciback" and "vm1" not in xl.domains


def test_a_domain_created_without_passthrough_gets_no_device(xen_host: tuple[Path, FakeXl]) -> None:
    root, xl = xen_host
    toolstack = Toolstack(platform(root, xl))
    toolstack.make_assignable(bdf(NIC))
    with pytest.raises(PreconditionFailed, match="created without an IOMMU context"):
        toolstack.assign(bdf(NIC), "old")
    assert not any(argv[1] == "pci-attach" for argv in xl.ran)


def test_without_xens_quarantine_nothing_is_made_assignable(
    tree: Callable[..., Path],
) -> None:
    root = dom0(tree, "xl-info-4.17-no-quarantine-permissive.txt", "xl-dmesg-4.17-vtd.txt")
    prepare(root, example("workstation"))
    with installed(root):
        xl = FakeXl(root)
        toolstack = Toolstack(platform(root, xl))
        with pytest.raises(OperationFailed, match="no quarantine"):
            toolstack.make_assignable(bdf(NIC))
        assert driver_of(root, NIC) == "e1000e"  # unwound: its driver back
    assert not any(argv[1] == "pci-assignable-add" for argv in xl.ran)


def test_a_failed_attach_leaves_the_device_with_pciback(xen_host: tuple[Path, FakeXl]) -> None:
    root, xl = xen_host
    toolstack = Toolstack(platform(root, xl))
    toolstack.make_assignable(bdf(NIC))
    xl.fail = "pci-attach"
    with pytest.raises(OperationFailed, match="pci-attach"):
        toolstack.assign(bdf(NIC), "vm1")
    assert driver_of(root, NIC) == "pciback" and xl.attached == {}
    assert toolstack.ledger[bdf(NIC)].state.value == "quarantined"


def test_a_dry_run_only_asks_xl_what_there_is(xen_host: tuple[Path, FakeXl]) -> None:
    root, xl = xen_host
    p = platform(root, xl, dry_run=True)
    Toolstack(p).make_assignable(bdf(NIC))
    assert [str(w) for w in p.writes][1] == f"xl pci-assignable-add {NIC}"
    assert {argv[1] for argv in xl.ran} == {"list", "pci-list"} and driver_of(root, NIC) == "e1000e"


def test_a_device_found_with_a_guest_is_adopted_as_assigned_and_released_to_pciback(
    xen_host: tuple[Path, FakeXl],
) -> None:
    root, xl = xen_host
    xl._bind(NIC, "pciback")
    xl.attached[NIC] = "vm1"  # given to vm1 before pciguard looked
    toolstack = Toolstack(platform(root, xl))
    record = toolstack.ledger[bdf(NIC)]
    assert (record.state.value, record.vm) == ("assigned", "vm1")
    toolstack.release(bdf(NIC))
    assert xl.attached == {} and driver_of(root, NIC) == "pciback"


def test_the_commands_of_quarantine_and_assign_on_xen_with_dry_run(tree: Callable[..., Path]) -> None:
    from typer.testing import CliRunner

    from pciguard.cli.main import app

    root = dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")
    where = ["--root", str(root), "--state-dir", str(root / "state"), "--dry-run"]
    shown = CliRunner().invoke(app, ["quarantine", NIC, *where])
    assert shown.exit_code == 0, shown.output
    lines = [line.strip() for line in shown.output.splitlines()]
    assert f"quarantine {NIC} would run, in order:" in lines
    assert f"xl pci-assignable-add {NIC}" in lines


@pytest.mark.parametrize(
    "listed",
    ["", "not json", "{}", "[1, null]", '[{"config": "x"}]', '[{"config": {"c_info": 5}}]', '[{"domid": 3}]'],
)
def test_an_xl_list_that_is_not_what_xl_prints_gives_no_domain_and_no_traceback(listed: str) -> None:
    from pciguard.platforms.xen.platform import parse_domains

    assert parse_domains(listed) == {}


def test_a_device_pciback_only_seized_is_quarantined_by_xl_and_given_back_without_a_driver(
    xen_host: tuple[Path, FakeXl],
) -> None:
    root, xl = xen_host
    xl._bind(NIC, "pciback")  # xen-pciback.hide=, or the guard's claim: Xen left it with dom0
    p = platform(root, xl)
    toolstack = Toolstack(p)
    assert toolstack.ledger[bdf(NIC)].state.value == "host"
    toolstack.make_assignable(bdf(NIC))
    assert shown(p) == [f"xl pci-assignable-add {NIC}", f"echo 1 > /sys/bus/pci/devices/{NIC}/reset"]
    toolstack.make_unassignable(bdf(NIC))
    assert shown(p) == [f"echo 1 > /sys/bus/pci/devices/{NIC}/reset", f"xl pci-assignable-remove {NIC}"]
    assert driver_of(root, NIC) is None  # pciback was no host driver to give it back to


def test_every_legacy_flaw_is_in_the_xen_table_once() -> None:
    import re

    from conftest import CORPUS
    from pciguard.legacy.flaws import Flaw

    doc = (CORPUS.parents[1] / "docs" / "xen.md").read_text()
    section = doc.split("## The verifier's legacy flaws, as Xen commands", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| (.+?) \| (.+?) \|$", section, re.M)
    assert sorted(flaw for flaw, _, _ in rows) == sorted(f.value for f in Flaw)
