"""The secure toolstack: every workflow written once, against ``Platform``.

Each operation is checked completely, then planned as a list of atomic platform
steps, then executed. Ownership moves in the ledger only through the table in
``model.ownership``: an operation *claims* its devices (an in-flight state), runs its
steps, and then *commits*. When a step fails it unwinds in reverse, which always ends
in quarantine for anything a guest could have touched; if even the unwinding fails,
the guest is crashed and the device is marked broken.

This is the secure toolstack alone. The historic flaws the verifier demonstrates
live in ``pciguard.legacy``, which overrides the few methods each changes (the
checks it skipped, the steps it took), never the ledger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import NamedTuple

from pciguard.checks import (
    Holder,
    Options,
    Reason,
    device_reasons,
    group_reasons,
    iommu_reason,
    msi_reason,
    shared_resource_reasons,
)
from pciguard.errors import (
    PreconditionFailed,
    RefusedError,
    StepFailed,
)
from pciguard.model import Bdf, Host
from pciguard.model.ownership import TRANSITIONS, Event, State, next_state
from pciguard.platforms.base import HOST, QUARANTINE, DomainState, Platform
from pciguard.policy import Decision, DefaultPolicy, HotplugPolicy, Target


@dataclass(frozen=True)
class Step:
    """One call of a ``Platform`` method."""

    call: str
    device: Bdf | None = None
    domain: str | None = None

    def __str__(self) -> str:
        args = ", ".join(str(a) for a in (self.device, self.domain) if a is not None)
        return f"{self.call}({args})"


@dataclass(frozen=True)
class Unsafe:
    """An unsafe override one device relies on while it is assigned."""

    device: Bdf
    why: str

    def __str__(self) -> str:
        return f"{self.device} {self.why}"


@dataclass(frozen=True)
class Plan:
    operation: str
    devices: tuple[Bdf, ...]  # whose ledger records move
    vm: str | None
    steps: tuple[Step, ...]
    claim: Event | None  # the event that claims the devices (None: no in-flight state)
    finish: Event | None = Event.COMMIT  # None: no change of owner (offering a host driver)
    forward_only: bool = False  # release: on failure push on to quarantine, never back
    unsafe: tuple[Unsafe, ...] = ()  # overrides this plan relies on, for every report
    prepared: bool = True  # False: XSA-306's path that assigns without preparing

    def describe(self) -> Iterator[str]:
        direction = "from" if self.operation in ("release", "recover") else "->"
        target = f" {direction} {self.vm}" if self.vm else ""
        yield f"{self.operation} {', '.join(map(str, self.devices))}{target}"
        for i, step in enumerate(self.steps, 1):
            yield f"  {i}. {step}"


class FrozenRecord(NamedTuple):
    """A ``DeviceRecord`` as a hashable value (the verifier's states hold these)."""

    state: State
    vm: str | None
    driver: bool
    context: str | None
    msi: str | None
    exposed: str | None
    reserved: frozenset[str]
    stale: frozenset[str]
    guest_touched: bool
    prepared: bool
    decision: Decision | None
    unsafe: tuple[Unsafe, ...]


class LedgerSnapshot(NamedTuple):
    """The ledger as one value: each device's record, and the VMs still running when
    their teardown finished."""

    records: frozenset[tuple[Bdf, FrozenRecord]]
    torn_down: frozenset[str]


@dataclass
class DeviceRecord:
    """What the toolstack knows of one device: its state and what it has set up."""

    state: State
    vm: str | None = None
    driver: bool = False
    context: str | None = None
    msi: str | None = None
    exposed: str | None = None
    reserved: set[str] = field(default_factory=set)
    stale: set[str] = field(default_factory=set)  # domains the IOTLB may still translate to
    guest_touched: bool = False  # a guest had it since the host last took it back
    prepared: bool = True  # went through make_assignable (XSA-306 tracks the other path)
    decision: Decision | None = None  # the hot-plug decision, if it was hot-plugged
    unsafe: tuple[Unsafe, ...] = ()  # what its current assignment relies on; () once it is back

    def holder(self) -> Holder:
        return Holder(self.state, self.vm)

    def freeze(self) -> FrozenRecord:
        return FrozenRecord(
            **(vars(self) | {"reserved": frozenset(self.reserved), "stale": frozenset(self.stale)})
        )

    @classmethod
    def thaw(cls, frozen: FrozenRecord) -> DeviceRecord:
        # The fields are the same, in the same order (a test holds them so).
        record = cls(*frozen)  # type: ignore[arg-type]  # the two sets are made sets below
        record.reserved, record.stale = set(frozen.reserved), set(frozen.stale)
        return record


class Before(NamedTuple):
    """What a step's undo needs of the device's record as it was before the step."""

    context: str | None
    msi: str | None


@dataclass(frozen=True)
class Effect:
    """What a device step does to the ledger record of its device once the platform
    carried it out (``apply``), and the steps that undo it (``undo``)."""

    apply: Callable[[DeviceRecord, Step, Before], None]
    undo: Callable[[Step, Before], list[Step]]


def _attached(rec: DeviceRecord, step: Step, before: Before) -> None:
    rec.context = step.domain
    if before.context not in (None, step.domain):
        rec.stale.add(before.context)  # until a flush, the IOTLB may still translate there


def _removed(rec: DeviceRecord, step: Step, before: Before) -> None:
    rec.context = rec.msi = rec.exposed = None


def _setting(field_name: str, value: object) -> Callable[[DeviceRecord, Step, Before], None]:
    return lambda rec, step, before: setattr(rec, field_name, step.domain if value is DOMAIN else value)


def _undone_by(call: str, domain: object = None) -> Callable[[Step, Before], list[Step]]:
    """The undo of a step: one call on the same device (``DOMAIN``: the step's domain)."""
    return lambda step, before: [Step(call, step.device, step.domain if domain is DOMAIN else None)]


DOMAIN = object()  # stands for "the step's own domain" in the table below
NOTHING: Callable[[Step, Before], list[Step]] = lambda step, before: []  # noqa: E731

#: Every device step of the Platform protocol: its mark on the ledger, and its undo.
EFFECTS: dict[str, Effect] = {
    "unbind_host_driver": Effect(_setting("driver", False), _undone_by("bind_host_driver")),
    "bind_host_driver": Effect(_setting("driver", True), _undone_by("unbind_host_driver")),
    "offer_host_driver": Effect(_setting("driver", True), _undone_by("unbind_host_driver")),
    "reset": Effect(lambda rec, step, before: None, NOTHING),
    "attach": Effect(
        _attached,
        lambda step, before: [
            Step("attach", step.device, before.context or QUARANTINE),
            Step("flush_iotlb", step.device),
        ],
    ),
    "flush_iotlb": Effect(lambda rec, step, before: rec.stale.clear(), NOTHING),
    "map_reserved": Effect(
        lambda rec, step, before: rec.reserved.add(step.domain or ""), _undone_by("unmap_reserved", DOMAIN)
    ),
    "unmap_reserved": Effect(lambda rec, step, before: rec.reserved.discard(step.domain or ""), NOTHING),
    "route_msi": Effect(
        _setting("msi", DOMAIN),
        lambda step, before: [Step("route_msi", step.device, before.msi or QUARANTINE)],
    ),
    "expose": Effect(_setting("exposed", DOMAIN), _undone_by("unexpose", DOMAIN)),
    "unexpose": Effect(_setting("exposed", None), NOTHING),
    "remove": Effect(_removed, NOTHING),
}


class Phase(StrEnum):
    RUN = "run"  # the plan's own steps
    UNWIND = "unwind"  # undoing what ran, most recent first
    FORWARD = "forward"  # pushing on to quarantine whatever else fails (release, teardown)


@dataclass(frozen=True)
class Cursor:
    """An operation in flight, as a value: where it stands and how to undo what ran.

    ``Toolstack.advance`` takes one step and returns the next cursor, so operations
    can be interleaved one platform call at a time.
    """

    plan: Plan
    phase: Phase
    steps: tuple[Step, ...]  # the current phase's steps
    index: int = 0  # the next of them
    undo: tuple[tuple[Step, ...], ...] = ()  # for each step done in RUN, its undo steps
    failure: str | None = None  # the first failure, once there is one
    stuck: tuple[str, ...] = ()  # FORWARD steps that failed as well

    @property
    def next_step(self) -> Step | None:
        return self.steps[self.index] if self.index < len(self.steps) else None


@dataclass(frozen=True)
class Outcome:
    """How an operation ended: ``failure`` is None when every step went through."""

    plan: Plan
    failure: str | None
    message: str


class OperationFailed(StepFailed):
    """A step failed and the operation was unwound; ``outcome`` says where things ended."""

    def __init__(self, plan: Plan, cause: str, outcome: str) -> None:
        self.plan = plan
        self.cause = cause
        self.outcome = outcome
        super().__init__(plan.operation, f"{cause}; {outcome}")


class Toolstack:
    def __init__(
        self,
        platform: Platform,
        options: Options | None = None,
        policy: HotplugPolicy | None = None,
    ) -> None:
        self.platform = platform
        self.options = options or Options()
        self.policy = policy or DefaultPolicy()
        self.notes: list[str] = []
        self.observers: list[Callable[[], None]] = []  # called after every ledger change
        self.ledger: dict[Bdf, DeviceRecord] = {}
        self.torn_down: frozenset[str] = frozenset()  # VMs still running when their teardown finished
        for bdf in platform.host.topology:
            if platform.present(bdf):
                context = platform.context_of(bdf)
                self.ledger[bdf] = DeviceRecord(
                    State.HOST,
                    driver=platform.host_driver_bound(bdf),
                    context=context,
                    msi=context,
                )
                if context == QUARANTINE:  # held away from the host already (a host at start)
                    self._move(bdf, Event.ADOPT, None)
                elif context is not None and context != HOST and context in platform.domains():
                    self._move(bdf, Event.ADOPT, None)
                    self.adopt_assigned(bdf, context)

    # -- the ledger as one value (for the verifier) --------------------------------
    def snapshot(self, only: frozenset[Bdf] | None = None) -> LedgerSnapshot:
        """The ledger as one value; with ``only``, the records of those devices alone
        (the verifier leaves out devices no operation it runs can touch)."""
        ledger = self.ledger
        if only is None:
            records = frozenset((bdf, rec.freeze()) for bdf, rec in ledger.items())
        else:
            records = frozenset((bdf, ledger[bdf].freeze()) for bdf in only if bdf in ledger)
        return LedgerSnapshot(records, self.torn_down)

    def restore(self, frozen: LedgerSnapshot, only: frozenset[Bdf] | None = None) -> None:
        """Back to a ``snapshot`` taken with the same ``only``."""
        self.torn_down = frozen.torn_down
        if only is None:
            self.ledger = {bdf: DeviceRecord.thaw(rec) for bdf, rec in frozen.records}
        else:
            for bdf in only:
                self.ledger.pop(bdf, None)
            self.ledger.update((bdf, DeviceRecord.thaw(rec)) for bdf, rec in frozen.records)
        self.notes.clear()

    # -- reading ---------------------------------------------------------------
    @property
    def host(self) -> Host:
        return self.platform.host

    def record(self, bdf: Bdf) -> DeviceRecord:
        try:
            return self.ledger[bdf]
        except KeyError:
            known = bdf in self.platform.host.topology
            why = "is not present" if known else "is not a device of this host"
            raise RefusedError(f"{bdf} {why}", device=str(bdf)) from None

    def holder_of(self, bdf: Bdf) -> Holder | None:
        rec = self.ledger.get(bdf)
        return rec.holder() if rec and rec.state is not State.REMOVED else None

    def devices_of(self, vm: str) -> list[Bdf]:
        return sorted(b for b, r in self.ledger.items() if r.vm == vm and r.state is not State.REMOVED)

    def unsafe_in_force(self) -> list[str]:
        out = self.options.unsafe_overrides()
        for _, rec in sorted(self.ledger.items()):
            out.extend(map(str, rec.unsafe))
        return out

    # -- VMs -------------------------------------------------------------------
    def create_vm(self, name: str, *, iommu: bool = True) -> None:
        """Create a VM. Only a VM created with an IOMMU context can ever receive devices."""
        self.platform.create_domain(name, iommu_context=iommu)
        self.notes.append(f"created {name} ({'with' if iommu else 'without'} an IOMMU context)")

    def destroy_vm(self, name: str) -> Plan:
        """Shut a VM down: its devices go to quarantine first, then its memory is freed."""
        return self.execute(self.plan_teardown(name))

    def vm_crashed(self, name: str) -> Plan:
        """Clean up after a VM that crashed by itself (the platform already knows)."""
        return self.execute(self.plan_teardown(name))

    # -- operations ----------------------------------------------------------------
    def make_assignable(self, bdf: Bdf, *, with_group: bool = True) -> Plan:
        """Move the device (and, by default, its group's other endpoints) to quarantine."""
        return self.execute(self.plan_make_assignable(bdf, with_group=with_group))

    def make_unassignable(self, bdf: Bdf) -> Plan:
        """Reset the device, then give it back to its host driver."""
        return self.execute(self.plan_make_unassignable(bdf))

    def assign(self, bdf: Bdf, vm: str) -> Plan:
        return self.execute(self.plan_assign(bdf, vm))

    def release(self, bdf: Bdf) -> Plan:
        """Take the device from its VM back to quarantine (never to the host)."""
        return self.execute(self.plan_release(bdf))

    def recover(self, bdf: Bdf) -> Plan:
        """Bring a broken device back to quarantine (a release that starts from broken)."""
        return self.execute(self.plan_release(bdf, operation="recover"))

    def hotplug(self, bdf: Bdf) -> Plan:
        """A device appeared: it is blocked until the policy has decided, then acted on."""
        self.device_appeared(bdf)
        return self.execute(self.plan_hotplug(bdf))

    def device_appeared(self, bdf: Bdf) -> None:
        """The platform reports a new device; nothing may bind to it before a decision
        (a real host may have bound one already: the plan then takes it away first)."""
        self.ledger[bdf] = DeviceRecord(State.PENDING, driver=self.platform.host_driver_bound(bdf))

    def adopt_assigned(self, bdf: Bdf, vm: str) -> None:
        """A device found held away from the host that a VM was given before (as a real
        host's journal says): assigned to ``vm``, which may have programmed it."""
        self._move(bdf, Event.ADOPT_ASSIGNED, vm)
        rec = self.ledger[bdf]
        rec.context = rec.msi = rec.exposed = vm
        rec.guest_touched = True

    def interrupted(self, bdf: Bdf, vm: str | None) -> None:
        """An operation on ``bdf`` was killed half-way (``vm``: the guest it named): what
        it had done is unknown, so its context and interrupts are taken to point anywhere
        and the guest to reach it, until ``plan_recover`` takes it to quarantine."""
        self._move(bdf, Event.INTERRUPTED, None)
        rec = self.ledger[bdf]
        rec.context = rec.msi = None
        rec.exposed = rec.exposed or vm
        rec.guest_touched = True

    def device_unplugged(self, bdf: Bdf) -> None:
        """The device is leaving the bus by itself (surprise removal)."""
        self._move(bdf, Event.UNPLUG, None)

    # -- planning ------------------------------------------------------------------
    def plan(
        self, operation: str, device: Bdf | None = None, vm: str | None = None, *, with_group: bool = True
    ) -> Plan:
        """The plan of an operation by name (as scenarios and the verifier name them)."""
        if operation == "destroy":
            assert vm is not None
            return self.plan_teardown(vm)
        assert device is not None
        if operation == "assign":
            assert vm is not None
            return self.plan_assign(device, vm)
        if operation == "make-assignable":
            return self.plan_make_assignable(device, with_group=with_group)
        if operation == "make-unassignable":
            return self.plan_make_unassignable(device)
        if operation in ("release", "recover"):
            return self.plan_release(device, operation)
        if operation == "hotplug":
            return self.plan_hotplug(device)
        raise ValueError(f"no operation named {operation!r}")

    def plan_recover(self, devices: tuple[Bdf, ...]) -> Plan:
        """Broken devices (``interrupted`` ones) to quarantine, pushing on past failures."""
        return self._releasing("recover", devices, None, [])

    def plan_reject(self, bdf: Bdf, why: str) -> Plan:
        """Take a device off the bus, and what hangs below it (the bus takes that along:
        so does the ledger)."""
        if self.host.topology[bdf].host_critical:
            raise RefusedError(f"cannot reject {bdf}: {self._critical_why(bdf)}", device=str(bdf))
        next_state(str(bdf), self.record(bdf).state, Event.REJECT)
        below = tuple(
            b
            for b in self.host.topology.subtree(bdf)[1:]
            if self.platform.present(b) and (self.ledger[b].state, Event.REJECT) in TRANSITIONS
        )
        self.ledger[bdf].decision = Decision(Target.REJECT, why, False)
        for b in below:
            self.ledger[b].decision = Decision(Target.REJECT, f"below {bdf}, which was rejected", False)
        return Plan("reject", (bdf, *below), None, (Step("remove", bdf),), None, Event.REJECT)

    def plan_offer(self, bdf: Bdf) -> Plan:
        """Offer a device the host owns without a driver to the host's drivers (no
        change of owner)."""
        rec = self.record(bdf)
        if rec.state is not State.HOST or rec.driver:
            raise RefusedError(f"{bdf} is not with the host without a driver", device=str(bdf))
        return Plan("offer-host-driver", (bdf,), None, (Step("offer_host_driver", bdf),), None, None)

    def plan_decision(self, bdf: Bdf, target: Target, why: str) -> Plan | None:
        """The plan that gives a present device the target an operator or a
        present-device policy chose; None when it has that target already."""
        rec = self.record(bdf)
        if target is Target.REJECT:
            return self.plan_reject(bdf, why)
        if target is Target.QUARANTINE:
            return None if rec.state is State.QUARANTINED else self.plan_make_assignable(bdf)
        if rec.state is State.HOST:
            return None if rec.driver else self.plan_offer(bdf)
        return self.plan_make_unassignable(bdf)

    def _critical_why(self, bdf: Bdf) -> str:
        why = self.host.topology[bdf].host_critical
        return f"{bdf} is host-critical: {why}"

    def plan_make_assignable(self, bdf: Bdf, *, with_group: bool = True) -> Plan:
        rec = self.record(bdf)
        next_state(str(bdf), rec.state, Event.MAKE_ASSIGNABLE)
        fn = self.host.topology[bdf]
        if fn.kind.is_bridge:
            raise RefusedError(f"{bdf} is a {fn.kind.value}; bridges stay with the host", device=str(bdf))
        # Devices sharing a requester ID always go together; the rest of the group on request.
        candidates = self.isolation_unit(bdf) if with_group else self.moves_with(bdf)
        members = [bdf] + [
            m
            for m in candidates
            if m != bdf
            and not self.host.topology[m].kind.is_bridge
            and self.holder_of(m) is not None
            and self.ledger[m].state is State.HOST
        ]
        self._check_quarantine_blocks(members)
        for m in members:
            if self.host.topology[m].host_critical:
                raise RefusedError(f"cannot quarantine {bdf}: {self._critical_why(m)}", device=str(m))
        # Every driver is unbound before any context moves, and devices with a driver are
        # re-pointed first: unwinding (in reverse) then leaves a requester ID they share
        # with an idle device pointing at the host before any driver is bound again.
        members.sort(key=lambda m: not self.ledger[m].driver)
        steps = [Step("unbind_host_driver", m) for m in members if self.ledger[m].driver]
        for m in members:
            steps += [Step("attach", m, QUARANTINE), *self._flush(m), Step("route_msi", m, QUARANTINE)]
            steps += self._reset(m)
        return Plan("make-assignable", tuple(members), None, tuple(steps), Event.MAKE_ASSIGNABLE)

    def _check_quarantine_blocks(self, members: list[Bdf]) -> None:
        """Refuse unless the IOMMU holds every one of ``members`` in quarantine."""
        for m in members:
            if (reason := iommu_reason(self.host, m)) is not None:
                raise RefusedError(
                    f"cannot quarantine {m}: quarantine could not block its DMA ({reason})",
                    device=str(m),
                )

    def isolation_unit(self, bdf: Bdf) -> list[Bdf]:
        """``bdf``'s IOMMU group and the devices sharing a BAR page or an INTx line with
        it: none of them can have another owner than it has."""
        members = self.host.group_of(bdf).members
        shared = (s.other for s in self.host.shared_resources(bdf))
        return list(dict.fromkeys([*members, *shared]))

    def guests_in_group(self, bdf: Bdf) -> list[str]:
        """The guests holding another device of ``bdf``'s isolation unit: the host must not
        get it."""
        return [
            f"{m} is with {rec.vm}"
            for m in self.isolation_unit(bdf)
            if m != bdf and (rec := self.ledger.get(m)) is not None and rec.vm is not None
        ]

    def plan_make_unassignable(self, bdf: Bdf) -> Plan:
        """Reset, then host; devices sharing a requester ID with ``bdf`` go too."""
        devices = self.moves_with(bdf)
        for d in devices:
            next_state(str(d), self.record(d).state, Event.MAKE_UNASSIGNABLE)
        if blockers := self.guests_in_group(bdf):
            raise RefusedError(
                f"cannot give {bdf} back to the host while devices of its {self.host.group_of(bdf)}, "
                f"or sharing a BAR page or interrupt line with it, are with a guest "
                f"({'; '.join(blockers)}); release those first",
                device=str(bdf),
            )
        steps: list[Step] = []
        for d in devices:  # every requester ID points at the host before any driver binds
            steps += [*self._reset(d), Step("attach", d, HOST), *self._flush(d), Step("route_msi", d, HOST)]
        steps += [Step("bind_host_driver", d) for d in devices]
        return Plan("make-unassignable", devices, None, tuple(steps), Event.MAKE_UNASSIGNABLE)

    def preconditions(self, bdf: Bdf, vm: str, *, claimed: bool = False) -> list[Reason]:
        """Every check that must pass before anything of ``bdf`` reaches ``vm``
        (``claimed``: the caller has already claimed the device for ``vm``)."""
        reasons: list[Reason] = []
        rec = self.record(bdf)
        expected = State.ASSIGNING if claimed else State.QUARANTINED
        if rec.state is not expected:
            if rec.state is State.HOST:
                why = "it is not assignable yet; make it assignable (quarantine it) first"
            elif rec.vm:
                why = f"it is {rec.state.value} to {rec.vm}; release it first"
            else:
                why = f"it is {rec.state.value}"
            reasons.append(Reason("not-quarantined", why))
        domain = self.platform.domains().get(vm)
        if domain is None:
            reasons.append(Reason("no-vm", f"there is no VM named {vm}"))
        else:
            if domain.state is not DomainState.RUNNING:
                why = (
                    f"{vm} is {domain.state.value}: a VM that crashed or is being torn down accepts no device"
                )
                reasons.append(Reason("vm-not-running", why))
            if not domain.iommu_context:
                reasons.append(
                    Reason(
                        "vm-no-iommu-context",
                        f"{vm} was created without an IOMMU context; recreate it with one",
                    )
                )
        reasons += device_reasons(self.host, bdf, self.options)
        reasons += group_reasons(self.host, bdf, vm, self.holder_of)
        reasons += shared_resource_reasons(self.host, bdf, vm, self.holder_of)
        return reasons

    def moves_with(self, bdf: Bdf) -> tuple[Bdf, ...]:
        """``bdf`` and the present devices that share a requester ID with it (conventional
        PCI behind one bridge, phantom functions): one context entry serves them all, so
        they can only change owner together."""
        rids = self.host.requester_ids(bdf)
        return tuple(
            sorted(
                d
                for d in self.host.group_of(bdf).members
                if self.platform.present(d) and (d == bdf or rids & self.host.requester_ids(d))
            )
        )

    def plan_assign(self, bdf: Bdf, vm: str) -> Plan:
        devices = self.moves_with(bdf)
        reasons = [r for d in devices for r in self.preconditions(d, vm)]
        if reasons:
            raise PreconditionFailed(str(bdf), vm, list(dict.fromkeys(r.message for r in reasons)))
        return self._assign_plan(devices, vm)

    def _assign_plan(self, devices: tuple[Bdf, ...], vm: str) -> Plan:
        """The steps of an assignment whose checks have passed."""
        steps, unsafe = [], []
        for d in devices:
            fn = self.host.topology[d]
            unsafe += self._unsafe_interrupts(d, vm)
            if fn.reserved_regions:
                unsafe.append(Unsafe(d, f"has firmware regions mapped into {vm} (rmrr=relaxed)"))
            steps += [*self._reset(d), Step("attach", d, vm), *self._flush(d)]
            if fn.reserved_regions:
                steps.append(Step("map_reserved", d, vm))
            steps.append(Step("route_msi", d, vm))
        # Last: nothing of the device reaches the guest before every step above.
        steps += [Step("expose", d, vm) for d in devices]
        return Plan("assign", devices, vm, tuple(steps), Event.ASSIGN, unsafe=tuple(unsafe))

    def _unsafe_interrupts(self, device: Bdf, vm: str) -> list[Unsafe]:
        """The override an assignment without interrupt isolation relies on (it passed its
        checks only because allow_unsafe_interrupts is set)."""
        if msi_reason(self.host, device) is None:
            return []
        return [Unsafe(device, f"assigned to {vm} without interrupt isolation (allow_unsafe_interrupts)")]

    def plan_release(self, bdf: Bdf, operation: str = "release") -> Plan:
        next_state(str(bdf), self.record(bdf).state, Event.RELEASE)
        vm = self.record(bdf).vm
        devices = tuple(d for d in self.moves_with(bdf) if self.ledger[d].vm == vm)
        return self._releasing(operation, devices, vm, [])

    def plan_teardown(self, vm: str) -> Plan:
        """Every device of ``vm`` to quarantine, then the VM's memory back to the host."""
        if vm not in self.platform.domains():
            raise RefusedError(f"there is no VM named {vm}")
        if self.platform.domains()[vm].state is DomainState.DESTROYED:
            raise RefusedError(f"{vm} is destroyed already")
        busy = [
            f"{d} is {self.ledger[d].state.value}"
            for d in self.devices_of(vm)
            if self.ledger[d].state.in_flight
        ]
        if busy:
            raise RefusedError(
                f"cannot tear {vm} down while operations are in flight: "
                f"{'; '.join(busy)}; try again when they finish"
            )
        # Stopped first, as Xen marks a domain dying before anything else: a VM being torn
        # down runs no more, so no assignment started meanwhile can pass its checks.
        running = self.platform.domains()[vm].state is DomainState.RUNNING
        stop = [Step("crash_domain", None, vm)] if running else []
        return self._releasing(
            "teardown", tuple(self.devices_of(vm)), vm, [Step("destroy_domain", None, vm)], stop
        )

    def _releasing(
        self,
        operation: str,
        devices: tuple[Bdf, ...],
        vm: str | None,
        then: list[Step],
        first: list[Step] | None = None,
    ) -> Plan:
        steps: list[Step] = list(first or ())
        for d in devices:
            rec = self.ledger[d]
            next_state(str(d), rec.state, Event.RELEASE)
            steps += self._release_steps(d, rec)
        return Plan(operation, devices, vm, (*steps, *then), Event.RELEASE, forward_only=True)

    def _release_steps(self, bdf: Bdf, rec: DeviceRecord) -> list[Step]:
        return self._to_quarantine_steps(bdf, rec)

    def plan_hotplug(self, bdf: Bdf, decision: Decision | None = None) -> Plan:
        """What becomes of a device that appeared: the policy's decision (``decision``,
        when the caller asked the policy already), made safe, carried out."""
        decision = self._hotplug_decision(bdf, decision or self.policy.decide(self.host, bdf))
        if decision.target is Target.REJECT:
            plan = self.plan_reject(bdf, decision.rule)
            self.ledger[bdf].decision = decision
            return plan
        self.ledger[bdf].decision = decision
        # A host driver the kernel bound before anyone decided goes first.
        unbind = (Step("unbind_host_driver", bdf),) if self.ledger[bdf].driver else ()
        if decision.target is Target.QUARANTINE:
            steps = (*unbind, Step("attach", bdf, QUARANTINE), *self._flush(bdf))
            return Plan("hotplug-quarantine", (bdf,), None, steps, None, Event.QUARANTINE)
        steps = (
            *unbind,
            Step("attach", bdf, HOST),
            *self._flush(bdf),
            Step("route_msi", bdf, HOST),
            Step("offer_host_driver", bdf),
        )
        return Plan("hotplug-admit", (bdf,), None, steps, Event.ADMIT)

    def _hotplug_decision(self, bdf: Bdf, decision: Decision) -> Decision:
        """The policy's decision, made safe: a device plugged into a group a guest holds
        cannot go to the host, and one no IOMMU covers cannot be held in quarantine."""
        if decision.target is Target.ALLOW and (guests := self.guests_in_group(bdf)):
            decision = Decision(
                Target.QUARANTINE, f"its IOMMU group is with a guest: {guests[0]}", explicit=False
            )
        if decision.target is Target.QUARANTINE and not self.host.dma_translated(bdf):
            decision = Decision(
                Target.REJECT, "no IOMMU covers it, so quarantine cannot hold its DMA", explicit=False
            )
        return decision

    def _reset(self, bdf: Bdf) -> list[Step]:
        return [Step("reset", bdf)] if self.host.topology[bdf].reset_methods else []

    def _flush(self, bdf: Bdf) -> list[Step]:
        return [Step("flush_iotlb", bdf)]

    def _to_quarantine_steps(self, bdf: Bdf, rec: DeviceRecord) -> list[Step]:
        """Everything that takes the device away from whoever holds it, guest side first."""
        steps = []
        if rec.exposed:
            steps.append(Step("unexpose", bdf, rec.exposed))
        if rec.driver:
            steps.append(Step("unbind_host_driver", bdf))
        if rec.msi != QUARANTINE:
            steps.append(Step("route_msi", bdf, QUARANTINE))
        # While the device still translates through the guest: a guest's firmware
        # mappings are only ever those of devices it holds.
        steps += self._unmap_reserved(bdf, rec)
        steps += self._repoint_to_quarantine(bdf, rec)
        steps += self._flush(bdf)
        return steps + self._reset(bdf)

    def _unmap_reserved(self, bdf: Bdf, rec: DeviceRecord) -> list[Step]:
        return [Step("unmap_reserved", bdf, d) for d in sorted(rec.reserved)]

    def _repoint_to_quarantine(self, bdf: Bdf, rec: DeviceRecord) -> list[Step]:
        """One atomic switch of its context, straight from whoever held it."""
        return [Step("attach", bdf, QUARANTINE)] if rec.context != QUARANTINE else []

    # -- execution -----------------------------------------------------------------
    def execute(self, plan: Plan) -> Plan:
        """Run an operation to its end: claim, every step, commit (see ``advance``)."""
        cursor = self.begin(plan)
        while True:
            result = self.advance(cursor)
            if isinstance(result, Outcome):
                if result.failure is not None:
                    raise OperationFailed(plan, result.failure, result.message)
                return plan
            cursor = result

    def begin(self, plan: Plan) -> Cursor:
        """Claim the plan's devices (their in-flight state); no platform call yet."""
        if plan.claim is not None:
            for bdf in plan.devices:
                self._move(bdf, plan.claim, plan.vm)
        return Cursor(plan, Phase.RUN, plan.steps)

    def advance(self, cursor: Cursor) -> Cursor | Outcome:
        """Take exactly one step of an operation in flight, or finish it.

        A failed step turns the cursor around: back through the undo steps (most
        operations), or on to quarantine whatever else fails (release, teardown).
        """
        if cursor.index == len(cursor.steps):
            return self._finish(cursor)
        step = cursor.steps[cursor.index]
        try:
            undo = self._run(step)
        except StepFailed as failure:
            return self._after_failure(cursor, str(failure))
        if cursor.phase is Phase.RUN:
            return replace(cursor, index=cursor.index + 1, undo=(*cursor.undo, tuple(undo)))
        return replace(cursor, index=cursor.index + 1)

    def _after_failure(self, cursor: Cursor, failure: str) -> Cursor | Outcome:
        plan = cursor.plan
        if cursor.phase is Phase.FORWARD:  # note it and push on
            return replace(cursor, index=cursor.index + 1, stuck=(*cursor.stuck, failure))
        if cursor.phase is Phase.UNWIND:
            return self._give_up(cursor, f"unwinding failed too ({failure})")
        if plan.forward_only:
            steps = [s for d in plan.devices for s in self._to_quarantine_steps(d, self.ledger[d])]
            steps += [s for s in plan.steps if s.call == "destroy_domain"]
            return Cursor(plan, Phase.FORWARD, tuple(steps), failure=failure)
        unwind = tuple(s for undo in reversed(cursor.undo) for s in undo)
        return Cursor(plan, Phase.UNWIND, unwind, failure=failure)

    def _finish(self, cursor: Cursor) -> Outcome:
        plan = cursor.plan
        if cursor.phase is Phase.UNWIND:
            if plan.claim is not None:
                for bdf in plan.devices:
                    self._move(bdf, Event.ROLLBACK, None)
            return Outcome(plan, cursor.failure, "unwound; nothing changed hands")
        if cursor.stuck:
            return self._give_up(cursor, "; ".join(cursor.stuck))
        for bdf in plan.devices:
            rec = self.ledger[bdf]
            # Only this device's overrides, and only while this assignment lasts: appended
            # at every assign, the record grew without end and the verifier never finished.
            rec.unsafe = tuple(u for u in plan.unsafe if u.device == bdf)
            if plan.operation == "make-assignable":
                rec.prepared = plan.prepared
            if plan.operation == "assign":  # the guest may have reprogrammed it
                rec.guest_touched = True
            elif plan.operation in ("make-unassignable", "hotplug-admit"):
                rec.guest_touched = False
            if plan.operation == "make-unassignable" and rec.decision is not None:
                # Giving a hot-plugged device to the host is the operator's explicit call.
                rec.decision = Decision(Target.ALLOW, "operator: make-unassignable", True)
            if plan.finish is not None:
                self._move(bdf, plan.finish, plan.vm)
        # Kept only for a VM still running: a stopped one never runs again, so the record
        # could change nothing and would only split states that are one.
        vm = plan.vm
        if plan.operation == "teardown" and vm and self.platform.domains()[vm].state is DomainState.RUNNING:
            self.torn_down |= {vm}
            self._notify()
        self.notes.extend(plan.describe())
        self.notes.extend(f"UNSAFE: {u}" for u in plan.unsafe)
        if cursor.phase is Phase.FORWARD:
            return Outcome(plan, cursor.failure, "finished on the second try; device quarantined")
        return Outcome(plan, None, "done")

    def _give_up(self, cursor: Cursor, why: str) -> Outcome:
        """Fail closed: the guest may keep mappings it must not have, so it is crashed;
        the devices are broken until someone recovers them."""
        plan, vm = cursor.plan, cursor.plan.vm
        if vm and self.platform.domains()[vm].state is DomainState.RUNNING:
            self.platform.crash_domain(vm)
            self.notes.append(f"crashed {vm}: it may still hold mappings of {plan.devices}")
        removed = [b for b in self._uncontained(plan.devices, vm) if self._cut_off(b)]
        for bdf in plan.devices:
            if self.ledger[bdf].state.in_flight:
                self._move(bdf, Event.ROLLBACK_FAILED, vm)
                self.ledger[bdf].vm = vm if vm and self._still_in(bdf, vm) else None
            if bdf in removed:
                self._move(bdf, Event.UNPLUG, None)
        return Outcome(plan, cursor.failure, f"{why}; device broken")

    def _uncontained(self, devices: tuple[Bdf, ...], vm: str | None) -> list[Bdf]:
        """The devices the IOMMU may no longer hold: an unflushed IOTLB, a context other
        than the quarantine or the (now crashed) VM, or requester IDs shared with such a
        device or shared by devices left pointing at different owners."""
        bad = {
            b for b in devices if self.ledger[b].stale or self.ledger[b].context not in (QUARANTINE, None, vm)
        }
        for bdf in devices:
            sharers = {d for d in self.moves_with(bdf) if d in devices}
            if bad & sharers or len({self.ledger[d].context for d in sharers}) > 1:
                bad |= sharers
        return sorted(bad)

    def _cut_off(self, bdf: Bdf) -> bool:
        """Take a device the IOMMU cannot hold off the bus, so it cannot DMA at all."""
        try:
            self.platform.remove(bdf)
        except StepFailed as exc:
            self.notes.append(f"could not take {bdf} off the bus either ({exc}); power it off")
            return False
        self.notes.append(f"took {bdf} off the bus: its IOMMU state could not be made safe")
        return True

    def _run(self, step: Step) -> list[Step]:
        """Run one step; return the steps that undo it, and note what it set up."""
        if step.call == "crash_domain":  # a teardown stopping its VM (it may have crashed since)
            assert step.domain is not None
            if self.platform.domains()[step.domain].state is DomainState.RUNNING:
                self.platform.crash_domain(step.domain)
            return []
        if step.call == "destroy_domain":
            assert step.domain is not None
            if self.platform.domains()[step.domain].state is DomainState.DESTROYED:
                self.notes.append(f"{step.domain} was destroyed already")
            elif self._holders_of(step.domain):  # freeing its memory now would hand it to them
                held = ", ".join(map(str, self._holders_of(step.domain)))
                self.notes.append(f"{step.domain} kept as a zombie: {held} still hold(s) it")
            else:
                self.platform.destroy_domain(step.domain)
                self.notes.append(f"destroyed {step.domain}")
            return []
        call = getattr(self.platform, step.call)
        if step.device is None:
            call(step.domain)
            return []
        rec = self.ledger[step.device]
        before = Before(rec.context, rec.msi)
        call(step.device, step.domain) if step.domain is not None else call(step.device)
        effect = EFFECTS[step.call]
        effect.apply(rec, step, before)
        return effect.undo(step, before)

    def _holders_of(self, vm: str) -> list[Bdf]:
        """Devices something of which still points at ``vm`` (its memory must stay held)."""
        return [b for b in sorted(self.ledger) if self._still_in(b, vm)]

    def _still_in(self, bdf: Bdf, vm: str) -> bool:
        rec = self.ledger[bdf]
        return vm in (rec.context, rec.msi, rec.exposed) or vm in rec.reserved or vm in rec.stale

    def _move(self, bdf: Bdf, event: Event, vm: str | None) -> None:
        rec = self.ledger[bdf]
        rec.state = next_state(str(bdf), rec.state, event)
        if rec.state in (State.ASSIGNING, State.ASSIGNED):
            rec.vm = vm
        elif rec.state in (State.QUARANTINED, State.HOST, State.REMOVED):
            rec.vm = None
            rec.unsafe = ()
        self._notify()

    def _notify(self) -> None:
        for observer in self.observers:
            observer()
