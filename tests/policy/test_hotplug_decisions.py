"""Policies decide simulated hot-plugs: every target carried out by the secure
toolstack, and the device's DMA afterwards, on the workstation's Thunderbolt ports."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES
from pciguard.formats.scenario_file import parse_scenario
from pciguard.model import Bdf
from pciguard.model.ownership import State
from pciguard.simulate import SimulationResult, run

ENCLOSURE, FAKE_BRIDGE = "0000:05:00.0", "0000:06:00.0"


def plug(device: str, *rules: str) -> SimulationResult:
    text = json.dumps(
        {
            "platform": str(EXAMPLES / "workstation.yaml"),
            "policy": list(rules),
            "steps": [
                {"op": "hotplug", "device": device, "expect": "ok"},
                {"op": "dma", "device": device, "address": 0x1000},
            ],
        }
    )
    result = run(parse_scenario(text, "<test>"))
    assert not result.violations and not result.unmet
    return result


@pytest.mark.parametrize(
    ("rules", "state", "dma"),
    [
        (["allow id 1987:5012 via-port 0000:00:07.0"], State.HOST, "landed"),
        (["allow id 1987:5012 via-port 0000:00:07.1"], State.QUARANTINED, "blocked"),  # other port: no match
        (["quarantine class 01:08:*", "allow"], State.QUARANTINED, "blocked"),
        (["reject if external", "allow"], State.REMOVED, "blocked"),
        ([], State.QUARANTINED, "blocked"),  # the implicit target
    ],
)
def test_each_target_is_carried_out(rules: list[str], state: State, dma: str) -> None:
    result = plug(ENCLOSURE, *rules)
    assert result.toolstack.ledger[Bdf.parse(ENCLOSURE)].state is state
    assert result.timeline[-1].status == dma


def test_the_deciding_rule_is_named_with_its_line() -> None:
    result = plug(ENCLOSURE, "allow id 8086:*", "quarantine id 1987:*")
    decision = result.toolstack.ledger[Bdf.parse(ENCLOSURE)].decision
    assert decision is not None and decision.rule == "<test>:1: quarantine id 1987:*"


def test_a_device_presenting_itself_as_a_bridge_needs_a_rule_that_says_bridge() -> None:
    rejected = plug(FAKE_BRIDGE, "allow id 8086:*")
    assert rejected.toolstack.ledger[Bdf.parse(FAKE_BRIDGE)].state is State.REMOVED
    admitted = plug(FAKE_BRIDGE, "allow bridge id 8086:15d3 via-port 0000:00:07.1")
    assert admitted.toolstack.ledger[Bdf.parse(FAKE_BRIDGE)].state is State.HOST


def test_the_bundled_policy_scenario_runs_as_expected() -> None:
    from pciguard.formats.scenario_file import load_scenario

    assert run(load_scenario(EXAMPLES / "scenarios" / "hotplug-policy.yaml")).as_expected
