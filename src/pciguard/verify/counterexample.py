"""Counterexamples as scenario files: a trace the explorer found, written so that
``pciguard simulate`` replays it to the same violation."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import yaml

from pciguard.formats.scenario_file import Scenario, ScenarioStep
from pciguard.verify.explorer import Counterexample, describe_key

_DEFAULTS = {f.name: f.default for f in fields(ScenarioStep)}


def step_to_dict(step: ScenarioStep) -> dict[str, Any]:
    """The scenario-file form of a parsed step (only what differs from the defaults)."""
    out: dict[str, Any] = {"op": step.op}
    for f in fields(ScenarioStep):
        value = getattr(step, f.name)
        if f.name in ("op", "line") or value == _DEFAULTS[f.name]:
            continue
        out[f.name] = str(value) if f.name in ("device", "requester", "peer") else value
    return out


def scenario_document(
    scenario: Scenario, found: Counterexample, keys: list[tuple[Any, ...]]
) -> dict[str, Any]:
    """A complete scenario file for the counterexample.

    ``keys`` gives, for each action of the trace that started an operation, the key the
    operation had in flight, so later ``continue`` steps can name it.
    """
    label_of: dict[tuple[Any, ...], str] = {}
    begins = iter(keys)
    steps: list[dict[str, Any]] = []
    for action in found.actions:
        if action.kind in ("advance", "fail"):
            step: dict[str, Any] = {"op": "continue", "id": label_of[action.key]}
            if action.kind == "fail":
                step["fail"] = True
        elif action.kind == "crash":
            step = {"op": "crash", "vm": action.vm, "cleanup": False}
        else:
            label = f"op{len(label_of) + 1}"
            label_of[next(begins)] = label
            step = {"op": "hotplug" if action.kind == "hotplug" else action.op, "id": label, "partial": 0}
            if action.op == "make-assignable" and scenario.explore and not scenario.explore.whole_groups:
                step["with_group"] = False
            if action.device is not None:
                step["device"] = str(action.device)
            if action.vm is not None:
                step["vm"] = action.vm
        steps.append(step)
    broken = sorted({v.invariant for v in found.violations})
    comment = "; ".join(f"{v.invariant}: {v.message}" for v in found.violations)
    labels = {label: describe_key(key) for key, label in label_of.items()}
    return {
        "name": f"{scenario.name}-counterexample",
        "description": f"Shortest trace found by pciguard verify. It ends in: {comment}. "
        + "Operations: "
        + ", ".join(f"{k} = {v}" for k, v in labels.items()),
        "platform": scenario.platform_source,
        "quarantine": scenario.quarantine_mode,
        "options": {
            "allow_unsafe_interrupts": scenario.options.allow_unsafe_interrupts,
            "rmrr": scenario.options.rmrr.value,
        },
        "flaws": sorted(f.value for f in scenario.options.flaws),
        "vms": [{"name": name, "iommu": iommu} for name, iommu in scenario.vms],
        "expect_violations": broken,
        "steps": [step_to_dict(s) for s in scenario.steps] + steps,
    } | ({"policy": scenario.policy_source} if scenario.policy_source is not None else {})


def dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)
