"""The toolstack as it was before each historic fix: the secure toolstack with the
checks a flaw skipped left out and the steps it took put back. Each override names
the flaws it serves; the secure code in ``pciguard.toolstack`` knows none of them."""

from __future__ import annotations

from dataclasses import replace

from pciguard.checks import (
    GROUP_SIBLING,
    MSI_NOT_ISOLATED,
    RESERVED_REGION,
    SHARED_RESOURCE,
    Options,
    Reason,
    device_reasons,
)
from pciguard.errors import StepFailed
from pciguard.legacy.flaws import Flaw
from pciguard.model import Bdf, ReservedRegion
from pciguard.model.ownership import State
from pciguard.platforms.base import HOST, QUARANTINE, Platform
from pciguard.policy import Decision, HotplugPolicy, Target
from pciguard.toolstack import DeviceRecord, Plan, Step, Toolstack, Unsafe

CHECK_PRECONDITIONS = "check_preconditions"  # XSA-61: the checks, run as a step after exposure
# The reasons each flaw's toolstack never gave.
_UNCHECKED = {
    Flaw.LATE_IOMMU_CONTEXT: "vm-no-iommu-context",
    Flaw.NO_GROUP_CHECK: GROUP_SIBLING,
    Flaw.XSA_461: SHARED_RESOURCE,
    Flaw.NO_MSI_CHECK: MSI_NOT_ISOLATED,
}


def make_toolstack(platform: Platform, options: Options, policy: HotplugPolicy | None = None) -> Toolstack:
    """The secure toolstack, or the legacy one when ``options`` select flaws."""
    if options.flaws:
        return LegacyToolstack(platform, options, policy)
    return Toolstack(platform, options, policy)


class LegacyToolstack(Toolstack):
    def __init__(self, platform: Platform, options: Options, policy: HotplugPolicy | None = None) -> None:
        self.flaws = options.flaws
        super().__init__(platform, options, policy)

    # -- checks it did not make ------------------------------------------------------
    def preconditions(self, bdf: Bdf, vm: str, *, claimed: bool = False) -> list[Reason]:
        skipped = {code for flaw, code in _UNCHECKED.items() if flaw in self.flaws}
        reasons = [r for r in super().preconditions(bdf, vm, claimed=claimed) if r.code not in skipped]
        if Flaw.RMRR_EQUAL_ONLY in self.flaws:  # a region counted as shared only when equal
            equal_only = device_reasons(self.host, bdf, self.options, shares=_same_range)
            reasons = [r for r in reasons if r.code != RESERVED_REGION]
            reasons += [r for r in equal_only if r.code == RESERVED_REGION]
        return reasons

    def _check_quarantine_blocks(self, members: list[Bdf]) -> None:
        if Flaw.XSA_61 not in self.flaws:  # it checked for an IOMMU nowhere before exposure
            super()._check_quarantine_blocks(members)

    def isolation_unit(self, bdf: Bdf) -> list[Bdf]:
        if Flaw.XSA_461 in self.flaws:  # Xen knew groups (at best), never shared pages or lines
            return list(self.host.group_of(bdf).members)
        return super().isolation_unit(bdf)

    def _unsafe_interrupts(self, device: Bdf, vm: str) -> list[Unsafe]:
        return [] if Flaw.NO_MSI_CHECK in self.flaws else super()._unsafe_interrupts(device, vm)

    # -- plans it made ---------------------------------------------------------------
    def assign(self, bdf: Bdf, vm: str) -> Plan:
        if Flaw.XSA_306 in self.flaws and self.record(bdf).state is State.HOST:
            self.execute(self.plan("assign", bdf, vm))  # the path that skips quarantine
        return super().assign(bdf, vm)

    def plan(
        self, operation: str, device: Bdf | None = None, vm: str | None = None, *, with_group: bool = True
    ) -> Plan:
        if operation == "assign" and device is not None and self._unprepared(device):
            return replace(self.plan_make_assignable(device, with_group=False), prepared=False)
        return super().plan(operation, device, vm, with_group=with_group)

    def _unprepared(self, device: Bdf) -> bool:
        """XSA-306: assigning a device straight from the host, never made assignable."""
        return Flaw.XSA_306 in self.flaws and self.record(device).state is State.HOST

    def plan_assign(self, bdf: Bdf, vm: str) -> Plan:
        if Flaw.XSA_61 not in self.flaws:
            plan = super().plan_assign(bdf, vm)
        else:  # the guest gets the devices first, the checks after
            plan = self._assign_plan(self.moves_with(bdf), vm)
            exposed = tuple(s for s in plan.steps if s.call == "expose")
            checks = tuple(Step(CHECK_PRECONDITIONS, d, vm) for d in plan.devices)
            rest = tuple(s for s in plan.steps if s.call != "expose")
            plan = replace(plan, steps=(*exposed, *checks, *rest))
        if Flaw.LATE_IOMMU_CONTEXT in self.flaws and not self.platform.domains()[vm].iommu_context:
            # Before the device steps (after the exposure XSA-61 already made).
            at = 2 * len(plan.devices) if Flaw.XSA_61 in self.flaws else 0
            late = Step("enable_iommu_context", None, vm)
            plan = replace(plan, steps=(*plan.steps[:at], late, *plan.steps[at:]))
        return plan

    def plan_teardown(self, vm: str) -> Plan:
        plan = super().plan_teardown(vm)
        if Flaw.TEARDOWN_RUNNING in self.flaws:  # the VM ran on while its devices were taken
            plan = replace(plan, steps=tuple(s for s in plan.steps if s.call != "crash_domain"))
        return plan

    def _release_steps(self, bdf: Bdf, rec: DeviceRecord) -> list[Step]:
        if Flaw.XSA_302 in self.flaws or (Flaw.XSA_306 in self.flaws and not rec.prepared):
            # Straight back to the host driver.
            steps = [Step("unexpose", bdf, rec.exposed)] if rec.exposed else []
            steps += [Step("route_msi", bdf, HOST), Step("attach", bdf, HOST), *self._flush(bdf)]
            steps += [Step("unmap_reserved", bdf, d) for d in sorted(rec.reserved)]
            return [*steps, Step("bind_host_driver", bdf)]
        return super()._release_steps(bdf, rec)

    def _hotplug_decision(self, bdf: Bdf, decision: Decision) -> Decision:
        decision = super()._hotplug_decision(bdf, decision)
        bridge = self.host.topology[bdf].kind.is_bridge
        if Flaw.HOTPLUG_TO_HOST in self.flaws or (Flaw.TRUSTED_BRIDGES in self.flaws and bridge):
            return Decision(Target.ALLOW, "legacy: hand new devices to the host", False)
        return decision

    def _flush(self, bdf: Bdf) -> list[Step]:
        return [] if Flaw.XSA_442 in self.flaws else super()._flush(bdf)

    def _unmap_reserved(self, bdf: Bdf, rec: DeviceRecord) -> list[Step]:
        return [] if Flaw.XSA_378 in self.flaws else super()._unmap_reserved(bdf, rec)

    def _repoint_to_quarantine(self, bdf: Bdf, rec: DeviceRecord) -> list[Step]:
        if Flaw.XSA_400 not in self.flaws:
            return super()._repoint_to_quarantine(bdf, rec)
        # Not atomic: through the host's domain on the way.
        via_host = [Step("attach", bdf, HOST)] if rec.context not in (HOST, QUARANTINE) else []
        return [*via_host, Step("attach", bdf, QUARANTINE)]

    # -- how it ran them ---------------------------------------------------------------
    def _run(self, step: Step) -> list[Step]:
        if step.call == CHECK_PRECONDITIONS:
            assert step.device is not None and step.domain is not None
            reasons = self.preconditions(step.device, step.domain, claimed=True)
            if reasons:
                raise StepFailed("late check", "; ".join(r.message for r in reasons))
            return []
        if step.call == "reset" and Flaw.RESET_IGNORED in self.flaws:
            assert step.device is not None
            try:
                self.platform.reset(step.device)
            except StepFailed as exc:  # libxl logs a failed reset and carries on
                self.notes.append(f"reset of {step.device} failed, ignored: {exc}")
            return []
        undo = super()._run(step)
        if Flaw.XSA_442 in self.flaws and step.device is not None:
            # That toolstack neither tracked nor flushed the IOTLB.
            self.ledger[step.device].stale.clear()
            return [u for u in undo if u.call != "flush_iotlb"]
        return undo


def _same_range(region: ReservedRegion, theirs: ReservedRegion) -> bool:
    return (region.start, region.end) == (theirs.start, theirs.end)
