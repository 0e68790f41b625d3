"""A simulated hypervisor: context entries per requester ID, an IOTLB that keeps stale
translations until flushed, device-TLBs (ATS), interrupt remapping entries, domains
with memory, a quarantine sink whose pages remember who wrote them, devices that carry
their owners' state until a reset succeeds, and a DMA/MSI engine that answers where a
malicious device's write lands.

Caches and devices are modelled adversarially, and eagerly: a device may have used any
translation it was ever given, so re-pointing a context entry leaves the old domain
cached for that requester ID until ``flush_iotlb``; a device with ATS caches every
translation it uses in its own ATC; a device programmed by an owner holds that
owner's state and writes it into any scratch page it reaches.

Like iommufd's selftests, the platform checks its caller: contract violations raise
``PlatformMisuse`` at once. Faults can be injected into any step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pciguard.errors import InjectedFault, PlatformMisuse, StepFailed
from pciguard.model import Bdf, Host, ReservedRegion, Resource
from pciguard.platforms.base import (
    HOST,
    QUARANTINE,
    RESERVED_NAMES,
    STEPS,
    DomainInfo,
    DomainState,
)

GUEST_RAM = 0x4000_0000  # each guest owns IOVAs [0, GUEST_RAM)
QUARANTINE_MODES = ("block", "scratch")


@dataclass(frozen=True)
class Landed:
    """A DMA write that reached memory."""

    domain: str  # whose memory: a VM, HOST, QUARANTINE (scratch page) or "firmware"
    where: str
    via: str

    def __str__(self) -> str:
        return f"LANDED in {self.domain} {self.where} ({self.via})"


@dataclass(frozen=True)
class Delivered:
    """An MSI that raised an interrupt."""

    domain: str  # "*" when the device could pick any destination and vector
    via: str

    def __str__(self) -> str:
        target = "any domain" if self.domain == "*" else self.domain
        return f"DELIVERED to {target} ({self.via})"


@dataclass(frozen=True)
class Blocked:
    reason: str

    def __str__(self) -> str:
        return f"BLOCKED ({self.reason})"


@dataclass(frozen=True)
class CallRecord:
    call: str
    device: Bdf | None
    domain: str | None
    error: str | None = None

    def __str__(self) -> str:
        args = ", ".join(str(a) for a in (self.device, self.domain) if a is not None)
        tail = f" -> FAILED: {self.error}" if self.error else ""
        return f"{self.call}({args}){tail}"


@dataclass
class FaultRule:
    """Fail the matching calls: skip ``skip`` of them, then fail ``times`` (None: all)."""

    call: str | None = None
    device: Bdf | None = None
    skip: int = 0
    times: int | None = 1

    def matches(self, call: str, device: Bdf | None) -> bool:
        return (self.call in (None, call)) and (self.device in (None, device))


class DomainSnapshot(NamedTuple):
    name: str
    state: DomainState
    iommu_context: bool
    declared_up_front: bool
    reserved: frozenset[tuple[Bdf, ReservedRegion]]


class SimSnapshot(NamedTuple):
    """The platform's whole state as one hashable value (what ``snapshot`` returns).
    Each field is a frozenset; table entries are (key, value) pairs."""

    domains: frozenset[DomainSnapshot]
    present: frozenset[Bdf]
    driver: frozenset[Bdf]
    context: frozenset[tuple[Bdf, str]]  # requester ID, domain
    stale: frozenset[tuple[Bdf, tuple[str, ...]]]  # requester ID, domains cached (oldest first)
    irte: frozenset[tuple[Bdf, str]]  # requester ID, domain its MSIs reach
    exposed: frozenset[tuple[Bdf, str]]
    carries: frozenset[tuple[Bdf, frozenset[str]]]  # device, owners whose state it holds
    sink: frozenset[tuple[Bdf | str, frozenset[str]]]  # scratch page, whose data it holds
    atc: frozenset[tuple[Bdf, frozenset[str]]]  # requester ID, domains its device-TLB caches
    ats: frozenset[Bdf]


#: The fields of a ``SimSnapshot`` whose entries may name a VM, as (key, domain or domains).
POINTER_FIELDS = ("context", "stale", "irte", "exposed", "carries", "sink", "atc")


@dataclass
class _Domain:
    state: DomainState
    iommu_context: bool
    declared_up_front: bool = True  # False once a context was patched in late
    reserved: set[tuple[Bdf, ReservedRegion]] = field(default_factory=set)


def _add(table: dict[Any, frozenset[str]], key: Any, names: Iterable[str]) -> None:
    """Add ``names`` to the set a table holds for ``key``: what the platform's caches
    and devices gather only grows until something clears it."""
    table[key] = table.get(key, frozenset()).union(names)


class _DomainsView(Mapping[str, DomainInfo]):
    __slots__ = ("_domains",)

    def __init__(self, domains: Mapping[str, _Domain]) -> None:
        self._domains = domains

    def __getitem__(self, name: str) -> DomainInfo:
        dom = self._domains[name]
        return DomainInfo(name, dom.state, dom.iommu_context)

    def __iter__(self) -> Iterator[str]:
        return iter(self._domains)

    def __len__(self) -> int:
        return len(self._domains)


class SimPlatform:
    """The simulated hypervisor platform (implements ``Platform``)."""

    def __init__(
        self,
        host: Host,
        *,
        quarantine_mode: str = "block",
    ) -> None:
        if quarantine_mode not in QUARANTINE_MODES:
            raise ValueError(f"quarantine mode must be one of {QUARANTINE_MODES}")
        self._host = host
        self.quarantine_mode = quarantine_mode
        self.faults: list[FaultRule] = []
        self.log: list[CallRecord] = []
        self.observers: list[Callable[[CallRecord], None]] = []
        self._domains: dict[str, _Domain] = {
            HOST: _Domain(DomainState.RUNNING, True),
            QUARANTINE: _Domain(DomainState.RUNNING, True),
        }
        self._present: set[Bdf] = {b for b in host.topology if b not in host.hotplug_later}
        self._driver: set[Bdf] = set()
        self._context: dict[Bdf, str] = {}  # requester ID -> domain
        self._stale: dict[Bdf, list[str]] = {}  # requester ID -> domains still cached, oldest first
        self._irte: dict[Bdf, str] = {}  # requester ID -> domain its MSIs reach
        self._exposed: dict[Bdf, str] = {}
        self._carries: dict[Bdf, frozenset[str]] = {}  # device -> owners whose state it holds
        self._sink: dict[Bdf | str, frozenset[str]] = {}  # scratch page -> whose data it holds
        self._atc: dict[Bdf, frozenset[str]] = {}  # requester ID -> domains its device-TLB caches
        self._ats: set[Bdf] = set()  # devices with ATS enabled
        self._taken: SimSnapshot | None = None  # the snapshot of the state as it is, once taken
        for bdf in self._present:
            if host.topology[bdf].driver:
                self._driver.add(bdf)
                self._carries[bdf] = frozenset({HOST})
                for rid in host.requester_ids(bdf):
                    self._context[rid] = HOST
                    self._irte[rid] = HOST
                self._enable_ats(bdf)
                self._settle(bdf)

    # -- the whole state as one value (for the verifier) ---------------------------
    def snapshot(self) -> SimSnapshot:
        """Everything that decides what happens next, as one hashable value.
        Fault rules, the call log and observers are not part of it. Taken again only
        after a step changed something (many transitions of the verifier take none)."""
        if self._taken is None:
            self._taken = self._take()
        return self._taken

    def _take(self) -> SimSnapshot:
        return SimSnapshot(
            frozenset(
                DomainSnapshot(n, d.state, d.iommu_context, d.declared_up_front, frozenset(d.reserved))
                for n, d in self._domains.items()
            ),
            frozenset(self._present),
            frozenset(self._driver),
            frozenset(self._context.items()),
            frozenset((rid, tuple(domains)) for rid, domains in self._stale.items() if domains),
            frozenset(self._irte.items()),
            frozenset(self._exposed.items()),
            frozenset(self._carries.items()),
            frozenset(self._sink.items()),
            frozenset(self._atc.items()),
            frozenset(self._ats),
        )

    def restore(self, state: SimSnapshot) -> None:
        self._domains = {
            d.name: _Domain(d.state, d.iommu_context, d.declared_up_front, set(d.reserved))
            for d in state.domains
        }
        self._present = set(state.present)
        self._driver = set(state.driver)
        self._context = dict(state.context)
        self._stale = {rid: list(domains) for rid, domains in state.stale}
        self._irte = dict(state.irte)
        self._exposed = dict(state.exposed)
        self._carries = dict(state.carries)
        self._sink = dict(state.sink)
        self._atc = dict(state.atc)
        self._ats = set(state.ats)
        self._taken = state
        self.faults = []

    # -- faults and observation ------------------------------------------------
    def inject(
        self,
        call: str | None = None,
        device: Bdf | None = None,
        *,
        skip: int = 0,
        times: int | None = 1,
    ) -> None:
        """Make the matching platform calls fail (``times=None``: every one)."""
        if call is not None and call not in STEPS:
            raise ValueError(f"no platform step named {call!r}; the steps are {', '.join(STEPS)}")
        self.faults.append(FaultRule(call, device, skip, times))

    def _step(self, call: str, device: Bdf | None, domain: str | None) -> None:
        """Entry of every step: fail it if a fault rule says so."""
        for rule in self.faults:
            if not rule.matches(call, device) or rule.times == 0:
                continue
            if rule.skip:
                rule.skip -= 1
                continue
            if rule.times is not None:
                rule.times -= 1
            self._record(CallRecord(call, device, domain, "injected fault"))
            raise InjectedFault(str(CallRecord(call, device, domain)), "injected fault")
        if device is not None and device not in self._present:
            self._record(CallRecord(call, device, domain, "device not present"))
            raise StepFailed(str(CallRecord(call, device, domain)), f"{device} is not present")

    def _record(self, record: CallRecord) -> None:
        self.log.append(record)
        for observer in self.observers:
            observer(record)

    def _done(self, call: str, device: Bdf | None, domain: str | None) -> None:
        """Every step that changes the state ends here."""
        self._taken = None
        self._record(CallRecord(call, device, domain))

    def _misuse(self, message: str) -> PlatformMisuse:
        return PlatformMisuse(message)

    # -- what is there now -------------------------------------------------------
    @property
    def host(self) -> Host:
        return self._host

    def domains(self) -> Mapping[str, DomainInfo]:
        """The domains as they are now: a view, read at once (a lookup reads one
        domain, so the verifier sees a step depend on that domain alone)."""
        return _DomainsView(self._domains)

    def present(self, device: Bdf) -> bool:
        return device in self._present

    def present_devices(self) -> list[Bdf]:
        return sorted(self._present)

    def host_driver_bound(self, device: Bdf) -> bool:
        return device in self._driver

    def context_of(self, device: Bdf) -> str | None:
        return self._context.get(device)

    def contexts(self, device: Bdf) -> dict[Bdf, str | None]:
        return {rid: self._context.get(rid) for rid in sorted(self._host.requester_ids(device))}

    def stale_entries(self, device: Bdf) -> dict[Bdf, set[str]]:
        """Translations the IOTLB caches for the device's requester IDs that differ from
        the context."""
        return self._differing(device, self._stale)

    def stale_device_tlb(self, device: Bdf) -> dict[Bdf, set[str]]:
        """Translations the device's own ATC caches that differ from the context."""
        return self._differing(device, self._atc)

    def _differing(self, device: Bdf, cache: Mapping[Bdf, Iterable[str]]) -> dict[Bdf, set[str]]:
        out = {}
        for rid in self._host.requester_ids(device):
            stale = set(cache.get(rid, ())) - {self._context.get(rid) or ""}
            if stale:
                out[rid] = stale
        return out

    def exposed_to(self, device: Bdf) -> str | None:
        return self._exposed.get(device)

    def carried_state(self, device: Bdf) -> frozenset[str]:
        """The owners whose state (programmed DMA, queues, buffers) the device still holds."""
        return self._carries.get(device, frozenset())

    def ats_enabled(self, device: Bdf) -> bool:
        return device in self._ats

    def scratch_pages_read(self, device: Bdf) -> dict[Bdf, frozenset[str]]:
        """For each requester ID of the device that reaches the scratch sink, whose data
        the page it reaches holds (empty in block mode)."""
        if self.quarantine_mode != "scratch":
            return {}
        return {
            rid: self._sink.get(self.scratch_page(rid), frozenset())
            for rid in sorted(self._host.requester_ids(device))
            if QUARANTINE in self._translations(rid)
        }

    def msi_route(self, device: Bdf) -> set[str]:
        return {self._irte[r] for r in self._host.requester_ids(device) if r in self._irte}

    def context_declared_up_front(self, domain: str) -> bool:
        return self._domain(domain).declared_up_front

    def guests_holding(self, device: Bdf) -> set[str]:
        """The guests with anything of the device: its exposure, or (while it is present)
        a context or interrupt remapping entry of one of its requester IDs. Firmware
        mappings are each guest's own: ``reserved_mappings``."""
        found = {self._exposed.get(device)}
        if device in self._present:
            for rid in self._host.requester_ids(device):
                found.add(self._context.get(rid))
                found.add(self._irte.get(rid))
        return {
            name
            for name in found
            if name is not None and name not in (HOST, QUARANTINE) and name in self._domains
        }

    def reserved_mappings(self, domain: str) -> set[tuple[Bdf, ReservedRegion]]:
        return set(self._domains[domain].reserved)

    def hardware_owner(self, device: Bdf) -> str | None:
        """Who the hardware says holds the device: where it is exposed, else where its
        own requester ID translates, else ``HOST`` if a host driver is bound."""
        if device in self._driver:
            return HOST
        return self._exposed.get(device) or self._context.get(device)

    def _is_bridge(self, bdf: Bdf) -> bool:
        """Bridges forward writes aimed at their windows; they hold no memory of their own."""
        return self._host.topology[bdf].kind.is_bridge

    def _domain(self, name: str) -> _Domain:
        try:
            return self._domains[name]
        except KeyError:
            raise self._misuse(f"no domain named {name!r}") from None

    def _translations(self, rid: Bdf) -> set[str]:
        """Every domain the IOTLB may translate ``rid`` through: its context and stale entries."""
        found = set(self._stale.get(rid, ()))
        if rid in self._context:
            found.add(self._context[rid])
        return found

    def scratch_page(self, rid: Bdf) -> Bdf | str:
        """The scratch page ``rid`` reaches in quarantine: its own, as Xen gives each device."""
        return rid

    def _enable_ats(self, device: Bdf) -> None:
        """As Linux does on attach: ATS on for devices that have it, unless untrusted
        (behind an external port), since their translated requests go unchecked."""
        if self._host.topology[device].ats and self._trusted(device):
            self._ats.add(device)

    def _trusted(self, device: Bdf) -> bool:
        return not self._host.topology.is_behind_external_port(device)

    def _settle(self, device: Bdf) -> None:
        """What devices may do by themselves at any moment, done at once after a step on
        ``device``: it caches in its ATC every translation it uses, and every programmed
        device writes the state it carries into any scratch page it reaches (a page may
        be shared, so every device is looked at, not only this one)."""
        if device in self._ats:
            for rid in self._host.requester_ids(device):
                context = self._context.get(rid)
                if context not in (None, QUARANTINE):
                    _add(self._atc, rid, {context})
        if self.quarantine_mode != "scratch":
            return
        for writer, carried in self._carries.items():
            for rid in self._host.requester_ids(writer):
                if QUARANTINE in self._translations(rid):
                    _add(self._sink, self.scratch_page(rid), carried)

    # -- domains -------------------------------------------------------------------
    def create_domain(self, name: str, *, iommu_context: bool) -> None:
        if name in self._domains or name in RESERVED_NAMES:
            raise self._misuse(f"domain {name!r} exists already or is reserved")
        self._step("create_domain", None, name)
        self._domains[name] = _Domain(DomainState.RUNNING, iommu_context, iommu_context)
        self._done("create_domain", None, name)

    def crash_domain(self, name: str) -> None:
        dom = self._domain(name)
        if name in (HOST, QUARANTINE) or dom.state is not DomainState.RUNNING:
            raise self._misuse(f"cannot crash {name}: it is {dom.state}")
        dom.state = DomainState.CRASHED
        self._done("crash_domain", None, name)

    def destroy_domain(self, name: str) -> None:
        dom = self._domain(name)
        if name in (HOST, QUARANTINE) or dom.state is DomainState.DESTROYED:
            raise self._misuse(f"cannot destroy {name}: it is {dom.state}")
        users = self._users_of(name)
        if users:
            raise self._misuse(f"cannot destroy {name}: {', '.join(map(str, users))} still point at it")
        self._step("destroy_domain", None, name)
        dom.state = DomainState.DESTROYED
        self._done("destroy_domain", None, name)

    def _users_of(self, name: str) -> list[Bdf]:
        users = {d for d, v in self._exposed.items() if v == name}
        for rid, dom in [*self._context.items(), *self._irte.items()]:
            if dom == name:
                users.update(self._host.owner_of_rid(rid) or [rid])
        users.update(bdf for bdf, _ in self._domains[name].reserved)
        return sorted(users)

    def enable_iommu_context(self, name: str) -> None:
        dom = self._domain(name)
        self._step("enable_iommu_context", None, name)
        dom.declared_up_front = dom.iommu_context
        dom.iommu_context = True
        self._done("enable_iommu_context", None, name)

    # -- device steps ----------------------------------------------------------------
    def unbind_host_driver(self, device: Bdf) -> None:
        if device not in self._driver:
            raise self._misuse(f"unbind_host_driver({device}): no host driver is bound")
        self._step("unbind_host_driver", device, None)
        self._driver.discard(device)
        self._done("unbind_host_driver", device, None)

    def bind_host_driver(self, device: Bdf) -> None:
        self._bind("bind_host_driver", device)

    def offer_host_driver(self, device: Bdf) -> None:
        """A simulated device always has a host driver that takes it."""
        self._bind("offer_host_driver", device)

    def _bind(self, call: str, device: Bdf) -> None:
        if device in self._driver:
            raise self._misuse(f"{call}({device}): a host driver is bound already")
        foreign = {r: d for r, d in self.contexts(device).items() if d != HOST}
        if foreign or device in self._exposed:
            raise self._misuse(
                f"{call}({device}): the device is not in the host's domain "
                f"(contexts {foreign}, exposed to {self._exposed.get(device)})"
            )
        self._step(call, device, None)
        self._driver.add(device)
        _add(self._carries, device, {HOST})
        self._settle(device)
        self._done(call, device, None)

    def reset(self, device: Bdf) -> None:
        self._step("reset", device, None)
        if not self._host.topology[device].reset_methods:
            self._record(CallRecord("reset", device, None, "no reset method"))
            raise StepFailed(f"reset({device})", "the device has no reset method")
        self._carries.pop(device, None)
        self._done("reset", device, None)

    def attach(self, device: Bdf, domain: str) -> None:
        target = self._domain(domain)
        if domain not in (HOST, QUARANTINE):
            if device in self._driver:
                raise self._misuse(f"attach({device}, {domain}): a host driver is still bound")
            if not target.iommu_context:
                raise self._misuse(
                    f"attach({device}, {domain}): {domain} was created without an IOMMU context"
                )
            self._check_group(device, domain)
        self._step("attach", device, domain)
        if domain not in (HOST, QUARANTINE) and target.state is not DomainState.RUNNING:
            self._record(CallRecord("attach", device, domain, f"{domain} is {target.state}"))
            raise StepFailed(f"attach({device}, {domain})", f"{domain} is {target.state}")
        for rid in self._contexts_set_by_attach(device):
            old = self._context.get(rid)
            if old is not None and old != domain:
                cached = self._stale.setdefault(rid, [])
                if old in cached:
                    cached.remove(old)
                cached.append(old)
            if domain == QUARANTINE and old != QUARANTINE:
                self._clear_scratch_page(rid)
            self._context[rid] = domain
        if domain != QUARANTINE:
            self._enable_ats(device)
        self._settle(device)
        self._done("attach", device, domain)

    def _contexts_set_by_attach(self, device: Bdf) -> frozenset[Bdf]:
        """Every requester ID the device can use: aliases and phantom functions too."""
        return self._host.requester_ids(device)

    def _clear_scratch_page(self, rid: Bdf) -> None:
        """A device enters quarantine on a clean page."""
        self._sink.pop(self.scratch_page(rid), None)

    def _check_group(self, device: Bdf, domain: str) -> None:
        for member in self._host.group_of(device).members:
            if member == device or member not in self._present:
                continue
            owner = self.hardware_owner(member)
            if owner not in (None, QUARANTINE, domain) and not self._host.topology[member].kind.is_bridge:
                raise self._misuse(
                    f"attach({device}, {domain}): {self._host.group_of(device)} also holds "
                    f"{member}, owned by {owner}; two owners in one IOMMU group"
                )

    def flush_iotlb(self, device: Bdf) -> None:
        self._step("flush_iotlb", device, None)
        for rid in self._host.requester_ids(device):
            self._stale.pop(rid, None)
            self._invalidate_device_tlb(rid)
        self._settle(device)
        self._done("flush_iotlb", device, None)

    def _invalidate_device_tlb(self, rid: Bdf) -> None:
        """The ATS invalidation that goes with every IOTLB flush."""
        self._atc.pop(rid, None)

    def map_reserved(self, device: Bdf, domain: str) -> None:
        dom = self._domain(domain)
        self._step("map_reserved", device, domain)
        for region in self._host.topology[device].reserved_regions:
            dom.reserved.add((device, region))
        self._done("map_reserved", device, domain)

    def unmap_reserved(self, device: Bdf, domain: str) -> None:
        dom = self._domain(domain)
        mine = {(d, r) for d, r in dom.reserved if d == device}
        if not mine:
            raise self._misuse(f"unmap_reserved({device}, {domain}): nothing of it is mapped there")
        self._step("unmap_reserved", device, domain)
        dom.reserved -= mine
        self._done("unmap_reserved", device, domain)

    def route_msi(self, device: Bdf, domain: str) -> None:
        self._domain(domain)
        self._step("route_msi", device, domain)
        for rid in self._host.requester_ids(device):
            if domain == QUARANTINE:
                self._irte.pop(rid, None)
            else:
                self._irte[rid] = domain
        self._done("route_msi", device, domain)

    def expose(self, device: Bdf, domain: str) -> None:
        self._domain(domain)
        holder = self._exposed.get(device)
        if holder is not None:
            raise self._misuse(f"expose({device}, {domain}): already exposed to {holder}")
        self._step("expose", device, domain)
        if self._domains[domain].state is not DomainState.RUNNING:
            self._record(CallRecord("expose", device, domain, f"{domain} is not running"))
            raise StepFailed(f"expose({device}, {domain})", f"{domain} is not running")
        self._exposed[device] = domain
        # The guest programs it, and every device with a BAR in a page it now maps.
        reached = [s.other for s in self._host.shared_resources(device) if s.kind is Resource.BAR_PAGE]
        for programmed in [device, *(d for d in reached if d in self._present)]:
            _add(self._carries, programmed, {domain})
        self._settle(device)
        self._done("expose", device, domain)

    def unexpose(self, device: Bdf, domain: str) -> None:
        if self._exposed.get(device) != domain:
            raise self._misuse(f"unexpose({device}, {domain}): it is not exposed to {domain}")
        self._step("unexpose", device, domain)
        del self._exposed[device]
        self._done("unexpose", device, domain)

    def remove(self, device: Bdf) -> None:
        """As Linux's ``remove``: the device and everything below it leave the bus."""
        self._step("remove", device, None)
        for gone in self._host.topology.subtree(device):
            if gone in self._present:
                self._forget(gone)
        self._done("remove", device, None)

    def _forget(self, device: Bdf) -> None:
        self._present.discard(device)
        self._driver.discard(device)
        self._exposed.pop(device, None)
        self._carries.pop(device, None)
        self._ats.discard(device)
        still_used = {r for d in self._present for r in self._host.requester_ids(d)}
        for rid in self._host.requester_ids(device) - still_used:
            for table in (self._context, self._stale, self._irte, self._atc, self._sink):
                table.pop(rid, None)
        for dom in self._domains.values():
            dom.reserved = {(d, r) for d, r in dom.reserved if d != device}

    # -- events from outside the toolstack -----------------------------------------------
    def plug(self, device: Bdf) -> None:
        """A device appears on the bus: no driver, no context entry, so no DMA yet."""
        if device not in self._host.topology or device in self._present:
            raise self._misuse(f"plug({device}): not a pluggable absent device")
        parent = self._host.topology[device].parent
        if parent is not None and parent not in self._present:
            raise self._misuse(f"plug({device}): the bridge above it, {parent}, is not present")
        self._present.add(device)
        self._done("plug", device, None)

    def unplug(self, device: Bdf) -> None:
        """Surprise removal."""
        if device not in self._present:
            raise self._misuse(f"unplug({device}): not present")
        self._forget(device)
        self._done("unplug", device, None)

    # -- the DMA and MSI engine ------------------------------------------------------------
    def dma(
        self,
        device: Bdf,
        address: int = 0,
        *,
        requester: Bdf | None = None,
        peer: Bdf | None = None,
    ) -> Landed | Blocked:
        """Where a DMA write from ``device`` lands.

        ``requester`` picks one of the device's requester IDs (a phantom function or
        alias); ``peer`` aims the write at another device's BAR instead of memory.
        """
        if device not in self._present:
            return Blocked(f"{device} is not present")
        rid = requester or device
        if rid not in self._host.requester_ids(device):
            return Blocked(f"{device} cannot use requester ID {rid}")
        # Inside a group nothing stops a peer write; across groups ACS redirects it
        # upstream to the IOMMU, which translates it like any other DMA.
        if (
            peer is not None
            and not self._is_bridge(peer)
            and peer in self._present
            and peer in self._host.group_of(device)
        ):
            owner = self.hardware_owner(peer) or "nobody"
            return Landed(owner, f"BAR of {peer}", "peer-to-peer inside the IOMMU group")
        if not self._host.dma_translated(device):
            return Landed(HOST, f"physical memory {address:#x}", "no DMA remapping")
        if self._untrusted_ats(device):
            return Landed(HOST, f"physical memory {address:#x}", "an ATS translated request, unchecked")
        stale = [d for d in self._stale.get(rid, ()) if d != self._context.get(rid)]
        if stale:  # the most recently replaced translation is the one still cached
            return self._translate(stale[-1], address, f"stale IOTLB entry for {rid}")
        cached = sorted(self.stale_device_tlb(device).get(rid, ()))
        if cached:
            return self._translate(cached[0], address, f"stale device-TLB (ATS) entry of {rid}")
        return self._translate(self._context.get(rid), address, f"context entry for {rid}")

    def _translate(self, domain: str | None, address: int, via: str) -> Landed | Blocked:
        if domain is None:
            return Blocked(f"no {via.replace('context entry', 'context entry present')}")
        if domain == HOST:
            return Landed(HOST, f"memory {address:#x}", via)
        if domain == QUARANTINE:
            if self.quarantine_mode == "scratch":
                return Landed(QUARANTINE, "scratch page", via)
            return Blocked(f"quarantine in block mode ({via})")
        dom = self._domains[domain]
        if dom.state is DomainState.DESTROYED:
            return Landed(HOST, f"memory {address:#x} freed by destroyed {domain}", via)
        for _, region in dom.reserved:
            if address in region:
                return Landed("firmware", f"reserved region {region}", via)
        if address < GUEST_RAM:
            return Landed(domain, f"RAM {address:#x}", via)
        return Blocked(f"IOMMU fault: {address:#x} is not mapped in {domain} ({via})")

    def reachable(self, device: Bdf) -> set[tuple[str, str]]:
        """Every (domain, what) a malicious ``device`` could write to now."""
        if device not in self._present:
            return set()
        out: set[tuple[str, str]] = set()
        for peer in self._host.group_of(device).members:
            if peer != device and peer in self._present and not self._is_bridge(peer):
                owner = self.hardware_owner(peer)
                if owner is not None:
                    out.add((owner, f"BAR of {peer}"))
        if not self._host.dma_translated(device):
            out.add((HOST, "all physical memory"))
            return out
        if self._untrusted_ats(device):
            out.add((HOST, "all physical memory (ATS translated requests)"))
        for rid in self._host.requester_ids(device):
            for domain in self._translations(rid) | set(self._atc.get(rid, ())):
                out.update(self._memory_of(domain))
        return out

    def _untrusted_ats(self, device: Bdf) -> bool:
        """An untrusted device with ATS on may send requests marked translated, which the
        IOMMU passes to any physical address."""
        return device in self._ats and self._host.topology.is_behind_external_port(device)

    def _memory_of(self, domain: str) -> set[tuple[str, str]]:
        if domain == HOST:
            return {(HOST, "memory")}
        if domain == QUARANTINE:
            return {(QUARANTINE, "scratch page")} if self.quarantine_mode == "scratch" else set()
        dom = self._domains[domain]
        if dom.state is DomainState.DESTROYED:
            return {(HOST, f"memory freed by destroyed {domain}")}
        return {(domain, "RAM")} | {("firmware", str(r)) for _, r in dom.reserved}

    def msi(self, device: Bdf, target: str = HOST) -> Delivered | Blocked:
        """An MSI write from ``device`` aimed at ``target``'s interrupt doorbell."""
        if device not in self._present:
            return Blocked(f"{device} is not present")
        if not self._host.msi_isolated(device):
            return Delivered(target, "no interrupt isolation: the device picks the destination")
        if device in self._irte:
            return Delivered(self._irte[device], f"remapping entry of {device}")
        return Blocked(f"no interrupt remapping entry for source-id {device}")

    def msi_targets(self, device: Bdf) -> set[str]:
        """Every domain ``device`` could raise an interrupt in now ("*": any)."""
        if device not in self._present:
            return set()
        if not self._host.msi_isolated(device):
            return {"*"}
        return self.msi_route(device)
