"""Hypothesis strategies shared by the property tests: random platform descriptions
(root ports, switches, PCIe-to-PCI bridges, multi-function devices, phantom
functions, SR-IOV, firmware regions and IVMD ranges, ATS, BARs that may share a page,
shared legacy interrupt lines, resets that may fail, external ports, IOMMUs on and
off), and hot-plug policies in the rule language."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from pciguard.policy import Target
from pciguard.policy.rules import ATTRIBUTES, CONDITIONS, Attribute, Condition, Operator, Policy, Rule


@st.composite
def endpoint(draw: st.DrawFn, bus: int, kind: str = "endpoint") -> list[dict[str, Any]]:
    functions = draw(st.integers(1, 2)) if kind == "endpoint" else 1
    acs = draw(st.sampled_from(["full", "none"]))
    out = []
    for fn in range(functions):
        dev: dict[str, Any] = {
            "bdf": f"0000:{bus:02x}:00.{fn}",
            "kind": kind,
            "acs": acs,
            "driver": draw(st.sampled_from([None, "drv"])),
            "reset": draw(st.sampled_from([["flr"], ["bus"], []])),
        }
        if draw(st.booleans()) and kind == "endpoint" and functions == 1:
            dev["phantom_functions"] = 1
        if draw(st.integers(0, 5)) == 0:
            dev["reserved_regions"] = [
                {"name": f"r{bus}", "start": 0x1000_0000 + bus * 0x10000, "end": 0x1000_FFFF + bus * 0x10000}
            ]
        if kind == "endpoint" and functions == 1 and draw(st.integers(0, 3)) == 0:
            dev["sriov"] = {"vfs": draw(st.integers(1, 2)), "offset": 8}
        dev["ats"] = draw(st.booleans())
        dev["reset_may_fail"] = draw(st.integers(0, 3)) == 0
        dev["intx"] = draw(st.sampled_from([None, None, 16, 17]))
        slot = bus * 8 + fn
        if draw(st.booleans()):  # packed: a 256-byte BAR; neighbours' share 4 KiB pages
            dev["bars"] = [{"start": 0xFE00_0000 + slot * 0x800, "end": 0xFE00_00FF + slot * 0x800}]
        else:
            dev["bars"] = [{"start": 0xF000_0000 + slot * 0x10000, "end": 0xF000_3FFF + slot * 0x10000}]
        out.append(dev)
    return out


@st.composite
def platform_file(draw: st.DrawFn) -> dict[str, Any]:
    devices: list[dict[str, Any]] = []
    bus = 1
    for slot in range(1, draw(st.integers(1, 4)) + 1):
        port: dict[str, Any] = {
            "bdf": f"0000:00:{slot:02x}.0",
            "kind": "root-port",
            "driver": "pcieport",
            "acs": draw(st.sampled_from(["full", "none"])),
            "external": draw(st.booleans()),
        }
        shape = draw(st.sampled_from(["endpoint", "switch", "pci-bridge"]))
        hotplug = draw(st.booleans())
        if shape == "endpoint":
            children = draw(endpoint(bus))
            bus += 1
        elif shape == "switch":
            downstream = []
            up_bus, port_bus, bus = bus, bus + 1, bus + 2
            for d in range(draw(st.integers(1, 2))):
                leaf = draw(endpoint(bus))
                downstream.append(
                    {
                        "bdf": f"0000:{port_bus:02x}:{d:02x}.0",
                        "kind": "switch-downstream",
                        "acs": draw(st.sampled_from(["full", "none"])),
                        "children": leaf,
                    }
                )
                bus += 1
            children = [{"bdf": f"0000:{up_bus:02x}:00.0", "kind": "switch-upstream", "children": downstream}]
        else:
            legacy = [
                {"bdf": f"0000:{bus + 1:02x}:{d + 1:02x}.0", "kind": "pci-endpoint", "reset": ["bus"]}
                for d in range(draw(st.integers(1, 2)))
            ]
            children = [{"bdf": f"0000:{bus:02x}:00.0", "kind": "pcie-to-pci-bridge", "children": legacy}]
            bus += 2
        if hotplug:
            for child in children:
                child["hotplug"] = True
        port["children"] = children
        devices.append(port)
    for fn in range(draw(st.integers(0, 2))):
        devices.append(
            {
                "bdf": f"0000:00:1f.{fn}",
                "kind": "rc-endpoint",
                "driver": "drv",
                "host_critical": draw(st.booleans()),
            }
        )
    iommus = [
        {
            "name": "dmar0",
            "dma_remapping": draw(st.sampled_from(["enabled", "enabled", "disabled"])),
            "interrupt_remapping": draw(st.sampled_from(["enabled", "absent"])),
        }
    ]
    if draw(st.integers(0, 5)) == 0:
        iommus = []
    unity_maps = []
    integrated = [d["bdf"] for d in devices if d["kind"] == "rc-endpoint"]
    if integrated and draw(st.booleans()):  # an IVMD entry for a range of requester IDs
        unity_maps.append(
            {
                "name": "ivmd",
                "start": 0x2000_0000,
                "end": 0x2000_FFFF,
                "devices": {"first": "0000:00:1f.0", "last": draw(st.sampled_from(integrated))},
            }
        )
    return {"name": "random", "iommus": iommus, "devices": devices, "unity_maps": unity_maps}


# -- hot-plug policies (the rule language) ----------------------------------------------
PATTERN = {
    "id": st.sampled_from(["8086:1572", "8086:*", "*:*", "10de:1b80"]),
    "class": st.sampled_from(["02", "02:00", "03:*:00", "0c:03:30"]),
    "via-port": st.sampled_from(["0000:00:1c.0", "0000:00:1c.0/0000:02:00.0"]),
    "name": st.text(min_size=1, max_size=12),
    "vendor-name": st.text(min_size=1, max_size=12),
    "unique-id": st.text(alphabet="0123456789abcdef-", min_size=1, max_size=12),
}


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    """Any well-formed rule."""
    names = draw(st.lists(st.sampled_from(sorted(ATTRIBUTES)), unique=True, max_size=4))
    attributes = []
    for name in names:
        if name not in PATTERN:
            attributes.append(Attribute(name))
            continue
        operators = [o for o in Operator if o is not Operator.EQUALS or ATTRIBUTES[name].equals]
        patterns = draw(st.lists(PATTERN[name], min_size=1, max_size=3))
        operator = draw(st.sampled_from(operators)) if len(patterns) > 1 else Operator.ONE_OF
        attributes.append(Attribute(name, operator, tuple(patterns)))
    condition = None
    if draw(st.booleans()):
        terms = tuple(
            draw(
                st.lists(
                    st.tuples(st.booleans(), st.sampled_from(sorted(CONDITIONS))), min_size=1, max_size=3
                )
            )
        )
        operator = (
            None
            if len(terms) == 1
            else draw(st.sampled_from([Operator.ONE_OF, Operator.ALL_OF, Operator.NONE_OF]))
        )
        condition = Condition(terms, operator)
    return Rule(draw(st.sampled_from(list(Target))), tuple(attributes), condition)


def policies() -> st.SearchStrategy[Policy]:
    return st.lists(rules(), max_size=5).map(lambda found: Policy(tuple(found), "<random>"))
