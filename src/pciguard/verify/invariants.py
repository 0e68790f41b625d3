"""The invariants of pciguard, each a function over (toolstack ledger, platform state).

Every invariant looks at what the *hardware* allows (the simulated platform's
context entries, IOTLB, interrupt remapping entries, exposures) and compares it with
what the toolstack's ledger says each device's owner is. Legacy flaws bend the
hardware steps, never the ledger, so their damage shows here.

A malicious device is modelled eagerly: instead of interleaving every DMA, each check
asks what an untrusted requester ID *could* reach now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pciguard.checks import RmrrPolicy
from pciguard.model import Bar, Bdf
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


Check = Callable[["View"], list[Violation]]
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


@dataclass
class View:
    """What several invariants need, computed once per state."""

    ts: Toolstack
    sim: SimPlatform
    checked: list[tuple[Bdf, DeviceRecord]] = field(default_factory=list)
    holdings: dict[str, set[Bdf]] = field(default_factory=dict)
    present: list[Bdf] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Devices the toolstack has taken from the host: their DMA is not trusted.
        # Devices no enabled IOMMU covers are left out: nothing can contain them, which
        # the audit reports as critical, and the toolstack will neither quarantine nor
        # assign them.
        sim = self.sim
        self.checked = [
            (bdf, rec)
            for bdf, rec in sorted(self.ts.ledger.items())
            if rec.state not in (State.HOST, State.REMOVED)
            and sim.present(bdf)
            and sim.host.dma_translated(bdf)
        ]
        self.holdings = sim.guest_holdings()
        self.present = sim.present_devices()


def dma_containment(view: View) -> list[Violation]:
    ts, sim = view.ts, view.sim
    out = []
    for bdf, rec in view.checked:
        allowed = allowed_owners(rec)
        if ts.options.rmrr is RmrrPolicy.RELAXED:
            # Firmware 1:1 regions mapped into a guest (accepted and reported) are in its
            # page tables, so every device of that guest can reach them.
            allowed.add("firmware")
        for domain, what in sorted(sim.reachable(bdf)):
            peer = what.startswith("BAR of")
            if peer and (rec.state not in GUEST_STATES or domain == QUARANTINE):
                continue  # idle devices next to a guest's: see docs/invariants.md
            if domain not in allowed:
                out.append(
                    Violation(
                        "dma-containment",
                        bdf,
                        f"DMA from {bdf} ({rec.state.value}{' to ' + rec.vm if rec.vm else ''}) "
                        f"can land in {domain} {what}",
                    )
                )
    return out


def no_host_return(view: View) -> list[Violation]:
    sim = view.sim
    out = []
    for bdf, rec in view.checked:
        if not rec.state.assignable:
            continue
        host_rids = [r for r, d in sim.contexts(bdf).items() if d == HOST]
        if sim.host_driver_bound(bdf) or host_rids:
            how = (
                "a host driver is bound"
                if sim.host_driver_bound(bdf)
                else (f"requester ID {host_rids[0]} translates through the host's domain")
            )
            out.append(Violation("no-host-return", bdf, f"{bdf} is assignable ({rec.state.value}) but {how}"))
    return out


def fail_closed_assign(view: View) -> list[Violation]:
    ts, sim = view.ts, view.sim
    out = []
    domains = sim.domains()
    for vm, devices in sorted(view.holdings.items()):
        if domains[vm].state is not DomainState.RUNNING:
            continue
        for bdf in sorted(devices):
            rec = ts.ledger.get(bdf)
            if rec is None or rec.state not in GUEST_STATES or rec.vm != vm:
                state = rec.state.value if rec else "unknown"
                out.append(
                    Violation(
                        "fail-closed-assign",
                        bdf,
                        f"{vm} is still running with mappings of {bdf}, which is {state}; "
                        f"{vm} should have been crashed",
                    )
                )
    for bdf, rec in view.checked:
        if rec.state is State.QUARANTINED and sim.hardware_owner(bdf) != QUARANTINE:
            out.append(
                Violation(
                    "fail-closed-assign",
                    bdf,
                    f"{bdf} is quarantined in the ledger but held by {sim.hardware_owner(bdf)}",
                )
            )
    return out


def check_before_expose(view: View) -> list[Violation]:
    ts, sim = view.ts, view.sim
    out = []
    for vm, devices in sorted(view.holdings.items()):
        for bdf in sorted(devices):
            why = _unfit_for_a_guest(sim, bdf, ts.options.allow_unsafe_interrupts, ts.options.rmrr)
            if why is not None:
                out.append(Violation("check-before-expose", bdf, f"{bdf} reached {vm} although {why}"))
    return out


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


def msi_isolation(view: View) -> list[Violation]:
    ts, sim = view.ts, view.sim
    out = []
    for bdf, rec in view.checked:
        if rec.vm is None and not rec.guest_touched:
            continue  # never under a guest's control: its interrupts are the host's own
        targets = sim.msi_targets(bdf)
        if "*" in targets and ts.options.allow_unsafe_interrupts:
            continue  # the unsafe override is in force and reported
        stray = targets - allowed_owners(rec)
        if stray:
            where = "any domain" if "*" in stray else ", ".join(sorted(stray))
            out.append(
                Violation("msi-isolation", bdf, f"{bdf} ({rec.state.value}) can raise interrupts in {where}")
            )
    return out


def group_unity(view: View) -> list[Violation]:
    sim = view.sim
    out = []
    for group in sim.host.groups:
        owners: dict[str, Bdf] = {}
        for member in group.members:
            if not sim.present(member) or sim.host.topology[member].kind.is_bridge:
                continue
            owner = sim.hardware_owner(member)
            if owner not in (None, QUARANTINE):
                owners.setdefault(owner, member)
        if len(owners) > 1:
            held = ", ".join(f"{m} by {o}" for o, m in sorted(owners.items()))
            out.append(Violation("group-unity", group.members[0], f"{group} is split between owners: {held}"))
    return out


def hotplug_quarantine(view: View) -> list[Violation]:
    ts, sim = view.ts, view.sim
    out = []
    for bdf, rec in sorted(ts.ledger.items()):
        decision = rec.decision
        if decision is None or not sim.present(bdf) or not sim.host.dma_translated(bdf):
            continue
        risky = sim.host.topology.is_behind_external_port(bdf) or sim.host.topology[bdf].kind.is_bridge
        # Memory through the IOMMU; peer writes inside a group are group-unity's concern.
        reaches_host = any(d == HOST and not w.startswith("BAR of") for d, w in sim.reachable(bdf))
        if rec.state is State.PENDING and reaches_host:
            out.append(
                Violation("hotplug-quarantine", bdf, f"{bdf} can DMA to the host before the policy decided")
            )
        elif rec.state in (State.HOST, State.ADMITTING) and risky and not decision.explicit:
            out.append(
                Violation(
                    "hotplug-quarantine",
                    bdf,
                    f"hot-plugged {bdf} on an untrusted port was handed to the host by "
                    f"'{decision.rule}', not by a rule that names it",
                )
            )
    return out


def context_up_front(view: View) -> list[Violation]:
    sim = view.sim
    out = []
    for vm, devices in sorted(view.holdings.items()):
        if devices and not sim.context_declared_up_front(vm):
            out.append(
                Violation(
                    "context-up-front",
                    min(devices),
                    f"{', '.join(map(str, sorted(devices)))} reached {vm}, which was created "
                    "without an IOMMU context",
                )
            )
    return out


def flush_on_change(view: View) -> list[Violation]:
    return _stale_caches(view, "flush-on-change", view.sim.stale_entries, "the IOTLB")


def atc_flush(view: View) -> list[Violation]:
    """No device-TLB (ATS) entry outlives an ownership change, like the IOTLB's."""
    return _stale_caches(view, "atc-flush", view.sim.stale_device_tlb, "the device-TLB (ATS)")


def _stale_caches(
    view: View, invariant: str, stale_of: Callable[[Bdf], dict[Bdf, set[str]]], cache: str
) -> list[Violation]:
    """Devices at rest whose ``cache`` still translates through a previous owner."""
    out = []
    for bdf, rec in view.checked:
        if rec.state.in_flight:
            continue
        for rid, domains in sorted(stale_of(bdf).items()):
            out.append(
                Violation(
                    invariant,
                    bdf,
                    f"a stale entry of {cache} lets requester ID {rid} of {bdf} ({rec.state.value}) "
                    f"still translate through {', '.join(sorted(domains))}",
                )
            )
    return out


def all_requester_ids(view: View) -> list[Violation]:
    sim = view.sim
    out = []
    for bdf, rec in view.checked:
        if rec.state.in_flight or rec.state is State.PENDING:
            continue
        # No context entry and the quarantine both hold DMA; anything else must match.
        contexts = {rid: d or QUARANTINE for rid, d in sim.contexts(bdf).items()}
        own = contexts[bdf]
        for rid, domain in contexts.items():
            if domain != own:
                out.append(
                    Violation(
                        "all-requester-ids",
                        bdf,
                        f"requester ID {rid} of {bdf} still translates through {domain} "
                        f"while {bdf} itself is with {own}",
                    )
                )
    return out


def clean_handover(view: View) -> list[Violation]:
    """A device reaches a new owner only once a reset wiped what the last one left in it."""
    sim = view.sim
    out = []
    for bdf in view.present:
        owners = [o for o in (sim.exposed_to(bdf), HOST if sim.host_driver_bound(bdf) else None) if o]
        for owner in owners:
            left = sim.carried_state(bdf) - {owner}
            if left:
                out.append(
                    Violation(
                        "clean-handover",
                        bdf,
                        f"{bdf} reached {owner} still carrying the state of {', '.join(sorted(left))} "
                        "(programmed DMA, queues, buffers): no reset wiped it",
                    )
                )
    return out


def sink_isolation(view: View) -> list[Violation]:
    """A device in the scratch sink reads back only what it, for its own owners, wrote."""
    sim = view.sim
    out = []
    for bdf in view.present:
        programmed_by = sim.carried_state(bdf)
        if not programmed_by:
            continue  # nobody has programmed it since its reset: it reads nothing
        for rid, written_for in sorted(sim.scratch_pages_read(bdf).items()):
            foreign = written_for - programmed_by
            if foreign:
                out.append(
                    Violation(
                        "sink-isolation",
                        bdf,
                        f"{bdf} (programmed by {', '.join(sorted(programmed_by))}) can read through "
                        f"{rid} a scratch page holding data of {', '.join(sorted(foreign))}",
                    )
                )
    return out


def ats_untrusted(view: View) -> list[Violation]:
    """Untrusted devices (behind an external port) never have ATS on: a translated
    request is not translated again, so it could reach any physical address."""
    sim = view.sim
    return [
        Violation(
            "ats-untrusted",
            bdf,
            f"{bdf}, behind an external port, has ATS enabled: its translated requests bypass the IOMMU",
        )
        for bdf in view.present
        if sim.ats_enabled(bdf) and sim.host.topology.is_behind_external_port(bdf)
    ]


def reserved_exact(view: View) -> list[Violation]:
    """A running guest's firmware 1:1 mappings are regions of devices that translate
    through it, and overlap no region of a device that does not."""
    sim = view.sim
    out = []
    domains = sim.domains()
    for vm in sorted(view.holdings):
        if domains[vm].state is not DomainState.RUNNING:
            continue
        mappings = sim.reserved_mappings(vm)
        if not mappings:
            continue
        held = {b for b in view.present if vm in sim.contexts(b).values()}
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
            for other in view.present:
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


def shared_resources(view: View) -> list[Violation]:
    """A device exposed to a guest shares no BAR page and no INTx line with a device of
    another owner. Judged from the BARs and lines themselves, not the host model's pairs."""
    sim = view.sim
    topology = sim.host.topology
    out = []
    for bdf in view.present:
        guest = sim.exposed_to(bdf)
        if guest is None:
            continue
        fn = topology[bdf]
        for other in view.present:
            owner = sim.hardware_owner(other)
            if other == bdf or owner in (None, QUARANTINE, guest):
                continue
            theirs = topology[other]
            same_page = any(
                first <= their_last and their_first <= last
                for first, last in _pages(fn.bars)
                for their_first, their_last in _pages(theirs.bars)
            )
            # A bridge's own line (PME, AER) is the host's whatever: it ties no owners together.
            same_line = fn.intx is not None and fn.intx == theirs.intx and not theirs.kind.is_bridge
            if same_page or same_line:
                what = "a BAR page" if same_page else f"the legacy interrupt line {fn.intx}"
                out.append(
                    Violation(
                        "shared-resources",
                        bdf,
                        f"{bdf} is exposed to {guest} but shares {what} with {other}, held by {owner}",
                    )
                )
    return out


def vm_lifecycle(view: View) -> list[Violation]:
    """A VM whose teardown has finished runs no more."""
    ts, sim = view.ts, view.sim
    domains = sim.domains()
    out = []
    for vm in sorted(ts.torn_down):
        if domains[vm].state is DomainState.RUNNING:
            held = ", ".join(map(str, sorted(view.holdings.get(vm, ())))) or "nothing"
            out.append(Violation("vm-lifecycle", None, f"{vm} was torn down but still runs, holding {held}"))
    return out


INVARIANTS: dict[str, Check] = {
    "dma-containment": dma_containment,
    "no-host-return": no_host_return,
    "fail-closed-assign": fail_closed_assign,
    "check-before-expose": check_before_expose,
    "msi-isolation": msi_isolation,
    "group-unity": group_unity,
    "hotplug-quarantine": hotplug_quarantine,
    "context-up-front": context_up_front,
    "flush-on-change": flush_on_change,
    "all-requester-ids": all_requester_ids,
    "clean-handover": clean_handover,
    "sink-isolation": sink_isolation,
    "atc-flush": atc_flush,
    "ats-untrusted": ats_untrusted,
    "reserved-exact": reserved_exact,
    "shared-resources": shared_resources,
    "vm-lifecycle": vm_lifecycle,
}


def check_all(ts: Toolstack, sim: SimPlatform) -> list[Violation]:
    view = View(ts, sim)
    return [v for check in INVARIANTS.values() for v in check(view)]
