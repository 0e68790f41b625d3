"""The hot-plug guard in a Xen dom0 (fake dom0: fakekernel answers sysfs, fakexen's
``FakeXl`` answers ``xl``): xen-pciback, not vfio-pci, seizes each new function at
enumeration, and a quarantine is ``xl pci-assignable-add`` (pciback holding a device
leaves it in dom0's IOMMU context)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import example
from fakekernel import PCIBACK_SLOTS, driver_of, installed, plug, prepare, unplug, with_pciback
from fakexen import FakeXl, dom0
from pciguard.platforms.linux.guard import Guard
from pciguard.platforms.xen import platform
from pciguard.platforms.xen.platform import Ran
from pciguard.policy.rules import parse_policy

ENCLOSURE = "0000:05:00.0"  # an NVMe drive, behind the workstation's Thunderbolt port
XL_RAN: list[tuple[str, ...]] = []


@pytest.fixture
def dom0_host(tree: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = dom0(tree, "xl-info-4.17.txt", "xl-dmesg-4.17-vtd.txt")
    prepare(root, example("workstation"), vfio_loaded=False)
    with_pciback(root)
    unplug(root, ENCLOSURE)
    FakeXl(root).save()
    XL_RAN.clear()

    def run(argv: tuple[str, ...]) -> Ran:
        XL_RAN.append(argv)
        xl = FakeXl.load(root)
        ran = xl(argv)
        xl.save()
        return ran

    monkeypatch.setattr(platform, "run_xl", run)
    with installed(root):
        yield root


def guard(root: Path, rules: str) -> Guard:
    return Guard(parse_policy(rules, "test.rules"), str(root), root / "state")


def changes() -> list[str]:
    return [" ".join(argv) for argv in XL_RAN if argv[1] not in ("list", "pci-list")]


def test_xen_pciback_seizes_a_new_function_and_quarantine_is_pci_assignable_add(dom0_host: Path) -> None:
    g = guard(dom0_host, "")
    g.start()
    assert g.claiming and g.xen
    assert "0000:05:*.*" in (dom0_host / PCIBACK_SLOTS).read_text().split()  # the bus below its port
    plug(dom0_host, ENCLOSURE)
    assert driver_of(dom0_host, ENCLOSURE) == "pciback"  # at enumeration, before any decision
    decision = g.added("pci", ENCLOSURE)
    assert decision is not None and decision.target == "quarantine" and decision.bound_before is None
    assert decision.outcome == f"quarantined with xen-pciback, in DOMID_IO: {ENCLOSURE}"
    assert changes() == [f"xl pci-assignable-add {ENCLOSURE}"]
    g.stop()
    assert (dom0_host / PCIBACK_SLOTS).read_text().split() == []


def test_on_xen_an_allowed_function_goes_from_pciback_to_its_driver_without_xl(dom0_host: Path) -> None:
    g = guard(dom0_host, "allow id 1987:5012")
    g.start()
    plug(dom0_host, ENCLOSURE)
    decision = g.added("pci", ENCLOSURE)
    assert decision is not None and decision.target == "allow", decision
    assert driver_of(dom0_host, ENCLOSURE) == "nvme" and changes() == []
    g.stop()


def test_the_slots_pciback_had_before_the_guard_are_there_after_it(dom0_host: Path) -> None:
    (dom0_host / PCIBACK_SLOTS).write_text(f"{ENCLOSURE}\n")  # xen-pciback.hide=(05:00.0)
    g = guard(dom0_host, "")
    g.start()
    g.stop()
    assert (dom0_host / PCIBACK_SLOTS).read_text().split() == [ENCLOSURE]
    assert not (dom0_host / "state/pciback-slots-before-guard").exists()


def test_a_killed_guards_slots_are_not_listed_twice(dom0_host: Path) -> None:
    guard(dom0_host, "").start()  # killed: never stopped
    g = guard(dom0_host, "")
    g.start()
    listed = (dom0_host / PCIBACK_SLOTS).read_text().split()
    assert len(listed) == len(set(listed)) == len(g.pciback_patterns) > 0
    g.stop()
    assert (dom0_host / PCIBACK_SLOTS).read_text().split() == []
