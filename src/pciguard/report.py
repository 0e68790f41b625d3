"""The audit report: host findings and a verdict per IOMMU group. Pure.

The dataclasses below *are* the JSON schema of ``pciguard audit --json``
(``docs/schemas/audit.schema.json`` is generated from them through pydantic, which only
JSON output, input and the schema load: the table of a large host should not pay for
it; ``schema_version`` changes when a field changes meaning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any, Final, Literal

from pciguard.checks import (
    CONTRADICTED_GROUP,
    HOST_CRITICAL,
    IDENTITY_DOMAIN,
    MSI_NOT_ISOLATED,
    NO_IOMMU,
    NO_RESET,
    RESERVED_REGION,
    SRIOV_PF,
    UNKNOWN_DOMAIN,
    Holder,
    Options,
    Reason,
    device_reasons,
)
from pciguard.model import Arch, Bdf, DomainType, Feature, Host, IommuGroup, IommuUnit, Kind, MsiController
from pciguard.model.acs_quirks import KERNEL_RELEASE, quirk_decision
from pciguard.model.groups import acs_enabled, acs_never_asked
from pciguard.model.kernel import PCIBACK, QUARANTINE_DRIVERS, KernelFacts, XenQuarantine
from pciguard.model.ownership import State

if TYPE_CHECKING:  # the audit of a real host never loads the toolstack
    from pciguard.toolstack import Toolstack

SCHEMA_VERSION: Final = 3


class Severity(StrEnum):
    CRITICAL = "critical"  # the host cannot isolate devices (or an unsafe override is on)
    WARNING = "warning"
    INFO = "info"


class Verdict(StrEnum):
    READY = "ready"  # every endpoint is quarantined and passes every check
    READY_AFTER_QUARANTINE = "ready-after-quarantine"  # quarantine the listed devices first
    NOT_ASSIGNABLE = "not-assignable"
    BRIDGES_ONLY = "bridges-only"  # infrastructure; stays with the host


@dataclass(kw_only=True, slots=True)
class Finding:
    code: str
    severity: Severity
    message: str


@dataclass(kw_only=True, slots=True)
class ReasonEntry:
    code: str
    message: str


BRIDGE_KINDS = frozenset(k.value for k in Kind if k.is_bridge)  # DeviceEntry.kind of ports and bridges


@dataclass(kw_only=True, slots=True)
class DeviceEntry:
    bdf: str
    name: str
    ids: str
    kind: str
    parent: str | None  # the bridge or port above; None on a root bus
    physfn: str | None  # the physical function of an SR-IOV virtual function
    driver: str | None
    state: str
    vm: str | None
    external: bool
    iommu: str | None
    requester_ids: list[str]
    reasons: list[ReasonEntry]


@dataclass(kw_only=True, slots=True)
class GroupEntry:
    number: int | None  # None: the devices no IOMMU group holds
    domain: str | None  # the kernel's default domain type (DMA, DMA-FQ, identity, ...)
    verdict: Verdict
    members: list[DeviceEntry]
    must_quarantine: list[str]  # what must go with a device of this group
    reasons: list[ReasonEntry]  # why it is not assignable
    notes: list[ReasonEntry]  # why members share the group, external ports, disagreements
    # Planning: the host has no IOMMU groups (IOMMU off, or a dump without group lines),
    # and this is one pciguard derives for the IOMMU on, judged as if it were.
    planned: bool = False


@dataclass(kw_only=True, slots=True)
class Limitation:
    path: str
    why: str
    hides: str


@dataclass(kw_only=True, slots=True)
class InputProblemEntry:
    path: str
    message: str


@dataclass(kw_only=True, slots=True)
class IommuEntry:
    name: str
    dma_remapping: str  # enabled, disabled, absent, unknown
    interrupt_remapping: str
    msi_controller: str | None  # ARM: the MSI controller behind the SMMU


@dataclass(kw_only=True, slots=True)
class FirmwareEntry:
    """What the firmware's IOMMU table says, as read on a real host."""

    table: str | None  # DMAR or IVRS; None: there is none, or it could not be read
    units: int  # remapping units it describes
    flags: list[str]  # DMAR flags by name (INTR_REMAP, X2APIC_OPT_OUT, DMA_CTRL_PLATFORM_OPT_IN)
    preboot_dma_protection: bool | None  # None: could not tell


@dataclass(kw_only=True, slots=True)
class AuditReport:
    schema_version: Literal[3] = SCHEMA_VERSION
    host: str
    arch: str
    source: str
    findings: list[Finding]
    iommus: list[IommuEntry] = field(default_factory=list)  # the remapping units in use, with what each does
    firmware: FirmwareEntry | None = None  # None: not audited from a real host
    unsafe_overrides: list[str]
    groups: list[GroupEntry]
    # What could not be read and what that hides; malformed input the audit worked around.
    limitations: list[Limitation] = field(default_factory=list)
    input_problems: list[InputProblemEntry] = field(default_factory=list)

    @property
    def critical(self) -> bool:
        return any(f.severity is Severity.CRITICAL for f in self.findings)


@cache
def _adapter() -> Any:
    from pydantic import TypeAdapter  # only JSON in or out, and the schema, need it

    return TypeAdapter(AuditReport)


def report_json(report: AuditReport) -> str:
    return str(_adapter().dump_json(report, indent=2).decode())


def load_report(text: str | bytes) -> AuditReport:
    """A report as ``pciguard audit --json`` prints it, checked against its schema
    (pydantic's ValidationError names what does not fit)."""
    report: AuditReport = _adapter().validate_json(text)
    return report


def report_schema() -> dict[str, Any]:
    schema: dict[str, Any] = _adapter().json_schema()
    return schema


# What each reason is, in a few words, for the default table and the drawing (the
# reason whole is in --verbose and the JSON).
REASON_LABELS = {
    MSI_NOT_ISOLATED: "interrupts not isolated",
    NO_RESET: "no reset method",
    RESERVED_REGION: "firmware 1:1 regions",
    SRIOV_PF: "SR-IOV physical function with VFs on",
    IDENTITY_DOMAIN: "identity domain: DMA not translated",
    UNKNOWN_DOMAIN: "default domain type unread",
    CONTRADICTED_GROUP: "the kernel's sources disagree on the group",
}


def first_clause(message: str) -> str:
    """The words before the first ": " or "; " (a reason's what, without its why)."""
    cut = min((i for i in (message.find(": "), message.find("; ")) if i > 0), default=len(message))
    return message[:cut]


def reason_label(reason: ReasonEntry) -> str:
    return REASON_LABELS.get(reason.code) or first_clause(reason.message)


def host_findings(host: Host, options: Options) -> list[Finding]:
    out: list[Finding] = []
    if not host.iommus:
        out.append(
            Finding(
                code="no-iommu",
                severity=Severity.CRITICAL,
                message=(
                    "no IOMMU: every device can DMA to all of memory, so no device can be safely "
                    "given to a VM"
                ),
            )
        )
    for unit in host.iommus:
        if unit.dma_remapping is not Feature.ENABLED:
            out.append(
                Finding(
                    code="dma-remapping-off",
                    severity=Severity.CRITICAL,
                    message=(
                        f"IOMMU {unit.name}: DMA remapping is {unit.dma_remapping.value}; devices "
                        "behind it reach all of memory"
                    ),
                )
            )
        if host.arch is Arch.X86 and unit.interrupt_remapping is not Feature.ENABLED:
            out.append(
                Finding(
                    code="no-interrupt-remapping",
                    severity=Severity.CRITICAL,
                    message=(
                        f"IOMMU {unit.name}: interrupt remapping is {unit.interrupt_remapping.value}; "
                        "a device can raise any interrupt in any domain, so assignment is refused"
                    ),
                )
            )
        if host.arch is Arch.ARM and unit.msi_controller is not MsiController.ITS:
            out.append(
                Finding(
                    code="msi-not-isolated",
                    severity=Severity.CRITICAL,
                    message=(
                        f"IOMMU {unit.name}: MSIs go to {unit.msi_controller}, which cannot tell "
                        "devices apart, so assignment of devices behind it is refused"
                        if unit.msi_controller is not None
                        else f"IOMMU {unit.name}: which MSI controller its devices' interrupts go to is "
                        "unknown (an ITS tells devices apart, others do not), so assignment is refused"
                    ),
                )
            )
    uncovered = [b for b, f in host.topology.items() if host.iommu_of(b) is None and not f.root_complex_part]
    if host.iommus and uncovered:
        out.append(
            Finding(
                code="uncovered-devices",
                severity=Severity.WARNING,
                message=(
                    f"{len(uncovered)} device(s) are covered by no IOMMU and reach all of memory: "
                    + ", ".join(map(str, uncovered[:5]))
                    + (" ..." if len(uncovered) > 5 else "")
                ),
            )
        )
    external = [b for b, f in host.topology.items() if f.external]
    if external:
        out.append(
            Finding(
                code="external-ports",
                severity=Severity.INFO,
                message=(
                    f"{len(external)} external-facing port(s) ({', '.join(map(str, external))}): "
                    "devices plugged in there are quarantined unless a rule names them"
                ),
            )
        )
    untrusted_ats = [
        b for b, f in host.topology.items() if f.ats and host.topology.is_behind_external_port(b)
    ]
    if untrusted_ats:
        out.append(
            Finding(
                code="ats-external",
                severity=Severity.WARNING,
                message=(
                    f"ATS on device(s) behind external ports ({', '.join(map(str, untrusted_ats))}): "
                    "ATS must stay off for them, since the IOMMU does not check a request the "
                    "device marks translated (Linux keeps it off for such devices; Xen uses ATS "
                    "only with ats=1)"
                ),
            )
        )
    for text in options.unsafe_overrides():
        out.append(
            Finding(
                code="unsafe-override",
                severity=Severity.CRITICAL,
                message=f"UNSAFE override in force: {text}",
            )
        )
    return out


def _device_entry(host: Host, bdf: Bdf, holder: Holder, reasons: list[Reason]) -> DeviceEntry:
    fn = host.topology.functions[bdf]
    unit = host.iommu_of(bdf)
    return DeviceEntry(
        bdf=str(bdf),
        name=fn.name,
        ids=fn.ids,
        kind=fn.kind.value,
        parent=str(fn.parent) if fn.parent else None,
        physfn=str(fn.physfn) if fn.physfn else None,
        driver=fn.driver,
        state=holder.state.value,
        vm=holder.vm,
        external=host.topology.is_behind_external_port(bdf),
        iommu=unit.name if unit else None,
        requester_ids=[str(r) for r in sorted(host.requester_ids(bdf))],
        reasons=[ReasonEntry(code=r.code, message=r.message) for r in reasons],
    )


def audit(ts: Toolstack, source: str) -> AuditReport:
    """Audit a simulated host through its toolstack, as the ledger stands now."""
    return audit_host(
        ts.host,
        ts.options,
        source,
        lambda b: ts.ledger[b].holder() if b in ts.ledger else None,
        unsafe=ts.unsafe_in_force(),
    )


def linux_holder(host: Host, facts: KernelFacts | None = None) -> Callable[[Bdf], Holder]:
    """On a real host, who holds a device is what its driver says. On Xen, a device with
    pciback is away from dom0 only when pciguard made it assignable (its journal says so;
    pciback seizing a device leaves it in dom0's IOMMU context) and Xen quarantines."""
    xen = facts.xen if facts else None
    functions = host.topology.functions
    in_domid_io: frozenset[Bdf] | None = None  # None: not Xen, pciback holds as vfio-pci does
    if xen is not None:
        quarantines = xen.quarantine not in (None, XenQuarantine.NONE)
        in_domid_io = (xen.made_assignable or frozenset()) if quarantines else frozenset()

    def holder(b: Bdf) -> Holder:
        driver = functions[b].driver
        if driver == PCIBACK and in_domid_io is not None:
            held = b in in_domid_io
        else:
            held = driver in QUARANTINE_DRIVERS
        return Holder(State.QUARANTINED if held else State.HOST)

    return holder


PLANNED_IOMMU = "the IOMMU, if it were on"


def audit_host(
    host: Host,
    options: Options,
    source: str,
    holder_of: Callable[[Bdf], Holder | None],
    unsafe: list[str] | None = None,
    facts: KernelFacts | None = None,
) -> AuditReport:
    """Audit ``host``: host findings, then every group with its verdict and reasons.
    A real host that formed no IOMMU groups (its IOMMU off, or a dump without group
    lines) gets planning groups instead: those pciguard derives, judged as on the same
    host with an IOMMU that remaps DMA and interrupts (the findings stay the host's)."""
    planning = facts is not None and host.kernel_groups is None and facts.xen is None
    if planning:
        judged = replace(host, iommus=(IommuUnit(PLANNED_IOMMU),))
        groups = [_group_entry(judged, options, g, holder_of, facts, planned=True) for g in judged.groups]
    else:
        groups = [_group_entry(host, options, g, holder_of, facts) for g in host.groups]
        for bdf in host.ungrouped():  # one entry each: nothing ties them together or confines them
            alone = IommuGroup(-1, (bdf,))
            groups.append(_group_entry(host, options, alone, holder_of, facts, ungrouped=True))
    findings = host_findings(host, options)
    if planning and facts is not None:
        how_sure = (
            "ACS was visible, so they are the kernel's as far as pciguard follows it"
            if facts.topology_complete
            else "ACS was hidden (not read as root), so a port or multi-function device counts as not "
            "isolating: run lspci (or pciguard) as root for a sure answer"
        )
        findings.append(
            Finding(
                code="planning",
                severity=Severity.INFO,
                message="planning: the groups below are what the kernel would form with the IOMMU on, as "
                "pciguard derives them from topology, ACS and the kernel's ACS quirks, judged as if DMA "
                f"and interrupt remapping were enabled; {how_sure}",
            )
        )
    unsafe = list(unsafe if unsafe is not None else options.unsafe_overrides())
    if facts is not None:
        findings += kernel_findings(host, facts)
        unsafe += [f"kernel: {u}" for u in facts.kernel_unsafe]
    return AuditReport(
        host=host.name,
        arch=host.arch.value,
        source=source,
        findings=findings,
        iommus=[
            IommuEntry(
                name=u.name,
                dma_remapping=u.dma_remapping.value,
                interrupt_remapping=u.interrupt_remapping.value,
                msi_controller=u.msi_controller.value if u.msi_controller else None,
            )
            for u in host.iommus
        ],
        firmware=FirmwareEntry(
            table=facts.firmware_table,
            units=facts.firmware_units,
            flags=list(facts.firmware_flags),
            preboot_dma_protection=facts.preboot_dma_protection,
        )
        if facts
        else None,
        unsafe_overrides=unsafe,
        groups=[g for g in groups if g.members],
        limitations=[Limitation(path=u.path, why=u.why, hides=u.hides) for u in facts.unreadable]
        if facts
        else [],
        input_problems=[InputProblemEntry(path=p.path, message=p.message) for p in facts.problems]
        if facts
        else [],
    )


def _group_entry(
    host: Host,
    options: Options,
    group: IommuGroup,
    holder_of: Callable[[Bdf], Holder | None],
    facts: KernelFacts | None,
    ungrouped: bool = False,
    planned: bool = False,
) -> GroupEntry:
    holders = {b: holder_of(b) for b in group.members}
    present = [b for b, h in holders.items() if h is not None and h.state is not State.REMOVED]
    endpoints = [b for b in present if not host.topology[b].kind.is_bridge]
    if ungrouped:  # the root complex's own functions stay with the host, like bridges
        endpoints = [b for b in endpoints if not host.topology[b].root_complex_part]
    per_device: dict[Bdf, list[Reason]] = {}
    for bdf in present:
        fn = host.topology[bdf]
        reasons = device_reasons(host, bdf, options) if bdf in endpoints else []
        if ungrouped and not any(r.code == NO_IOMMU for r in reasons) and bdf in endpoints:
            reasons.insert(0, Reason(NO_IOMMU, f"no IOMMU group holds {bdf}: nothing confines its DMA"))
        if fn.host_critical:
            reasons.append(Reason(HOST_CRITICAL, f"{bdf} is host-critical: {fn.host_critical}"))
        per_device[bdf] = reasons
    blockers = [r for b in endpoints for r in per_device[b]]
    # Devices in other groups sharing a BAR page or an INTx line go with these ones.
    sharers = [
        s.other
        for b in endpoints
        for s in host.shared_resources(b)
        if s.other not in group.members and (h := holder_of(s.other)) is not None and h.state is State.HOST
    ]
    with_host = [b for b in endpoints if holders[b].state is State.HOST]  # type: ignore[union-attr]
    to_quarantine = [str(b) for b in dict.fromkeys([*with_host, *sharers])]
    if not endpoints:
        verdict = Verdict.BRIDGES_ONLY
    elif blockers:
        verdict = Verdict.NOT_ASSIGNABLE
    elif to_quarantine:
        verdict = Verdict.READY_AFTER_QUARANTINE
    else:
        verdict = Verdict.READY
    return GroupEntry(
        number=None if ungrouped else group.number,
        domain=group.domain.value if group.domain else None,
        verdict=verdict,
        members=[_device_entry(host, b, holders[b], per_device[b]) for b in present],  # type: ignore[arg-type]
        must_quarantine=to_quarantine if verdict is not Verdict.NOT_ASSIGNABLE else [],
        reasons=[ReasonEntry(code=r.code, message=r.message) for r in dict.fromkeys(blockers)],
        notes=_ungrouped_notes(host, group) if ungrouped else group_notes(host, group, facts),
        planned=planned,
    )


def _ungrouped_notes(host: Host, group: IommuGroup) -> list[ReasonEntry]:
    notes = []
    for b in group.members:
        fn = host.topology[b]
        if fn.root_complex_part:
            what = "the IOMMU itself" if fn.class_code >> 8 == 0x0806 else "a host bridge"
            notes.append(
                ReasonEntry(
                    code="root-complex",
                    message=f"{b} is part of the root complex ({what}): the kernel put it in no IOMMU "
                    "group; it stays with the host",
                )
            )
    return notes


def group_notes(host: Host, group: IommuGroup, facts: KernelFacts | None) -> list[ReasonEntry]:
    """Why members share the group, what is external, and where pciguard and the kernel differ."""
    topo = host.topology
    notes: list[ReasonEntry] = []
    endpoints = [b for b in group.members if not topo[b].kind.is_bridge]
    on_paths = {f.bdf: f for m in group.members for f in (topo[m], *topo.path_to_root(m))}
    quirked = {
        b: decided
        for b, f in on_paths.items()
        if not acs_never_asked(topo, f) and (decided := quirk_decision(topo, f)) is not None
    }
    notes += [ReasonEntry(code="acs-quirk", message=f"{b} is {decided}") for b, decided in quirked.items()]
    if len(endpoints) > 1:
        hidden = facts is not None and not facts.topology_complete
        # Unread ACS is not missing ACS: say which one the grouping rests on.
        without = "with no ACS seen (not read as root)" if hidden else "without ACS"
        reach = "may reach" if hidden else "reach"
        leaky: dict[str, str] = {}
        for f in on_paths.values():
            if f.bdf in quirked or acs_enabled(topo, f):
                continue
            if f.kind is Kind.PCIE_TO_PCI_BRIDGE:
                leaky[str(f.bdf)] = (
                    "a PCIe-to-PCI bridge, so the conventional PCI devices below it share requester IDs"
                )
            elif f.kind in (Kind.ROOT_PORT, Kind.SWITCH_DOWNSTREAM):
                leaky[str(f.bdf)] = (
                    f"a {f.kind.value} {without}: devices below it {reach} each other directly"
                )
            elif topo.is_multifunction(f.bdf):
                slot = f"{f.bdf.segment:04x}:{f.bdf.bus:02x}:{f.bdf.device:02x}"
                leaky[slot] = f"a multi-function device {without}: its functions {reach} each other directly"
        notes += [ReasonEntry(code="no-acs", message=f"{where} is {why}") for where, why in leaky.items()]
    for b in endpoints:
        for shared in host.shared_resources(b):
            if shared.other not in group.members:
                notes.append(
                    ReasonEntry(
                        code="shared-resource",
                        message=f"{b} shares {shared.what} with {shared.other} of another group: "
                        "they go to one owner only (XSA-461)",
                    )
                )
    external = [b for b in endpoints if topo.is_behind_external_port(b)]
    if external:
        notes.append(
            ReasonEntry(
                code="external-port",
                message=f"{', '.join(map(str, external))} sit(s) behind an external port: "
                "whoever can plug in there can replace it with a device of their choosing",
            )
        )
    differing = host.groups_differing.get(group.number)
    if differing and (facts is None or facts.topology_complete):
        mine = " + ".join("[" + ", ".join(map(str, g.members)) + "]" for g in differing)
        notes.append(
            ReasonEntry(
                code="groups-differ",
                message=f"pciguard derives {mine} from topology, ACS and the kernel's ACS quirks, the "
                f"kernel formed one group: a quirk newer than {KERNEL_RELEASE}'s, an ACS override, or a "
                "bug of pciguard's (please report it with `pciguard snapshot`)",
            )
        )
    return notes


def xen_findings(host: Host, facts: KernelFacts) -> list[Finding]:
    """What a Xen dom0 is told by its hypervisor about isolation (the kernel sees no
    IOMMU there: Xen owns it)."""
    xen = facts.xen
    assert xen is not None
    out: list[Finding] = []

    def add(code: str, severity: Severity, message: str) -> None:
        out.append(Finding(code=code, severity=severity, message=message))

    version = f"Xen {xen.version}" if xen.version else "Xen (version unknown: `xl info` gave nothing)"
    add(
        "xen-dom0",
        Severity.INFO,
        f"a Xen dom0 ({version}): the IOMMU is the hypervisor's, judged from `xl info` and `xl dmesg`; "
        "Xen forms no IOMMU groups and never checks them before an assignment: the groups below are "
        "pciguard's derivation from topology and ACS, and pciguard checks them",
    )
    if not xen.boot_log_complete and Feature.UNKNOWN in (xen.dma_remapping, xen.interrupt_remapping):
        add(
            "xen-boot-log-lost",
            Severity.WARNING,
            "`xl dmesg` no longer holds Xen's boot messages (the console ring wrapped), so what Xen set "
            "up for the IOMMU is unknown and judged as off; boot with a larger conring_size= to keep them",
        )
    if xen.dma_remapping is Feature.DISABLED:
        add(
            "xen-iommu-off",
            Severity.CRITICAL,
            "Xen runs without an IOMMU (I/O virtualisation disabled): a device given to a guest, or "
            "driven by dom0, can DMA anywhere, into Xen and every guest",
        )
    elif xen.interrupt_remapping is Feature.DISABLED:
        add(
            "xen-no-interrupt-remapping",
            Severity.CRITICAL,
            "Xen has no interrupt remapping: a device given to a guest can raise interrupts in other "
            "domains (XSA-59 and its kind); pciguard refuses to assign such devices",
        )
    if xen.quarantine is XenQuarantine.NONE and xen.dma_remapping is not Feature.DISABLED:
        add(
            "xen-no-quarantine",
            Severity.CRITICAL,
            "Xen gives an assignable device back to dom0 when its guest is done with it, with the DMA "
            "the guest programmed still in flight (XSA-302): iommu=no-quarantine, or a Xen before 4.13",
        )
    elif xen.quarantine is XenQuarantine.SCRATCH_PAGE:
        add(
            "xen-quarantine",
            Severity.INFO,
            "Xen quarantine: scratch page (a device between guests reaches one page of its own)",
        )
    elif xen.quarantine is XenQuarantine.BASIC:
        add(
            "xen-quarantine",
            Severity.INFO,
            "Xen quarantine: basic (a device between guests sits with DOMID_IO and its DMA faults)",
        )
    if xen.dom0_mode == "Passthrough":
        add(
            "xen-dom0-passthrough",
            Severity.CRITICAL,
            "dom0's devices are not translated (iommu=dom0-passthrough): any device dom0 drives, a "
            "hot-plugged one too, reaches all memory, Xen's and every guest's",
        )
    if not xen.directio and xen.version:
        add(
            "xen-no-directio",
            Severity.WARNING,
            "`xl info` lists neither hvm_directio nor pv_directio: this Xen cannot give devices to guests",
        )
    seized = [
        b
        for b, f in host.topology.items()
        if f.driver == PCIBACK and (xen.made_assignable is None or b not in xen.made_assignable)
    ]
    if seized:
        unknown = " (pciguard's journal was not read: run as root)" if xen.made_assignable is None else ""
        add(
            "xen-pciback-not-assignable",
            Severity.WARNING,
            f"held by xen-pciback but not made assignable by pciguard{unknown}, so counted as dom0's: "
            f"{', '.join(map(str, seized))}; xen-pciback alone (xen-pciback.hide=, new_slot) leaves a "
            "device in dom0's IOMMU context, its DMA reaching dom0's memory, until `xl "
            "pci-assignable-add` moves it to DOMID_IO: `pciguard quarantine` it",
        )
    for device in xen.permissive:
        which = "every device pciback holds" if device == "*" else device
        add(
            "unsafe-override",
            Severity.CRITICAL,
            f"UNSAFE: xen-pciback is permissive for {which}: a guest may write any of its config "
            "space (BARs, MSI) and reach what it should not",
        )
    return out


def kernel_findings(host: Host, facts: KernelFacts) -> list[Finding]:
    """What a Linux kernel's own state says about isolation."""
    out: list[Finding] = []

    def add(code: str, severity: Severity, message: str) -> None:
        out.append(Finding(code=code, severity=severity, message=message))

    if facts.xen is not None:
        return xen_findings(host, facts)
    groups = host.kernel_groups or ()
    dump = facts.source_kind == "lspci"
    if not host.iommus and dump:
        add(
            "no-groups-in-dump",
            Severity.INFO,
            "the dump has no 'IOMMU group' lines: the IOMMU was off when it was taken (or pciutils "
            "was older than 3.6.2); a dump cannot show whether the firmware describes an IOMMU",
        )
    elif not host.iommus and facts.firmware_table is None:
        dmar_unread = any(u.path.endswith(("DMAR", "IVRS")) for u in facts.unreadable)
        add(
            "no-firmware-iommu",
            Severity.INFO,
            "the firmware tables (DMAR/IVRS) could not be read, so whether the hardware has an IOMMU "
            "is unknown"
            if dmar_unread
            else "the firmware describes no IOMMU (no DMAR or IVRS table): enable VT-d / AMD-Vi in the "
            "firmware setup if the hardware has one",
        )
    if host.iommus and groups == ():
        add(
            "no-groups",
            Severity.CRITICAL,
            "the kernel formed no IOMMU groups: no device is isolated",
        )
    identity = [g for g in groups if g.domain is DomainType.IDENTITY]
    if identity:
        add(
            "identity-domains",
            Severity.CRITICAL,
            f"{len(identity)} of {len(groups)} IOMMU groups have identity (passthrough) default domains "
            "(iommu=pt or iommu.passthrough=1): their devices' DMA is not translated and reaches all RAM, "
            "even while bound to vfio-pci and unused",
        )
    lazy = [g for g in groups if g.domain is DomainType.DMA_FQ]
    if lazy:
        add(
            "lazy-invalidation",
            Severity.WARNING,
            f"{len(lazy)} IOMMU groups use lazy IOTLB invalidation (DMA-FQ): a freed DMA buffer stays "
            "reachable by the device for a few milliseconds; iommu.strict=1 makes it strict",
        )
    if facts.interrupt_remapping_in_use is None and host.arch is Arch.X86 and host.iommus:
        add(
            "interrupt-remapping-unknown",
            Severity.WARNING,
            "an lspci dump cannot show whether interrupt remapping is in use; judged as off"
            if dump
            else "could not tell from /proc/interrupts whether interrupt remapping is in use; judged as off",
        )
    if "X2APIC_OPT_OUT" in facts.firmware_flags:
        add(
            "x2apic-opt-out",
            Severity.WARNING,
            "the firmware asks the OS not to use x2APIC (DMAR X2APIC_OPT_OUT), which some kernels "
            "answer by leaving interrupt remapping off",
        )
    has_external = any(f.external for f in host.topology.values()) or facts.thunderbolt_domains
    if facts.preboot_dma_protection:
        add(
            "preboot-dma-protection",
            Severity.INFO,
            "the firmware protects against DMA before the OS starts (pre-boot DMA protection)",
        )
    elif facts.preboot_dma_protection is False and has_external:
        add(
            "no-preboot-dma-protection",
            Severity.WARNING,
            "no pre-boot DMA protection: a device on an external port can DMA while the machine boots",
        )
    for unsafe in facts.kernel_unsafe:
        add("unsafe-override", Severity.CRITICAL, f"UNSAFE kernel setting in force: {unsafe}")
    for domain in facts.thunderbolt_domains:
        if domain.security == "none":
            add(
                "thunderbolt-no-security",
                Severity.WARNING,
                f"Thunderbolt {domain.name}: security level none: every device plugged in is "
                "connected and can DMA at once",
            )
        elif domain.security:
            add(
                "thunderbolt-security",
                Severity.INFO,
                f"Thunderbolt {domain.name}: security level {domain.security}",
            )
        if domain.iommu_dma_protection is False:
            add(
                "thunderbolt-no-dma-protection",
                Severity.WARNING,
                f"Thunderbolt {domain.name}: iommu_dma_protection is off: devices are not confined "
                "by the IOMMU when they connect",
            )
    pending = [d for d in facts.thunderbolt_devices if d.authorized is False]
    if pending:
        add(
            "thunderbolt-unauthorized",
            Severity.INFO,
            f"{len(pending)} Thunderbolt device(s) connected but not authorised: "
            + ", ".join(f"{d.name} {d.vendor_name} {d.device_name}".strip() for d in pending),
        )
    differ = host.groups_differing
    if differ and facts.topology_complete:
        add(
            "groups-differ",
            Severity.WARNING,
            f"{len(differ)} kernel IOMMU group(s) differ from pciguard's derivation from topology and "
            "ACS (see the groups' notes); the kernel's groups are used",
        )
    if not facts.topology_complete:
        add(
            "derivation-skipped",
            Severity.INFO,
            (
                "the dump hides capabilities (lspci was not run as root, or without -vv)"
                if dump
                else "config space beyond the header could not be read"
            )
            + ", so pciguard's own group derivation was not compared with the kernel's",
        )
    if facts.iommu_switches:
        add(
            "kernel-switches",
            Severity.INFO,
            "IOMMU switches on the kernel command line: " + " ".join(facts.iommu_switches),
        )
    for problem in facts.problems:
        add("malformed-input", Severity.WARNING, f"{problem.path}: {problem.message}")
    return out
