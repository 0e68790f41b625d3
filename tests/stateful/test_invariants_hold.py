"""Property tests: over random topologies and random sequences of operations, faults,
crashes and hot-plugs (decided by the built-in policy or by random rules), every
invariant holds after every platform call and every ledger move, and the platform
never catches the toolstack misusing it."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pciguard.checks import Options, RmrrPolicy
from pciguard.errors import PlatformMisuse, RefusedError, StepFailed
from pciguard.formats.platform_file import build_host
from pciguard.model import Bdf, Host
from pciguard.platforms.base import DEVICE_STEPS, DomainState
from pciguard.platforms.sim import SimPlatform
from pciguard.toolstack import Toolstack
from pciguard.verify.invariants import check_all
from strategies import platform_file, policies

FAULTABLE = [call for call in DEVICE_STEPS if call != "remove"]  # remove: the toolstack's last resort


def random_host(data: dict[str, Any]) -> Host:
    return build_host(data, {}, "<random>")


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=platform_file(), data=st.data())
def test_invariants_hold_after_every_step_in_secure_mode(spec: dict[str, Any], data: st.DataObject) -> None:
    host = random_host(spec)
    options = Options(
        allow_unsafe_interrupts=data.draw(st.booleans(), label="allow_unsafe_interrupts"),
        rmrr=data.draw(st.sampled_from(list(RmrrPolicy)), label="rmrr"),
    )
    platform = SimPlatform(host, quarantine_mode=data.draw(st.sampled_from(["block", "scratch"])))
    policy = data.draw(st.none() | policies(), label="hot-plug policy (None: the built-in)")
    toolstack = Toolstack(platform, options, policy)
    violations: list[str] = []

    def watch(*_: object) -> None:
        violations.extend(str(v) for v in check_all(toolstack, platform))
        assert not violations, violations

    platform.observers.append(watch)
    toolstack.observers.append(watch)
    vms = ["vm1", "vm2"]
    for vm in vms:
        toolstack.create_vm(vm)
    for flaky in (b for b, f in host.topology.items() if f.reset_may_fail):  # fail when drawn
        platform.inject(
            "reset", flaky, skip=data.draw(st.integers(0, 3)), times=data.draw(st.sampled_from([1, None]))
        )
    devices = sorted(host.topology)
    device = st.sampled_from(devices)
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        op = data.draw(
            st.sampled_from(
                [
                    "make-assignable",
                    "make-unassignable",
                    "assign",
                    "assign",
                    "release",
                    "recover",
                    "destroy",
                    "crash",
                    "hotplug",
                    "unplug",
                    "fault",
                ]
            ),
            label="op",
        )
        try:
            run_op(op, data, platform, toolstack, device, vms)
        except (RefusedError, StepFailed):
            pass  # refusals and unwound failures are fine; the invariants are what count
        except PlatformMisuse as exc:
            raise AssertionError(f"the toolstack misused the platform: {exc}") from exc
        watch()


def run_op(
    op: str,
    data: st.DataObject,
    platform: SimPlatform,
    toolstack: Toolstack,
    device: st.SearchStrategy[Bdf],
    vms: list[str],
) -> None:
    dev = data.draw(device, label="device")
    running = [v for v in vms if platform.domains()[v].state is DomainState.RUNNING]
    if op == "make-assignable":
        toolstack.make_assignable(dev, with_group=data.draw(st.booleans(), label="with_group"))
    elif op == "make-unassignable":
        toolstack.make_unassignable(dev)
    elif op == "assign" and vms:
        toolstack.assign(dev, data.draw(st.sampled_from(vms), label="vm"))
    elif op == "release":
        toolstack.release(dev)
    elif op == "recover":
        toolstack.recover(dev)
    elif op in ("destroy", "crash") and running:
        vm = data.draw(st.sampled_from(running), label="vm")
        if op == "crash":
            platform.crash_domain(vm)
            toolstack.vm_crashed(vm)
        else:
            toolstack.destroy_vm(vm)
        if platform.domains()[vm].state is DomainState.DESTROYED:
            vms.remove(vm)
            fresh = f"vm{len(platform.domains())}"
            toolstack.create_vm(fresh)
            vms.append(fresh)
    elif op == "hotplug" and not platform.present(dev) and dev in platform.host.hotplug_later:
        if platform.host.topology[dev].parent is None or platform.present(platform.host.topology[dev].parent):  # type: ignore[arg-type]
            platform.plug(dev)
            toolstack.hotplug(dev)
    elif op == "unplug" and platform.present(dev) and not platform.host.topology.children.get(dev):
        toolstack.device_unplugged(dev)
        platform.unplug(dev)
    elif op == "fault":
        call = data.draw(st.sampled_from(FAULTABLE), label="call")
        times = data.draw(st.sampled_from([1, 2, None]), label="times")
        platform.inject(call, dev, skip=data.draw(st.integers(0, 2), label="skip"), times=times)
