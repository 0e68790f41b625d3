"""The kernel's ACS quirk table (drivers/pci/quirks.c, pci_dev_acs_enabled[]) in the
group derivation: each rule decides as the kernel's function does, and the report says
when a quirk decided."""

from __future__ import annotations

import pytest

from conftest import bdf
from pciguard.checks import Options
from pciguard.formats.platform_file import parse_platform
from pciguard.model.acs_quirks import QUIRKS, Rule, quirk_decision
from pciguard.platforms.sim import SimPlatform
from pciguard.report import audit
from pciguard.toolstack import Toolstack


def two_ports(port_id: str, acs: str = "none", kind: str = "root-port") -> str:
    """Two functions of one slot (a multi-function device, as a PCH's root ports are),
    each with an endpoint below: on the root bus, or (downstream ports) below a switch's
    upstream port under a root port with ACS."""
    ports = "\n".join(
        f"""- bdf: 0000:{bus}:1c.{fn}
  kind: {kind}
  id: "{port_id}"
  acs: {acs}
  children: [{{bdf: 0000:{fn + 3}0:00.0, kind: endpoint, id: "1234:11e8"}}]"""
        for fn in (0, 2)
        for bus in ["00" if kind == "root-port" else "02"]
    )
    if kind == "root-port":
        devices = ports
    else:
        below = "\n".join("        " + line for line in ports.splitlines())
        devices = f"""- bdf: 0000:00:01.0
  kind: root-port
  acs: full
  children:
    - bdf: 0000:01:00.0
      kind: switch-upstream
      children:
{below}"""
    indented = "\n".join("  " + line for line in devices.splitlines())
    return f"name: quirks\niommus: [{{name: dmar0}}]\ndevices:\n{indented}\n"


def alone(port_id: str, acs: str = "none", kind: str = "root-port") -> bool:
    host = parse_platform(two_ports(port_id, acs, kind))
    return host.group_of(bdf("30:00.0")) != host.group_of(bdf("50:00.0"))


@pytest.mark.parametrize(
    ("port_id", "acs", "isolated"),
    [
        ("8086:3420", "none", False),  # an Intel root port no quirk names: no ACS, one group
        ("8086:1c10", "none", True),  # Cougarpoint PCH: the kernel enables ACS through the chipset
        ("8086:8c90", "none", True),  # Lynx Point (9 series), even IDs only
        ("8086:8c91", "none", False),
        ("8086:a110", "none", False),  # Sunrise Point without an ACS capability: no quirk
        ("8086:a110", "full", True),
        ("17cb:0401", "none", True),  # Qualcomm QDF2xxx: no peer-to-peer, whatever ACS says
        ("177d:a001", "none", True),  # Cavium ThunderX root port
        ("1c36:0031", "none", True),  # Annapurna Labs
        ("1d17:0710", "none", True),  # Zhaoxin, listed
        ("1d17:0700", "full", False),  # Zhaoxin, not listed: not isolated, whatever ACS says
    ],
)
def test_a_quirk_decides_a_root_ports_isolation_as_the_kernel_does(
    port_id: str, acs: str, isolated: bool
) -> None:
    assert alone(port_id, acs) is isolated


def test_root_port_quirks_do_not_apply_to_other_kinds() -> None:
    assert not alone("8086:1c10", kind="switch-downstream")  # the PCH rule is for root ports
    assert alone("1d17:0710", kind="switch-downstream")  # Zhaoxin's names downstream ports too


@pytest.mark.parametrize(
    ("fn_id", "isolated"),
    [
        ("8086:1521", True),  # I350: a multi-function NIC without peer-to-peer between functions
        ("8086:10d3", False),  # an e1000e, no quirk
        ("1924:0903", True),  # Solarflare
        ("8088:1001", True),  # Wangxun SP, listed
        ("8088:1000", False),  # Wangxun, not listed: not isolated
    ],
)
def test_multi_function_endpoint_quirks(fn_id: str, isolated: bool) -> None:
    text = f"""
name: mf
iommus: [{{name: dmar0}}]
devices:
  - bdf: 0000:00:01.0
    kind: root-port
    acs: full
    children:
      - {{bdf: 0000:01:00.0, kind: endpoint, id: "{fn_id}"}}
      - {{bdf: 0000:01:00.1, kind: endpoint, id: "{fn_id}"}}
"""
    host = parse_platform(text)
    assert (host.group_of(bdf("01:00.0")) != host.group_of(bdf("01:00.1"))) is isolated


def test_intel_integrated_endpoints_and_amd_southbridge_functions() -> None:
    text = """
name: rc
iommus: [{name: dmar0}]
devices:
  - {bdf: 0000:00:14.0, kind: rc-endpoint, id: "8086:a36d"}
  - {bdf: 0000:00:14.2, kind: rc-endpoint, id: "8086:a36f"}
  - {bdf: 0000:00:15.0, kind: rc-endpoint, id: "1234:0001"}
  - {bdf: 0000:00:15.1, kind: rc-endpoint, id: "1234:0001"}
  - {bdf: 0000:00:14.3, kind: pci-endpoint, id: "1002:4385"}
"""
    host = parse_platform(text)
    assert host.group_of(bdf("00:14.0")) != host.group_of(bdf("00:14.2"))  # Intel RCiEPs
    assert host.group_of(bdf("00:15.0")) == host.group_of(bdf("00:15.1"))  # no quirk
    decided = quirk_decision(host.topology, host.topology[bdf("00:14.3")])
    assert decided is not None and decided.isolated and decided.quirk.rule is Rule.AMD_SB


def test_the_report_says_when_a_quirk_decided() -> None:
    host = parse_platform(two_ports("8086:1c10"))
    report = audit(Toolstack(SimPlatform(host), Options()), "quirks")
    notes = [n.message for g in report.groups for n in g.notes if n.code == "acs-quirk"]
    expected = "0000:00:1c.0 is isolated by the kernel's ACS quirk for Intel PCH root ports (Linux 6.1.176)"
    assert expected in notes
    plain = audit(Toolstack(SimPlatform(parse_platform(two_ports("8086:3420")))), "plain")
    assert not [n for g in plain.groups for n in g.notes if n.code == "acs-quirk"]


def test_the_table_is_the_kernels_in_size_and_order() -> None:
    # Linux 6.1.176's pci_dev_acs_enabled[] has 132 entries before its terminator.
    assert len(QUIRKS) == 132
    assert (QUIRKS[0].vendor, QUIRKS[0].device) == (0x1002, 0x4385)
    assert (QUIRKS[-1].vendor, QUIRKS[-1].rule) == (0x8088, Rule.WANGXUN)
