"""IOMMU group derivation and requester-ID aliases, against Linux's rules and the
groups the QEMU lab's real kernel showed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import bdf, example
from pciguard.formats.platform_file import parse_platform
from pciguard.model import Acs, AcsCapability, Bar, Bdf, Function, Kind, Topology


def groups_of(host) -> list[list[str]]:
    return [[str(b) for b in g.members] for g in host.groups]


# The three cases the lab showed on a real kernel (lab-notes) -------------------------
def test_lab_devices_under_root_ports_with_acs_are_each_alone() -> None:
    host = example("lab/root-ports")
    assert host.group_of(bdf("01:00.0")).members == (bdf("01:00.0"),)
    assert host.group_of(bdf("02:00.0")).members == (bdf("02:00.0"),)


def test_lab_switch_below_root_port_without_acs_is_one_group() -> None:
    host = example("lab/switch")
    assert groups_of(host) == [
        [
            "0000:00:10.0",
            "0000:01:00.0",
            "0000:02:00.0",
            "0000:02:01.0",
            "0000:03:00.0",
            "0000:04:00.0",
        ]
    ]


def test_lab_pcie_to_pci_bridge_shares_group_and_requester_id() -> None:
    host = example("lab/pci-bridge")
    group = host.group_of(bdf("02:01.0"))
    assert [str(b) for b in group.members] == ["0000:01:00.0", "0000:02:01.0", "0000:02:02.0"]
    alias = bdf("02:00.0")  # the bridge's secondary bus, devfn 0, takes ownership
    assert host.requester_ids(bdf("02:01.0")) == {bdf("02:01.0"), alias}
    assert host.requester_ids(bdf("02:02.0")) == {bdf("02:02.0"), alias}
    assert host.owner_of_rid(alias) == [bdf("02:01.0"), bdf("02:02.0")]


def test_lab_ich9_functions_without_acs_are_one_group() -> None:
    host = example("lab/pci-bridge")
    assert [str(b) for b in host.group_of(bdf("00:1f.2")).members] == [
        "0000:00:1f.0",
        "0000:00:1f.2",
        "0000:00:1f.3",
    ]


# The rules, one at a time ---------------------------------------------------------------
def test_multifunction_device_without_acs_shares_a_group() -> None:
    host = example("workstation")
    assert host.group_of(bdf("01:00.0")) == host.group_of(bdf("01:00.1"))
    assert host.group_of(bdf("01:00.0")) != host.group_of(bdf("03:00.0"))


def test_multifunction_device_with_acs_is_split() -> None:
    text = """
name: mf
devices:
  - bdf: 0000:00:01.0
    kind: root-port
    acs: full
    children:
      - {bdf: 0000:01:00.0, kind: endpoint, acs: full}
      - {bdf: 0000:01:00.1, kind: endpoint, acs: full}
"""
    host = parse_platform(text)
    assert host.group_of(bdf("01:00.0")) != host.group_of(bdf("01:00.1"))


def test_downstream_port_without_acs_joins_its_devices() -> None:
    host = example("server")
    nic_a = host.group_of(bdf("03:00.0"))
    assert bdf("02:00.0") in nic_a and bdf("03:02.0") in nic_a  # port, PF and VFs
    assert bdf("04:00.0") not in nic_a  # isolated at the upstream port, as Linux does


def test_vfs_behind_acs_have_groups_of_their_own() -> None:
    host = example("server")
    vfs = [bdf(f"12:00.{f}") for f in (2, 3, 4, 5)]
    assert host.topology.virtual_functions(bdf("12:00.0")) == vfs
    assert len({host.group_of(v).number for v in vfs}) == 4


def test_phantom_functions_follow_their_device() -> None:
    host = example("server")
    assert host.requester_ids(bdf("20:00.0")) == {bdf("20:00.0"), bdf("20:00.4")}


def test_phantom_function_overlapping_a_real_function_shares_its_group() -> None:
    text = """
name: overlap
devices:
  - bdf: 0000:00:01.0
    kind: root-port
    acs: full
    children:
      - {bdf: 0000:01:00.0, kind: endpoint, acs: full, phantom_functions: 1}
      - {bdf: 0000:01:00.4, kind: endpoint, acs: full}
"""
    host = parse_platform(text)
    assert host.group_of(bdf("01:00.0")) == host.group_of(bdf("01:00.4"))


def test_acs_features_missing_from_capability_count_as_hardwired() -> None:
    rr_cr_uf = Acs.RR | Acs.CR | Acs.UF
    assert AcsCapability(rr_cr_uf, rr_cr_uf).isolates()  # SV not implemented: hard-wired
    assert not AcsCapability(rr_cr_uf | Acs.SV, rr_cr_uf).isolates()  # SV there but off


def test_every_function_is_in_exactly_one_group() -> None:
    for name in ("workstation", "server", "rmrr-usb", "arm-gicv2m", "lab/switch"):
        host = example(name)
        members = [b for g in host.groups for b in g.members]
        assert sorted(members) == sorted(host.topology)


def test_bdf_parsing_and_requester_id_roundtrip() -> None:
    b = Bdf.parse("0000:3a:1f.7")
    assert str(b) == "0000:3a:1f.7" and Bdf.from_rid(0, b.rid) == b
    assert Bdf.parse("03:00.0") == Bdf(0, 3, 0, 0)
    for bad in ("", "0000:03:00", "0000:03:20.0", "zz:00.0", "0000:03:00.8"):
        try:
            Bdf.parse(bad)
        except ValueError as exc:
            assert "PCI address" in str(exc) or "above 0x1f" in str(exc)
        else:
            raise AssertionError(f"{bad!r} parsed")


@settings(deadline=None)
@given(
    bars=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 0x8000), st.integers(0, 0x3000)), min_size=1, max_size=12
    ),
    lines=st.lists(st.sampled_from([None, 16, 17]), min_size=6, max_size=6),
)
def test_shared_pages_and_lines_are_exactly_the_pairs_a_plain_comparison_finds(
    bars: list[tuple[int, int, int]], lines: list[int | None]
) -> None:
    """The sweep over sorted BARs finds every pair of devices with a BAR in one 4 KiB
    page, and every pair on one INTx line, and nothing else."""
    by_device: dict[int, list[Bar]] = {}
    for device, start, size in bars:
        by_device.setdefault(device, []).append(Bar(start, start + size))
    functions = {
        Bdf(0, 0, d, 0): Function(
            Bdf(0, 0, d, 0), Kind.RC_ENDPOINT, bars=tuple(by_device.get(d, ())), intx=lines[d]
        )
        for d in range(6)
    }
    topology = Topology(functions)
    expected = set()
    for a, fa in functions.items():
        for b, fb in functions.items():
            same_page = any(
                x.start >> 12 <= y.end >> 12 and y.start >> 12 <= x.end >> 12
                for x in fa.bars
                for y in fb.bars
            )
            if a != b and (same_page or (fa.intx is not None and fa.intx == fb.intx)):
                expected.add((a, b))
    found = {(a, s.other) for a in functions for s in topology.shared_resources(a)}
    assert found == expected
