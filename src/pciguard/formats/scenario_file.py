"""Scenario files: a platform, VMs, and a list of steps (operations, hot-plugs,
injected faults, DMA and MSI probes) that ``pciguard simulate`` replays.

See ``docs/scenario-format.md``. ``parse_scenario(text, source, base_dir)`` turns the
text into a ``Scenario``; the platform may be inline or a path relative to the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path as FsPath
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pciguard.checks import Options, RmrrPolicy
from pciguard.errors import InputError, PolicyError
from pciguard.formats.platform_file import build_host, load_platform
from pciguard.formats.policy_file import load_policy
from pciguard.formats.yamlpos import Path, at, load, read_input, validate
from pciguard.legacy import Flaw
from pciguard.model import Bdf, Host
from pciguard.platforms.base import STEPS
from pciguard.policy.rules import Policy, parse_rule

#: What the verifier may do, besides advancing operations in flight.
ExploreOp = Literal[
    "make-assignable", "make-unassignable", "assign", "release", "recover", "destroy", "crash", "hotplug"
]
#: Operations that can be started and left in flight (``id`` + ``partial``).
PARTIAL_OPS = tuple(op for op in get_args(ExploreOp) if op != "crash")
Op = Literal[ExploreOp, "create-vm", "unplug", "fault", "dma", "msi", "continue"]

#: Which keys each operation needs.
REQUIRED: dict[str, tuple[str, ...]] = {
    "create-vm": ("vm",),
    "make-assignable": ("device",),
    "make-unassignable": ("device",),
    "assign": ("device", "vm"),
    "release": ("device",),
    "recover": ("device",),
    "destroy": ("vm",),
    "crash": ("vm",),
    "hotplug": ("device",),
    "unplug": ("device",),
    "fault": ("call",),
    "dma": ("device",),
    "msi": ("device",),
    "continue": ("id",),
}
EXPECTATIONS: dict[str, tuple[str, ...]] = {
    "dma": ("landed", "blocked"),
    "msi": ("delivered", "blocked"),
}
OPERATION_OUTCOMES = ("ok", "refused", "failed")
PLATFORM_CALLS = STEPS  # what a fault step may name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VmSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")
    iommu: bool = True


class OptionsSpec(_Strict):
    allow_unsafe_interrupts: bool = False
    rmrr: RmrrPolicy = RmrrPolicy.STRICT


class StepSpec(_Strict):
    op: Op
    device: str | None = None
    vm: str | None = None
    iommu: bool = True
    with_group: bool = True
    call: str | None = None
    skip: int = Field(0, ge=0)
    times: int | None = Field(1, ge=1)
    address: int = Field(0, ge=0)
    requester: str | None = None
    peer: str | None = None
    target: str | None = None
    expect: str | None = None
    expect_in: str | None = None
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="names an operation in flight")
    partial: int | None = Field(None, ge=0, description="platform calls to take, then pause")
    count: int = Field(1, ge=1, description="continue: how many platform calls to take")
    fail: bool = Field(False, description="continue: the next platform call fails")
    cleanup: bool = Field(True, description="crash: the toolstack cleans up at once")

    @model_validator(mode="after")
    def _fits_op(self) -> StepSpec:
        for key in REQUIRED[self.op]:
            if getattr(self, key) is None:
                raise ValueError(f"'{self.op}' needs '{key}'")
        if self.partial is not None and (self.op not in PARTIAL_OPS or self.id is None):
            raise ValueError(f"'partial' needs an 'id' and one of {', '.join(PARTIAL_OPS)}")
        allowed = EXPECTATIONS.get(self.op, OPERATION_OUTCOMES)
        if self.expect is not None and self.expect not in allowed:
            raise ValueError(f"expect for '{self.op}' is one of {', '.join(allowed)}")
        if self.call is not None and self.call not in PLATFORM_CALLS:
            raise ValueError(f"call must be one of {', '.join(PLATFORM_CALLS)}")
        return self


class ExploreSpec(_Strict):
    """What ``pciguard verify`` explores from the state the steps leave."""

    devices: list[str] | None = Field(None, description="default: every endpoint the host can spare")
    operations: list[ExploreOp] = list(get_args(ExploreOp))
    faults: int = Field(1, ge=0, le=3, description="injected failures per trace")
    concurrency: int = Field(2, ge=1, le=4, description="operations in flight at once")
    whole_groups: bool = Field(True, description="make-assignable takes the device's whole group")


class ScenarioFile(_Strict):
    name: str = ""
    description: str = ""
    platform: str | dict[str, Any]
    quarantine: Literal["block", "scratch"] = "block"
    options: OptionsSpec = OptionsSpec()
    flaws: list[Flaw] = []
    vms: list[VmSpec] = []
    steps: list[StepSpec]
    expect_violations: list[str] | None = Field(
        None, description="the invariants this scenario is meant to break (legacy demos)"
    )
    explore: ExploreSpec | None = None
    policy: str | list[str] | None = Field(
        None, description="hot-plug policy: a rules file (relative to this file) or the rules inline"
    )

    @model_validator(mode="after")
    def _known_invariants(self) -> ScenarioFile:
        from pciguard.verify.invariants import INVARIANTS, PLATFORM_CONTRACT

        unknown = set(self.expect_violations or ()) - {*INVARIANTS, PLATFORM_CONTRACT}
        if unknown:
            raise ValueError(f"unknown invariant(s) {sorted(unknown)}; known: {sorted(INVARIANTS)}")
        return self


@dataclass(frozen=True)
class ScenarioStep:
    op: str
    device: Bdf | None = None
    vm: str | None = None
    iommu: bool = True
    with_group: bool = True
    call: str | None = None
    skip: int = 0
    times: int | None = 1
    address: int = 0
    requester: Bdf | None = None
    peer: Bdf | None = None
    target: str | None = None
    expect: str | None = None
    expect_in: str | None = None
    id: str | None = None
    partial: int | None = None
    count: int = 1
    fail: bool = False
    cleanup: bool = True
    line: int | None = None

    def __str__(self) -> str:
        if self.op == "continue":
            return (
                f"continue {self.id}"
                + (" (its next call fails)" if self.fail else "")
                + (f" x{self.count}" if self.count > 1 else "")
            )
        parts = [self.op]
        if self.op == "fault":
            parts.append(f"{self.call}({self.device or 'any device'})")
            if self.skip:
                parts.append(f"after {self.skip} matching calls")
            parts.append("every time" if self.times is None else f"x{self.times}")
            return " ".join(parts)
        if self.device:
            parts.append(str(self.device))
        if self.op == "assign":
            parts.append(f"-> {self.vm}")
        elif self.vm:
            parts.append(str(self.vm))
        if self.op == "dma":
            parts.append(f"@ {self.address:#x}")
            if self.requester:
                parts.append(f"as {self.requester}")
            if self.peer:
                parts.append(f"to BAR of {self.peer}")
        if self.op == "msi":
            parts.append(f"-> {self.target or 'host'}")
        if self.partial is not None:
            parts.append(f"[{self.id}: {self.partial} call(s), then paused]")
        return " ".join(parts)


@dataclass(frozen=True)
class Exploration:
    """What ``pciguard verify`` may do from the state the steps leave."""

    devices: tuple[Bdf, ...]
    operations: tuple[str, ...]
    faults: int = 1
    concurrency: int = 2
    whole_groups: bool = True


@dataclass(frozen=True)
class Scenario:
    name: str
    host: Host
    quarantine_mode: str = "block"
    options: Options = field(default_factory=Options)
    vms: tuple[tuple[str, bool], ...] = ()
    steps: tuple[ScenarioStep, ...] = ()
    description: str = ""
    expect_violations: frozenset[str] | None = None
    explore: Exploration | None = None
    platform_source: str | dict[str, Any] = ""  # the platform as the file gave it (path made absolute)
    policy: Policy | None = None  # None: the built-in DefaultPolicy
    policy_source: str | list[str] | None = None  # as the file gave it (path made absolute)


def parse_scenario(text: str, source: str = "<scenario>", base_dir: FsPath | None = None) -> Scenario:
    data, positions = load(text, source)
    spec = validate(ScenarioFile, data, positions, source)
    assert isinstance(data, dict)
    platform_source: str | dict[str, Any]
    if isinstance(spec.platform, str):
        path = (base_dir or FsPath(".")) / spec.platform
        platform_source = str(path.resolve())
        try:
            host = load_platform(path)
        except InputError as exc:
            raise at(source, f"its platform file failed to load: {exc}", ("platform",), positions) from None
    else:
        platform_source = data["platform"]
        host = build_host(data["platform"], positions, source, prefix=("platform",))

    def bdf(key: str, value: str | None, where: Path) -> Bdf | None:
        if value is None:
            return None
        try:
            parsed = Bdf.parse(value)
        except ValueError as exc:
            raise at(source, str(exc), (*where, key), positions) from None
        if parsed not in host.topology and key != "requester":
            raise at(source, f"{parsed} is not a device of platform '{host.name}'", (*where, key), positions)
        return parsed

    vm_names = [v.name for v in spec.vms]
    ids: set[str] = set()
    steps = []
    for i, step in enumerate(spec.steps):
        where: Path = ("steps", i)
        if step.op == "continue" and step.id not in ids:
            raise at(
                source,
                f"no operation '{step.id}' was left in flight before this step",
                (*where, "id"),
                positions,
            )
        if step.partial is not None:
            if step.id in ids:
                raise at(source, f"'{step.id}' names another operation already", (*where, "id"), positions)
            ids.add(step.id or "")

        if (
            step.op == "hotplug"
            and step.device
            and bdf("device", step.device, where) not in host.hotplug_later
        ):
            raise at(
                source,
                f"{step.device} is present from boot; mark it 'hotplug: true' in the platform",
                (*where, "device"),
                positions,
            )
        if step.op == "create-vm":
            vm_names.append(step.vm or "")
        elif step.vm is not None and step.vm not in vm_names:
            raise at(
                source, f"no VM named '{step.vm}' is declared before this step", (*where, "vm"), positions
            )
        steps.append(
            ScenarioStep(
                **step.model_dump(exclude={"device", "requester", "peer"}),
                device=bdf("device", step.device, where),
                requester=bdf("requester", step.requester, where),
                peer=bdf("peer", step.peer, where),
                line=positions.get(where, (None, None))[0],
            )
        )
    options = Options(spec.options.allow_unsafe_interrupts, spec.options.rmrr, frozenset(spec.flaws))
    explore = None
    if spec.explore is not None:
        if spec.explore.devices is None:
            devices = tuple(
                b for b, f in host.topology.items() if not f.kind.is_bridge and not f.host_critical
            )
        else:
            devices = tuple(
                bdf("devices", d, ("explore", "devices", i)) or Bdf(0, 0, 0, 0)
                for i, d in enumerate(spec.explore.devices)
            )
        explore = Exploration(
            devices,
            tuple(dict.fromkeys(spec.explore.operations)),
            spec.explore.faults,
            spec.explore.concurrency,
            spec.explore.whole_groups,
        )
    policy, policy_source = _policy(spec.policy, source, base_dir, positions)
    return Scenario(
        name=spec.name or (FsPath(source).stem if source != "<scenario>" else "scenario"),
        host=host,
        quarantine_mode=spec.quarantine,
        options=options,
        vms=tuple((v.name, v.iommu) for v in spec.vms),
        steps=tuple(steps),
        description=spec.description,
        expect_violations=None if spec.expect_violations is None else frozenset(spec.expect_violations),
        explore=explore,
        platform_source=platform_source,
        policy=policy,
        policy_source=policy_source,
    )


def _policy(
    given: str | list[str] | None,
    source: str,
    base_dir: FsPath | None,
    positions: dict[Path, tuple[int, int]],
) -> tuple[Policy | None, str | list[str] | None]:
    if given is None:
        return None, None
    if isinstance(given, str):
        path = ((base_dir or FsPath(".")) / given).resolve()
        try:
            return load_policy(path), str(path)
        except InputError as exc:
            raise at(source, f"its policy file failed to load: {exc}", ("policy",), positions) from None
    rules = []
    for i, text in enumerate(given):
        line, column = positions.get(("policy", i), (None, None))
        try:
            rules.append(replace(parse_rule(text, source), line=line or 0))
        except PolicyError as exc:
            raise PolicyError(
                source,
                f"policy rule {i + 1}: {exc.detail}",
                line=line,
                column=None if column is None or exc.column is None else column + exc.column - 1,
            ) from None
    return Policy(tuple(rules), source), list(given)


def load_scenario(path: str | FsPath) -> Scenario:
    path = FsPath(path)
    text = read_input(path, "scenario file")
    return parse_scenario(text, str(path), path.parent)
