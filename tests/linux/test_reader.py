"""Reading Linux hosts: this machine's real sysfs, kernel facts that change verdicts,
and malformed trees that must give findings, never tracebacks."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Audit, as_nobody, audit_reading, bdf, example
from pciguard.formats.platform_file import build_host
from pciguard.model import Feature
from pciguard.platforms.linux import read_host
from pciguard.platforms.linux.config import parse_config


def codes(report, group_bdf: str) -> set[str]:  # type: ignore[no-untyped-def]
    group = next(g for g in report.groups if any(m.bdf == group_bdf for m in g.members))
    return {r.code for r in group.reasons} | {n.code for n in group.notes}


def finding_codes(report) -> set[str]:  # type: ignore[no-untyped-def]
    return {f.code for f in report.findings}


# -- this machine ---------------------------------------------------------------------


def test_this_machines_real_sysfs_is_audited_plainly() -> None:
    reading = read_host("/")
    report = audit_reading(reading)
    assert reading.host.topology, "this machine has PCI devices"
    assert not reading.facts.problems
    kernel_groups = (
        sorted(os.listdir("/sys/kernel/iommu_groups")) if os.path.isdir("/sys/kernel/iommu_groups") else []
    )
    if not kernel_groups:
        # No IOMMU here: critical, and every device is shown in a group planned for the IOMMU on.
        assert {"no-iommu", "planning"} <= finding_codes(report)
        assert report.critical
        listed = [m.bdf for g in report.groups for m in g.members]
        assert sorted(listed) == sorted(os.listdir("/sys/bus/pci/devices"))
        assert all(g.planned and g.number is not None for g in report.groups)
    else:
        assert {g.number for g in report.groups if g.number is not None} == {int(n) for n in kernel_groups}
        assert not any(g.planned for g in report.groups) and "planning" not in finding_codes(report)


# -- kernel facts that change verdicts ------------------------------------------------


def test_identity_domains_are_not_translating(audit_tree: Audit) -> None:
    report = audit_tree("server", domain="identity", cmdline="iommu=pt")
    assert "identity-domains" in finding_codes(report)
    nic_group = next(g for g in report.groups if any(m.kind == "endpoint" for m in g.members))
    assert nic_group.domain == "identity" and nic_group.verdict == "not-assignable"
    assert "identity-domain" in {r.code for r in nic_group.reasons}
    assert any("iommu=pt" in f.message for f in report.findings)


def test_strict_domains_pass_and_lazy_ones_are_flagged(audit_tree: Audit) -> None:
    assert "lazy-invalidation" not in finding_codes(audit_tree("server"))
    assert "lazy-invalidation" in finding_codes(audit_tree("server", domain="DMA-FQ"))


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ({"module_parameters": {"vfio_iommu_type1/allow_unsafe_interrupts": "Y"}}, "allow_unsafe_interrupts"),
        ({"module_parameters": {"vfio/enable_unsafe_noiommu_mode": "Y"}}, "noiommu"),
        ({"cmdline": "quiet pcie_acs_override=downstream,multifunction"}, "ACS override"),
        ({"cmdline": "quiet pci=noaer,config_acs=111x011@0000:00:1c.0"}, "ACS controls forced"),
    ],
)
def test_unsafe_kernel_settings_are_critical_and_listed(
    audit_tree: Audit, kernel: dict, expected: str
) -> None:  # type: ignore[type-arg]
    report = audit_tree("server", **kernel)
    assert report.critical
    assert any(expected in u for u in report.unsafe_overrides), report.unsafe_overrides


def test_safe_module_parameters_are_not_overrides(audit_tree: Audit) -> None:
    report = audit_tree("server", module_parameters={"vfio_iommu_type1/allow_unsafe_interrupts": "N"})
    assert report.unsafe_overrides == []
    assert audit_tree("server", cmdline="quiet pci=noaer,realloc").unsafe_overrides == []


def test_interrupt_remapping_off_is_read_from_proc_interrupts(tree: Callable[..., Path]) -> None:
    reading = read_host(str(tree("server", cmdline="intremap=off", interrupts_remapped=False)))
    assert {u.interrupt_remapping for u in reading.host.iommus} == {Feature.DISABLED}
    assert reading.facts.interrupt_remapping_in_use is False
    assert "no-interrupt-remapping" in finding_codes(audit_reading(reading))
    assert reading.facts.iommu_switches == ("intremap=off",)


def test_hardware_without_interrupt_remapping_is_absent(tree: Callable[..., Path]) -> None:
    reading = read_host(str(tree("no-interrupt-remapping")))
    assert {u.interrupt_remapping for u in reading.host.iommus} == {Feature.ABSENT}


def test_an_iommu_the_kernel_does_not_use_is_reported(tree: Callable[..., Path]) -> None:
    root = tree("server", cmdline="intel_iommu=off")
    for entry in (root / "sys/class/iommu").iterdir():
        entry.unlink()
    for path in (root / "sys/kernel/iommu_groups").iterdir():
        (path / "type").unlink()
    import shutil

    shutil.rmtree(root / "sys/kernel/iommu_groups")
    reading = read_host(str(root))
    assert reading.facts.firmware_table == "DMAR"
    assert {u.dma_remapping for u in reading.host.iommus} == {Feature.DISABLED}
    report = audit_reading(reading)
    assert "dma-remapping-off" in finding_codes(report)
    assert all(g.verdict in ("not-assignable", "bridges-only") for g in report.groups)


def test_the_kernels_groups_rule_and_disagreement_is_reported(audit_tree: Audit) -> None:
    host = example("server")
    merged = tuple(sorted(m for g in host.derived_groups for m in g.members))  # one group of everything
    report = audit_tree(host, groups=(merged,))
    assert "groups-differ" in finding_codes(report)
    assert len([g for g in report.groups if g.number is not None]) == 1
    assert "groups-differ" in {n.code for n in report.groups[0].notes}


def test_host_critical_devices_from_boot_vga_and_the_root_disk(audit_tree: Audit) -> None:
    report = audit_tree(
        "workstation", boot_vga=frozenset({bdf("0000:00:02.0")}), root_disk=bdf("0000:02:00.0")
    )
    assert "host-critical" in codes(report, "0000:00:02.0")
    assert "host-critical" in codes(report, "0000:02:00.0")
    messages = [r.message for g in report.groups for r in g.reasons if r.code == "host-critical"]
    assert any("root filesystem" in m for m in messages) and any("console GPU" in m for m in messages)


def test_firmware_regions_come_from_the_dmar_table(audit_tree: Audit) -> None:
    report = audit_tree("workstation")
    assert "reserved-region" in codes(report, "0000:00:14.0")


def test_shared_bar_pages_and_interrupt_lines_come_from_resource_and_irq(
    tree: Callable[..., Path], audit_tree: Audit
) -> None:
    host = read_host(str(tree("shared-bars"))).host
    assert [s.other for s in host.shared_resources(bdf("0000:01:00.0"))] == [bdf("0000:02:00.0")]
    assert [s.other for s in host.shared_resources(bdf("0000:03:00.0"))] == [bdf("0000:04:00.0")]
    assert host.shared_resources(bdf("0000:05:00.0")) == ()
    assert "shared-resource" in codes(audit_tree("shared-bars"), "0000:01:00.0")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("resource", "0xfe200000 0xfe2000ff\n", "expected three hexadecimal numbers"),
        ("resource", "zz 0x1 0x200\n", "expected three hexadecimal numbers"),
        ("irq", "seventeen\n", "expected a decimal number"),
    ],
)
def test_a_malformed_resource_or_irq_file_is_named_and_the_rest_read(
    tree: Callable[..., Path], name: str, text: str, message: str
) -> None:
    root = tree("shared-bars")
    card = root / "sys/bus/pci/devices/0000:03:00.0"
    (card.resolve() / name).write_text(text)
    reading = read_host(str(root))
    assert any(
        p.path.endswith(f"0000:03:00.0/{name}") and message in p.message for p in reading.facts.problems
    )
    assert reading.host.shared_resources(bdf("0000:01:00.0"))  # the other devices still read
    assert bdf("0000:03:00.0") in reading.host.topology


def test_only_a_function_that_signals_nothing_but_intx_is_tied_to_its_line() -> None:
    def config(*capabilities: int) -> bytes:
        data = bytearray(256)
        data[0:4] = struct.pack("<HH", 0x8086, 0x10D3)
        data[6] = 0x10  # capability list present
        data[0x3D] = 1  # INTA
        pointer = 0x40
        data[0x34] = pointer
        for i, cap in enumerate(capabilities):
            data[pointer] = cap
            data[pointer + 1] = pointer + 0x10 if i + 1 < len(capabilities) else 0
            pointer += 0x10
        return bytes(data)

    assert parse_config(config(0x01)).intx_only  # power management only
    assert not parse_config(config(0x01, 0x11)).intx_only  # MSI-X
    assert not parse_config(config(0x05)).intx_only  # MSI
    assert parse_config(config(0x01)[:64]).intx_only  # an ordinary user sees no capability: tied


def test_thunderbolt_without_security_is_a_warning(audit_tree: Audit) -> None:
    report = audit_tree("workstation", thunderbolt={"security": "none", "iommu_dma_protection": "0"})
    assert {"thunderbolt-no-security", "thunderbolt-no-dma-protection"} <= finding_codes(report)


def test_preboot_dma_protection_is_read_from_dmar_flags(tree: Callable[..., Path]) -> None:
    assert read_host(str(tree("workstation", dmar_flags=0x5))).facts.preboot_dma_protection is True
    assert read_host(str(tree("server", dmar_flags=0x1))).facts.preboot_dma_protection is False


# -- ordinary users ---------------------------------------------------------------------


def test_an_ordinary_users_view_says_what_it_hides(tree: Callable[..., Path]) -> None:
    reading = read_host(str(tree("server", header_only=True)))
    assert not reading.facts.topology_complete
    assert any("64-byte header" in u.why for u in reading.facts.unreadable)
    report = audit_reading(reading)
    assert "derivation-skipped" in finding_codes(report)
    assert report.groups and all(g.number is not None for g in report.groups)  # the kernel's groups hold


def test_functions_an_ordinary_user_cannot_see_into_are_grouped_as_unisolated(
    tree: Callable[..., Path],
) -> None:
    """Two Intel root-complex integrated functions of one device, with the IOMMU off:
    read as root, the kernel's RCiEP quirk isolates them; read as an ordinary user
    their port type is unseen, and the planned groups must not split them."""
    spec = {
        "name": "chipset",
        "devices": [
            {"bdf": "0000:00:14.0", "kind": "rc-endpoint", "id": "8086:a36d", "reset": ["flr"]},
            {"bdf": "0000:00:14.2", "kind": "rc-endpoint", "id": "8086:a36f", "reset": ["flr"]},
        ],
    }
    host = build_host(spec, {}, "chipset")

    def planned(**kernel: object) -> list[int]:
        return sorted(len(g.members) for g in audit_reading(read_host(str(tree(host, **kernel)))).groups)

    assert planned() == [1, 1]
    assert planned(header_only=True) == [2]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_an_unreadable_dmar_table_is_a_limitation_not_a_crash(tree: Callable[..., Path]) -> None:
    root = tree("server", dmar_mode=0o400)
    os.chmod(root, 0o755)
    for parent in root.parents:
        if str(parent).startswith("/tmp/"):
            os.chmod(parent, 0o755)
    data = as_nobody(lambda: [u.path for u in read_host(str(root)).facts.unreadable])
    assert "sys/firmware/acpi/tables/DMAR" in data


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_an_unreadable_device_folder_keeps_the_device_and_its_group_unassignable(
    tree: Callable[..., Path],
) -> None:
    root = tree("workstation")
    for path in (root, *root.parents):
        if str(path).startswith("/tmp/"):
            os.chmod(path, 0o755)
    gpu = next((root / "sys/devices").glob("pci*/*/0000:01:00.0"))
    gpu.chmod(0)

    def audit() -> str:
        reading = read_host(str(root))
        group = next(g for g in audit_reading(reading).groups if "0000:01:00.0" in [m.bdf for m in g.members])
        return f"{[u.path for u in reading.facts.unreadable]} | {group.verdict.value} | {len(group.members)}"

    unreadable, verdict, members = as_nobody(audit).split(" | ")
    assert str(gpu.relative_to(root)) in unreadable
    assert (verdict, members) == ("not-assignable", "2")  # the GPU and its audio function, as the kernel says


# -- malformed trees --------------------------------------------------------------------

ROOT_PORT = "sys/devices/pci0000:00/0000:00:01.0"
SERVER_VF = "sys/bus/pci/devices/0000:12:00.2"  # a virtual function: its vendor file is read


def _config(root: Path) -> Path:
    return root / ROOT_PORT / "config"


def _break_vf_ids(root: Path) -> None:
    """A VF whose config space is cut short is identified by its vendor file: make it junk."""
    (root / SERVER_VF / "config").write_bytes(b"\xff" * 16)
    (root / SERVER_VF / "vendor").write_text("banana\n")


def _patch(root: Path, at: int, data: bytes) -> None:
    old = _config(root).read_bytes()
    _config(root).write_bytes(old[:at] + data + old[at + len(data) :])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: _config(r).write_bytes(_config(r).read_bytes()[:30]), "shorter than the 64-byte header"),
        (
            lambda r: _config(r).write_bytes(
                _config(r).read_bytes()[:0x41] + b"\x40" + _config(r).read_bytes()[0x42:]
            ),
            "loops back",
        ),
        (
            lambda r: _config(r).write_bytes(
                _config(r).read_bytes()[:0x100]
                + struct.pack("<I", 0x3 | 1 << 16 | 0x100 << 20)
                + _config(r).read_bytes()[0x104:]
            ),
            "extended capability list loops",
        ),
        (lambda r: _config(r).write_bytes(_config(r).read_bytes()[:0x108]), "runs past"),
        (
            lambda r: (r / "sys/bus/pci/devices/0000:00:09.0").symlink_to("../../../devices/nowhere"),
            "dangling link",
        ),
        (lambda r: (r / "sys/bus/pci/devices/0000:zz:00.0").symlink_to(ROOT_PORT), "not a PCI address"),
        (lambda r: (r / "sys/bus/pci/devices/junk").write_text("x"), "not a PCI address"),
        (lambda r: (r / "sys/firmware/acpi/tables/DMAR").write_bytes(b"DMAR\xff\x00\x00\x00"), "DMAR table"),
        (
            lambda r: (r / "sys/firmware/acpi/tables/DMAR").write_bytes(
                (r / "sys/firmware/acpi/tables/DMAR").read_bytes()[:52]
            ),
            "length field",
        ),
        (lambda r: (r / "sys/kernel/iommu_groups/0/type").write_text("weird\n"), "unknown domain type"),
        (lambda r: (r / "sys/kernel/iommu_groups/0/reserved_regions").write_text("0xzz\n"), "START END TYPE"),
        (lambda r: (r / "sys/kernel/iommu_groups/notanumber").mkdir(), "not a group number"),
        (lambda r: _break_vf_ids(r), "hexadecimal"),
    ],
)
def test_malformed_trees_give_findings_not_tracebacks(
    tree: Callable[..., Path], damage: Callable[[Path], object], message: str
) -> None:
    root = tree("server")
    (root / "sys/firmware/acpi/tables/DMAR").chmod(0o644)
    damage(root)
    reading = read_host(str(root))
    problems = [f"{p.path}: {p.message}" for p in reading.facts.problems]
    assert any(message in p for p in problems), problems
    report = audit_reading(reading)
    assert any(f.code == "malformed-input" and message in f.message for f in report.findings)


def test_missing_files_fall_back_to_config_space(tree: Callable[..., Path]) -> None:
    root = tree("server")
    for name in ("vendor", "device", "class", "driver_override", "removable"):
        (root / ROOT_PORT / name).unlink()  # config space tells the IDs and class
    reading = read_host(str(root))
    fn = reading.host.topology[bdf("0000:00:01.0")]
    assert fn.ids == example("server").topology[bdf("0000:00:01.0")].ids
    assert not reading.facts.problems


def test_a_device_whose_parent_is_missing_is_still_audited(tree: Callable[..., Path]) -> None:
    root = tree("server")
    (root / "sys/bus/pci/devices/0000:00:01.0").unlink()
    reading = read_host(str(root))
    assert bdf("0000:00:01.0") not in reading.host.topology
    assert any("not listed" in p.message for p in reading.facts.problems)
    children = [b for b, f in example("server").topology.items() if f.parent == bdf("0000:00:01.0")]
    named = " ".join(f"{p.path} {p.message}" for p in reading.facts.problems)
    assert children and all(c in reading.host.topology or str(c) in named for c in children)
