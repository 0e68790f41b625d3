"""A simulated host rendered as a sysfs tree reads back as the same host."""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from hypothesis import HealthCheck, given, settings

from fakesys import Kernel, render
from pciguard.formats.platform_file import build_host
from pciguard.model import Feature, Host
from pciguard.platforms.linux import read_host
from strategies import platform_file


def carried_by_sysfs(host: Host, kernel_groups: bool) -> dict[str, Any]:
    """The parts of a host that sysfs can carry. Left out: device names (pci.ids gives
    them), region names, host_critical (judged from boot_vga and the root disk), and
    firmware regions on hosts without an IOMMU (no DMAR table to hold them)."""
    with_tables = bool(host.iommus)
    functions = {
        str(b): (
            f.kind,
            f.parent,
            f.ids,
            f.class_code,
            f.driver,
            f.acs,
            f.ats,
            f.external,
            f.phantom_functions,
            f.reset_methods,
            f.bars,
            f.intx,
            frozenset((r.start, r.end) for r in f.reserved_regions) if with_tables else None,
            f.physfn,
        )
        for b, f in host.topology.items()
    }
    coverage = {
        str(b): (u.dma_remapping, u.interrupt_remapping) if (u := host.iommu_of(b)) else None
        for b in host.topology
    }
    groups = {frozenset(g.members) for g in host.groups} if kernel_groups else None
    return {"functions": functions, "coverage": coverage, "groups": groups, "arch": host.arch}


# Each example writes a whole tree: a third of the profile's examples keeps this in seconds.
@settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=max(50, settings.default.max_examples // 3),
)
@given(spec=platform_file())
def test_a_rendered_host_reads_back_the_same(spec: dict[str, Any]) -> None:
    host = build_host(spec, {}, "<random>")
    translating = any(u.dma_remapping is Feature.ENABLED for u in host.iommus)
    with TemporaryDirectory() as tmp:
        render(host, Path(tmp), Kernel())
        reading = read_host(tmp)
    assert not reading.facts.problems
    assert carried_by_sysfs(reading.host, translating) == carried_by_sysfs(host, translating)
    assert (reading.host.kernel_groups is not None) == translating
