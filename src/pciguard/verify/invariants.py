"""The invariants of pciguard, each a function over (toolstack ledger, platform state).

Every invariant looks at what the *hardware* allows (the simulated platform's
context entries, IOTLB, interrupt remapping entries, exposures) and compares it with
what the toolstack's ledger says each device's owner is. Legacy flaws bend the
hardware steps, never the ledger, so their damage shows here.

A malicious device is modelled eagerly: instead of interleaving every DMA, each check
asks what an untrusted requester ID *could* reach now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from pciguard.checks import RmrrPolicy
from pciguard.model import Bar, Bdf
from pciguard.model.groups import IommuGroup
from pciguard.model.host import Host
from pciguard.model.ownership import State
from pciguard.platforms.base import HOST, QUARANTINE, DomainState
from pciguard.platforms.sim import SimPlatform
from pciguard.toolstack import DeviceRecord, Toolstack


@dataclass(frozen=True)
class Violation:
    invariant: str
    device: Bdf | None
    message: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.message}"


#: Not a check of a state: the platform caught the toolstack misusing it.
PLATFORM_CONTRACT = "platform-contract"
GUEST_STATES = (State.ASSIGNING, State.ASSIGNED, State.RELEASING)


def allowed_owners(rec: DeviceRecord) -> set[str]:
    """Whose memory a device may reach, given its ledger state."""
    vm = {rec.vm} if rec.vm else set()
    match rec.state:
        case State.ASSIGNED:
            return vm
        case State.ASSIGNING | State.RELEASING | State.BROKEN:
            return vm | {QUARANTINE}
        case State.QUARANTINING | State.UNQUARANTINING | State.ADMITTING:
            return {HOST, QUARANTINE}  # an explicit move between host and quarantine
        case _:
            return {QUARANTINE}


class Device(NamedTuple):
    """One device as the device-level invariants see it."""

    ts: Toolstack
    sim: SimPlatform
    bdf: Bdf
    rec: DeviceRecord | None  # its ledger record, if the toolstack knows it
    present: bool
    # Its record if the toolstack has taken it from the host and it is present with an
    # IOMMU translating its DMA: its DMA is then not trusted. Devices no enabled IOMMU
    # covers are left out: nothing can contain them, which the audit reports as
    # critical, and the toolstack will neither quarantine nor assign them.
    taken: DeviceRecord | None
    holders: tuple[str, ...]  # the guests its requester IDs or its exposure reach


class Holding(NamedTuple):
    """One guest holding something of one device (see ``SimPlatform.guests_holding``
    and ``reserved_mappings``)."""

    ts: Toolstack
    sim: SimPlatform
    vm: str
    bdf: Bdf


def _device(ts: Toolstack, sim: SimPlatform, bdf: Bdf) -> Device:
    rec = ts.ledger.get(bdf)
    present = sim.present(bdf)
    taken = (
        rec
        if rec is not None
        and rec.state not in (State.HOST, State.REMOVED)
        and present
        and sim.host.dma_translated(bdf)
        else None
    )
    return Device(ts, sim, bdf, rec, present, taken, tuple(sorted(sim.guests_holding(bdf))))


def dma_containment(d: Device) -> list[Violation]:
    rec = d.taken
    if rec is None:
        return []
    allowed = allowed_owners(rec)
    if d.ts.options.rmrr is RmrrPolicy.RELAXED:
        # Firmware 1:1 regions mapped into a guest (accepted and reported) are in its
        # page tables, so every device of that guest can reach them.
        allowed.add("firmware")
    out = []
    for domain, what in sorted(d.sim.reachable(d.bdf)):
        peer = what.startswith("BAR of")
        if peer and (rec.state not in GUEST_STATES or domain == QUARANTINE):
            continue  # idle devices next to a guest's: see docs/invariants.md
        if domain not in allowed:
            out.append(
                Violation(
                    "dma-containment",
                    d.bdf,
                    f"DMA from {d.bdf} ({rec.state.value}{' to ' + rec.vm if rec.vm else ''}) "
                    f"can land in {domain} {what}",
                )
            )
    return out


def no_host_return(d: Device) -> list[Violation]:
    rec, sim = d.taken, d.sim
    if rec is None or not rec.state.assignable:
        return []
    host_rids = [r for r, owner in sim.contexts(d.bdf).items() if owner == HOST]
    if not sim.host_driver_bound(d.bdf) and not host_rids:
        return []
    how = (
        "a host driver is bound"
        if sim.host_driver_bound(d.bdf)
        else f"requester ID {host_rids[0]} translates through the host's domain"
    )
    return [Violation("no-host-return", d.bdf, f"{d.bdf} is assignable ({rec.state.value}) but {how}")]


def quarantine_held(d: Device) -> list[Violation]:
    """A device the ledger has quarantined is held by the quarantine (part of
    fail-closed-assign)."""
    rec, sim = d.taken, d.sim
    if rec is None or rec.state is not State.QUARANTINED or sim.hardware_owner(d.bdf) == QUARANTINE:
        return []
    return [
        Violation(
            "fail-closed-assign",
            d.bdf,
            f"{d.bdf} is quarantined in the ledger but held by {sim.hardware_owner(d.bdf)}",
        )
    ]


def fail_closed_assign(h: Holding) -> list[Violation]:
    """A running guest holds nothing of a device the ledger does not give it."""
    if h.sim.domains()[h.vm].state is not DomainState.RUNNING:
        return []
    rec = h.ts.ledger.get(h.bdf)
    if rec is not None and rec.state in GUEST_STATES and rec.vm == h.vm:
        return []
    state = rec.state.value if rec else "unknown"
    return [
        Violation(
            "fail-closed-assign",
            h.bdf,
            f"{h.vm} is still running with mappings of {h.bdf}, which is {state}; "
            f"{h.vm} should have been crashed",
        )
    ]


def check_before_expose(h: Holding) -> list[Violation]:
    options = h.ts.options
    why = _unfit_for_a_guest(h.sim, h.bdf, options.allow_unsafe_interrupts, options.rmrr)
    if why is None:
        return []
    return [Violation("check-before-expose", h.bdf, f"{h.bdf} reached {h.vm} although {why}")]


def _unfit_for_a_guest(sim: SimPlatform, bdf: Bdf, unsafe_interrupts: bool, rmrr: RmrrPolicy) -> str | None:
    """Why a device may not be a guest's, judged from the host's facts alone. Written apart
    from the toolstack's own checks (checks.py) on purpose: an oracle that reused them
    would share their blind spots. Reported unsafe overrides count."""
    host = sim.host
    fn = host.topology[bdf]
    if fn.kind.is_bridge:
        return "it is a bridge"
    if not host.dma_translated(bdf):
        return "no IOMMU translates its DMA"
    if not unsafe_interrupts and not host.msi_isolated(bdf):
        return "its interrupts are not isolated"
    for region in fn.reserved_regions:
        if rmrr is RmrrPolicy.STRICT:
            return f"it needs the firmware region {region} (strict)"
        for other in host.topology.values():
            if other.bdf != bdf and any(region.overlaps(theirs) for theirs in other.reserved_regions):
                return f"its firmware region {region} overlaps one of {other.bdf}"
    if host.topology.virtual_functions(bdf):
        return "it is an SR-IOV physical function with virtual functions"
    if not fn.reset_methods:
        return "it has no reset method"
    return None


def msi_isolation(d: Device) -> list[Violation]:
    rec, sim = d.taken, d.sim
    if rec is None or (rec.vm is None and not rec.guest_touched):
        return []  # never under a guest's control: its interrupts are the host's own
    targets = sim.msi_targets(d.bdf)
    if "*" in targets and d.ts.options.allow_unsafe_interrupts:
        return []  # the unsafe override is in force and reported
    stray = targets - allowed_owners(rec)
    if not stray:
        return []
    where = "any domain" if "*" in stray else ", ".join(sorted(stray))
    return [Violation("msi-isolation", d.bdf, f"{d.bdf} ({rec.state.value}) can raise interrupts in {where}")]


def _endpoints(host: Host, group: IommuGroup) -> list[Bdf]:
    """The members of ``group`` that are not bridges (a bridge holds no memory)."""
    return [member for member in group.members if not host.topology[member].kind.is_bridge]


def group_unity(sim: SimPlatform, group: IommuGroup) -> list[Violation]:
    owners: dict[str, Bdf] = {}
    for member in _endpoints(sim.host, group):
        if not sim.present(member):
            continue
        owner = sim.hardware_owner(member)
        if owner not in (None, QUARANTINE):
            owners.setdefault(owner, member)
    if len(owners) <= 1:
        return []
    held = ", ".join(f"{m} by {o}" for o, m in sorted(owners.items()))
    return [Violation("group-unity", group.members[0], f"{group} is split between owners: {held}")]


def hotplug_quarantine(d: Device) -> list[Violation]:
    rec, sim, bdf = d.rec, d.sim, d.bdf
    if rec is None or rec.decision is None or not d.present or not sim.host.dma_translated(bdf):
        return []
    risky = sim.host.topology.is_behind_external_port(bdf) or sim.host.topology[bdf].kind.is_bridge
    # Memory through the IOMMU; peer writes inside a group are group-unity's concern.
    reaches_host = any(owner == HOST and not w.startswith("BAR of") for owner, w in sim.reachable(bdf))
    if rec.state is State.PENDING and reaches_host:
        return [Violation("hotplug-quarantine", bdf, f"{bdf} can DMA to the host before the policy decided")]
    if rec.state in (State.HOST, State.ADMITTING) and risky and not rec.decision.explicit:
        return [
            Violation(
                "hotplug-quarantine",
                bdf,
                f"hot-plugged {bdf} on an untrusted port was handed to the host by "
                f"'{rec.decision.rule}', not by a rule that names it",
            )
        ]
    return []


def context_up_front(h: Holding) -> list[Violation]:
    if h.sim.context_declared_up_front(h.vm):
        return []
    return [
        Violation(
            "context-up-front",
            h.bdf,
            f"{h.bdf} reached {h.vm}, which was created without an IOMMU context",
        )
    ]


def flush_on_change(d: Device) -> list[Violation]:
    return _stale_caches(d, "flush-on-change", d.sim.stale_entries, "the IOTLB")


def atc_flush(d: Device) -> list[Violation]:
    """No device-TLB (ATS) entry outlives an ownership change, like the IOTLB's."""
    return _stale_caches(d, "atc-flush", d.sim.stale_device_tlb, "the device-TLB (ATS)")


def _stale_caches(
    d: Device, invariant: str, stale_of: Callable[[Bdf], dict[Bdf, set[str]]], cache: str
) -> list[Violation]:
    """A device at rest whose ``cache`` still translates through a previous owner."""
    rec = d.taken
    if rec is None or rec.state.in_flight:
        return []
    return [
        Violation(
            invariant,
            d.bdf,
            f"a stale entry of {cache} lets requester ID {rid} of {d.bdf} ({rec.state.value}) "
            f"still translate through {', '.join(sorted(domains))}",
        )
        for rid, domains in sorted(stale_of(d.bdf).items())
    ]


def all_requester_ids(d: Device) -> list[Violation]:
    rec = d.taken
    if rec is None or rec.state.in_flight or rec.state is State.PENDING:
        return []
    # No context entry and the quarantine both hold DMA; anything else must match.
    contexts = {rid: owner or QUARANTINE for rid, owner in d.sim.contexts(d.bdf).items()}
    own = contexts[d.bdf]
    return [
        Violation(
            "all-requester-ids",
            d.bdf,
            f"requester ID {rid} of {d.bdf} still translates through {domain} "
            f"while {d.bdf} itself is with {own}",
        )
        for rid, domain in contexts.items()
        if domain != own
    ]


def clean_handover(d: Device) -> list[Violation]:
    """A device reaches a new owner only once a reset wiped what the last one left in it."""
    if not d.present:
        return []
    sim = d.sim
    owners = [o for o in (sim.exposed_to(d.bdf), HOST if sim.host_driver_bound(d.bdf) else None) if o]
    out = []
    for owner in owners:
        left = sim.carried_state(d.bdf) - {owner}
        if left:
            out.append(
                Violation(
                    "clean-handover",
                    d.bdf,
                    f"{d.bdf} reached {owner} still carrying the state of {', '.join(sorted(left))} "
                    "(programmed DMA, queues, buffers): no reset wiped it",
                )
            )
    return out


def sink_isolation(d: Device) -> list[Violation]:
    """A device in the scratch sink reads back only what it, for its own owners, wrote."""
    programmed_by = d.sim.carried_state(d.bdf) if d.present else frozenset()
    if not programmed_by:
        return []  # nobody has programmed it since its reset: it reads nothing
    out = []
    for rid, written_for in sorted(d.sim.scratch_pages_read(d.bdf).items()):
        foreign = written_for - programmed_by
        if foreign:
            out.append(
                Violation(
                    "sink-isolation",
                    d.bdf,
                    f"{d.bdf} (programmed by {', '.join(sorted(programmed_by))}) can read through "
                    f"{rid} a scratch page holding data of {', '.join(sorted(foreign))}",
                )
            )
    return out


def ats_untrusted(d: Device) -> list[Violation]:
    """Untrusted devices (behind an external port) never have ATS on: a translated
    request is not translated again, so it could reach any physical address."""
    if not (d.present and d.sim.ats_enabled(d.bdf) and d.sim.host.topology.is_behind_external_port(d.bdf)):
        return []
    return [
        Violation(
            "ats-untrusted",
            d.bdf,
            f"{d.bdf}, behind an external port, has ATS enabled: its translated requests bypass the IOMMU",
        )
    ]


def reserved_exact(sim: SimPlatform, vm: str) -> list[Violation]:
    """A running guest's firmware 1:1 mappings are regions of devices that translate
    through it, and overlap no region of a device that does not."""
    if sim.domains()[vm].state is not DomainState.RUNNING:
        return []
    mappings = sim.reserved_mappings(vm)
    if not mappings:
        return []
    present = sim.present_devices()
    held = {b for b in present if vm in sim.contexts(b).values()}
    out = []
    for bdf, region in sorted(mappings, key=lambda m: (m[0], m[1].start)):
        if bdf not in held or region not in sim.host.topology[bdf].reserved_regions:
            out.append(
                Violation(
                    "reserved-exact",
                    bdf,
                    f"the firmware region {region} of {bdf} is mapped in {vm}, which does not hold {bdf}",
                )
            )
            continue
        for other in present:
            if other in held:
                continue
            if any(region.overlaps(r) for r in sim.host.topology[other].reserved_regions):
                out.append(
                    Violation(
                        "reserved-exact",
                        bdf,
                        f"the firmware region {region} mapped in {vm} for {bdf} overlaps a region "
                        f"of {other}, which {vm} does not hold",
                    )
                )
    return out


def _pages(bars: tuple[Bar, ...]) -> list[tuple[int, int]]:
    """The 4 KiB pages (the smallest a CPU maps into a guest) each BAR spans."""
    return [(bar.start >> 12, bar.end >> 12) for bar in bars]


def shared_resources(d: Device) -> list[Violation]:
    """A device exposed to a guest shares no BAR page and no INTx line with a device of
    another owner. Judged from the BARs and lines themselves, not the host model's pairs."""
    sim, bdf = d.sim, d.bdf
    guest = sim.exposed_to(bdf) if d.present else None
    if guest is None:
        return []
    topology = sim.host.topology
    fn = topology[bdf]
    out = []
    for other, theirs in sorted(topology.items()):
        if other == bdf:
            continue
        same_page = any(
            first <= their_last and their_first <= last
            for first, last in _pages(fn.bars)
            for their_first, their_last in _pages(theirs.bars)
        )
        # A bridge's own line (PME, AER) is the host's whatever: it ties no owners together.
        same_line = fn.intx is not None and fn.intx == theirs.intx and not theirs.kind.is_bridge
        if not (same_page or same_line) or not sim.present(other):
            continue
        owner = sim.hardware_owner(other)
        if owner not in (None, QUARANTINE, guest):
            what = "a BAR page" if same_page else f"the legacy interrupt line {fn.intx}"
            out.append(
                Violation(
                    "shared-resources",
                    bdf,
                    f"{bdf} is exposed to {guest} but shares {what} with {other}, held by {owner}",
                )
            )
    return out


def vm_lifecycle(ts: Toolstack, sim: SimPlatform, vm: str) -> list[Violation]:
    """A VM whose teardown has finished runs no more."""
    if vm not in ts.torn_down or sim.domains()[vm].state is not DomainState.RUNNING:
        return []
    held = sorted(
        {
            *(b for b in sim.present_devices() if vm in sim.guests_holding(b)),
            *(b for b, _ in sim.reserved_mappings(vm)),
        }
    )
    return [
        Violation(
            "vm-lifecycle",
            None,
            f"{vm} was torn down but still runs, holding {', '.join(map(str, held)) or 'nothing'}",
        )
    ]


#: Every invariant, in the order reports list what breaks them.
INVARIANTS = (
    "dma-containment",
    "no-host-return",
    "fail-closed-assign",
    "check-before-expose",
    "msi-isolation",
    "group-unity",
    "hotplug-quarantine",
    "context-up-front",
    "flush-on-change",
    "all-requester-ids",
    "clean-handover",
    "sink-isolation",
    "atc-flush",
    "ats-untrusted",
    "reserved-exact",
    "shared-resources",
    "vm-lifecycle",
)
#: Device-level invariants of a device the toolstack has taken (``Device.taken``), and
#: of any present device; each also says nothing of a device that is neither.
TAKEN_CHECKS: tuple[Callable[[Device], list[Violation]], ...] = (
    dma_containment,
    no_host_return,
    quarantine_held,
    msi_isolation,
    flush_on_change,
    all_requester_ids,
    atc_flush,
)
PRESENT_CHECKS: tuple[Callable[[Device], list[Violation]], ...] = (
    hotplug_quarantine,
    clean_handover,
    sink_isolation,
    ats_untrusted,
    shared_resources,
)
HOLDING_CHECKS: tuple[Callable[[Holding], list[Violation]], ...] = (
    fail_closed_assign,
    check_before_expose,
    context_up_front,
)


class Unit(NamedTuple):
    """A part of a state the invariants judge on its own: one device (with what guests
    hold of it), one IOMMU group, or one guest (its firmware mappings and lifecycle).
    The verifier remembers each unit's verdict by the cells it read (``memo``)."""

    scope: str  # device | group | guest
    subject: Any  # the device's BDF, the group's index, the guest's name


def units(sim: SimPlatform, guests: Iterable[str]) -> list[Unit]:
    """Every unit of a platform whose guests are among ``guests``."""
    host = sim.host
    found = _HOST_UNITS.get(id(host))
    if found is None:
        if len(_HOST_UNITS) > 16:
            _HOST_UNITS.clear()
        found = _HOST_UNITS[id(host)] = (
            host,
            [
                *(Unit("device", bdf) for bdf in sorted(host.topology)),
                # A group of one device (bridges aside) is never split: no unit.
                *(
                    Unit("group", i)
                    for i, group in enumerate(host.groups)
                    if len(_endpoints(host, group)) > 1
                ),
            ],
        )
    return [*found[1], *(Unit("guest", vm) for vm in sorted(guests))]


#: The device and group units of each host lately judged (a host is immutable; the
#: entry keeps it, so its id stays its own).
_HOST_UNITS: dict[int, tuple[Host, list[Unit]]] = {}


def check_unit(ts: Toolstack, sim: SimPlatform, unit: Unit) -> list[Violation]:
    """What ``unit`` breaks (a guest that does not exist breaks nothing)."""
    if unit.scope == "device":
        d = _device(ts, sim, unit.subject)
        found: list[Violation] = []
        for check in (TAKEN_CHECKS if d.taken is not None else ()) + (PRESENT_CHECKS if d.present else ()):
            found += check(d)
        for vm in d.holders:
            holding = Holding(ts, sim, vm, d.bdf)
            for held in HOLDING_CHECKS:
                found += held(holding)
        return found
    if unit.scope == "group":
        return group_unity(sim, sim.host.groups[unit.subject])
    vm = unit.subject
    if vm not in sim.domains():
        return []
    # Firmware mappings hold what they map, whether or not anything else of it reaches vm.
    mapped = sorted({bdf for bdf, _ in sim.reserved_mappings(vm)})
    return [
        *(v for bdf in mapped for check in HOLDING_CHECKS for v in check(Holding(ts, sim, vm, bdf))),
        *reserved_exact(sim, vm),
        *vm_lifecycle(ts, sim, vm),
    ]


def in_order(violations: Iterable[Violation]) -> list[Violation]:
    """Violations by invariant, each once (a holding may be seen from both its device
    and its guest)."""
    return sorted(dict.fromkeys(violations), key=lambda v: _RANK.get(v.invariant, len(_RANK)))


_RANK = {name: i for i, name in enumerate(INVARIANTS)}


def guests_of(domains: Iterable[str]) -> list[str]:
    """The guests among the names of the domains."""
    return [name for name in domains if name not in (HOST, QUARANTINE)]


def check_all(ts: Toolstack, sim: SimPlatform) -> list[Violation]:
    return in_order(v for unit in units(sim, guests_of(sim.domains())) for v in check_unit(ts, sim, unit))
