"""Runs inside the lab guest (chrooted into the host's read-only root, with the guest's
own /proc, /sys and /dev): carries out the steps of a plan written by the host and
writes what each gave to ``result.json`` beside the plan.

Ground truth is read here with plain code that shares nothing with pciguard's reader,
so that the host-side tests compare pciguard with the kernel, not with itself.

Devices are named in the plan by where they sit, since bus numbers are the firmware's
choice: ``00:10.0/00.0`` is function 00.0 on the secondary bus of the root port at
0000:00:10.0; each further ``/DD.F`` goes one bridge deeper.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.edu_probe import copy, own_pages, probe, verdict
from lab.machines import HOTPLUG_DONE, HOTPLUG_READY
from lab.nic_probe import probe as nic_probe
from lab.vfio_user import HALF, IOVA, UNMAPPED_IOVA
from lab.xen_probe import probe as xen_probe

SYS_DEVICES = Path("/sys/devices/pci0000:00")
IOMMU_GROUPS = Path("/sys/kernel/iommu_groups")
DMAR = Path("/sys/firmware/acpi/tables/DMAR")
# Where run.sh mounts the interpreter's installation and, in a venv, the venv itself:
# either may sit under a folder only root may enter (pyenv and venvs under /root).
USER_PYTHON_PREFIX = Path("/run/python")
USER_VENV = Path("/run/venv")
DMAR_FLAGS_OFFSET = 37  # after the 36-byte ACPI header and the host address width


def locate(locator: str) -> str | None:
    """The BDF of the function a locator names, or None if nothing is there."""
    first, *rest = locator.split("/")
    here = SYS_DEVICES / f"0000:{first}"
    for step in rest:
        name = re.compile(rf"[0-9a-f]{{4}}:[0-9a-f]{{2}}:{re.escape(step)}")
        below = [p for p in here.iterdir() if name.fullmatch(p.name)]
        if len(below) != 1:
            return None
        here = below[0]
    return here.name if here.exists() else None


def kernel_groups() -> dict[str, Any]:
    groups = {}
    for group in IOMMU_GROUPS.iterdir() if IOMMU_GROUPS.exists() else ():
        kind = group / "type"
        groups[group.name] = {
            "type": kind.read_text().strip() if kind.exists() else None,
            "devices": sorted(d.name for d in (group / "devices").iterdir()),
        }
    return groups


def drivers() -> dict[str, str | None]:
    out = {}
    for device in Path("/sys/bus/pci/devices").iterdir():
        driver = device / "driver"
        out[device.name] = os.readlink(driver).rsplit("/", 1)[-1] if driver.exists() else None
    return out


def dmesg() -> list[str]:
    """The kernel log as it stands, from /dev/kmsg (records, not a rate-limited console)."""
    lines = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode("utf-8", "replace")
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    break
                if exc.errno == errno.EPIPE:  # overwritten while reading: skip ahead
                    continue
                raise
            lines.append(record.split(";", 1)[-1].split("\n", 1)[0])
    finally:
        os.close(fd)
    return lines


def python_as(user: int | None) -> tuple[list[str], Callable[[], None]]:
    """The command and a pre-exec function that run Python as root or as ``user``. An
    ordinary user cannot reach an interpreter under /root (pyenv), nor a venv's link to
    one, so run.sh mounts the installation at ``USER_PYTHON_PREFIX`` (and a venv at
    ``USER_VENV``), and the user runs the real binary from there with its own shared
    library and the venv's packages on the path."""
    if user is None:
        return [sys.executable], lambda: None
    binary = Path(os.path.realpath(sys.executable)).relative_to(os.path.realpath(sys.base_prefix))
    paths = [os.environ.get("PYTHONPATH", "")]
    if sys.prefix != sys.base_prefix:
        import site

        paths += [str(USER_VENV / Path(p).relative_to(sys.prefix)) for p in site.getsitepackages()]
    env = [f"LD_LIBRARY_PATH={USER_PYTHON_PREFIX / 'lib'}", f"PYTHONPATH={':'.join(p for p in paths if p)}"]

    def drop() -> None:
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)

    # Seen in the lab: run from the bound prefix, the frozen ``site`` module looked for
    # dist-packages and missed site-packages.
    return ["/usr/bin/env", *env, str(USER_PYTHON_PREFIX / binary), "-X", "frozen_modules=off"], drop


def pciguard(args: list[str], user: int | None = None) -> dict[str, Any]:
    python, drop = python_as(user)
    done = subprocess.run([*python, "-m", "pciguard", *args], capture_output=True, text=True, preexec_fn=drop)
    result: dict[str, Any] = {"exit": done.returncode, "stderr": done.stderr}
    try:
        result["json"] = json.loads(done.stdout)
    except ValueError:
        result["output"] = done.stdout
    return result


def vfio_session(bdf: str, user: int | None) -> dict[str, Any]:
    """A VM's process (lab.vfio_user, run as ``user``) takes the device's group and maps
    one page at IOVA; the device then copies a pattern within that page, then to a page
    of the host's and to an IOVA nobody mapped; then the process is killed and the
    device probed again."""
    group = Path(os.readlink(Path("/sys/bus/pci/devices") / bdf / "iommu_group")).name
    python, drop = python_as(user)
    vm = subprocess.Popen(
        [*python, "-m", "lab.vfio_user", group],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=drop,
    )
    assert vm.stdin is not None and vm.stdout is not None
    result: dict[str, Any] = {"group": group, "greeting": vm.stdout.readline().strip()}
    if not result["greeting"].startswith("ready"):
        vm.wait()
        return result

    def ask(word: str) -> bytes:
        assert vm.stdin is not None and vm.stdout is not None
        vm.stdin.write(word + "\n")
        vm.stdin.flush()
        return bytes.fromhex(vm.stdout.readline().strip())

    pattern = ask("fill")
    finished, faults = copy(bdf, IOVA, IOVA + HALF, HALF)
    result["into-vm-page"] = verdict(finished, ask("show"), pattern, faults)
    with own_pages(1) as (pages, (host_page,)):
        finished, faults = copy(bdf, IOVA, host_page, HALF)  # a host address is no IOVA of the VM's
        result["into-host-page"] = verdict(finished, pages[:HALF], pattern, faults)
    finished, faults = copy(bdf, IOVA, UNMAPPED_IOVA, HALF)
    result["into-unmapped-iova"] = {"finished": finished, "faults": faults}
    vm.kill()
    vm.wait()
    result["after-the-vm-died"] = vars(probe(bdf))
    return result


def ground_truth() -> dict[str, Any]:
    return {
        "groups": kernel_groups(),
        "drivers": drivers(),
        "interrupts": Path("/proc/interrupts").read_text(),
        "cmdline": Path("/proc/cmdline").read_text().strip(),
        "dmar_flags": DMAR.read_bytes()[DMAR_FLAGS_OFFSET] if DMAR.exists() else None,
        "dmesg": dmesg(),
    }


def unbind(bdf: str) -> dict[str, Any]:
    driver = Path("/sys/bus/pci/devices") / bdf / "driver"
    (driver / "unbind").write_text(bdf)
    return {"driver": None if not driver.exists() else os.readlink(driver)}


def set_group_type(bdf: str, kind: str) -> dict[str, Any]:
    group = Path(os.readlink(Path("/sys/bus/pci/devices") / bdf / "iommu_group")).name
    (IOMMU_GROUPS / group / "type").write_text(kind)
    return {"group": group, "type": (IOMMU_GROUPS / group / "type").read_text().strip()}


class Watcher(threading.Thread):
    """Independent of the guard: polls /sys/bus/pci/devices every ``interval`` seconds
    and notes, for each function that appears, when it appeared and every driver it was
    seen with (milliseconds after it appeared)."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.stopping = interval, threading.Event()
        self.before = set(os.listdir("/sys/bus/pci/devices"))
        self.seen: dict[str, dict[str, Any]] = {}

    def run(self) -> None:
        while not self.stopping.is_set():
            names = set(os.listdir("/sys/bus/pci/devices")) - self.before
            now = time.monotonic()  # after looking: a late look must not seem early
            for name in names:
                entry = self.seen.setdefault(name, {"appeared": now, "drivers": []})
                driver = drivers_of([name]).get(name)
                if not entry["drivers"] or entry["drivers"][-1][1] != driver:
                    entry["drivers"].append((round((now - entry["appeared"]) * 1000, 1), driver))
            time.sleep(self.interval)


def drivers_of(names: list[str]) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = os.readlink(f"/sys/bus/pci/devices/{name}/driver").rsplit("/", 1)[-1]
        except OSError:
            out[name] = None
    return out


def plug_without_guard(step: dict[str, Any], out: Path) -> dict[str, Any]:
    """With drivers_autoprobe=0 and no guard, have the host plug a device in, and see
    which driver it gets within five seconds."""
    autoprobe = Path("/sys/bus/pci/drivers_autoprobe")
    autoprobe.write_text("0")
    try:
        (out / f"{HOTPLUG_READY}-{step['round']}").write_text("ready\n")
        deadline = time.monotonic() + 120
        while (bdf := locate(step["expect"])) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        appeared = time.monotonic()
        driver = None
        while bdf and driver is None and time.monotonic() < appeared + 5:
            driver = drivers_of([bdf])[bdf]
            time.sleep(0.01)
        return {"bdf": bdf, "autoprobe": autoprobe.read_text().strip(), "driver": driver}
    finally:
        autoprobe.write_text("1")


def control_a_present_nic(bdf: str, sock: Path) -> dict[str, Any]:
    """Through the guard's socket, with its own CLI: quarantine a NIC the host was using
    (then probe its DMA), and give it back."""
    ran: dict[str, Any] = {"bdf": bdf}
    for target in ("quarantine", "allow"):
        done = subprocess.run(
            [sys.executable, "-m", "pciguard", "guard", target, bdf, "--socket", str(sock)],
            capture_output=True, text=True,
        )  # fmt: skip
        ran[target] = {"exit": done.returncode, "output": done.stdout + done.stderr}
        ran[target]["driver"] = drivers_of([bdf])[bdf]
        if target == "quarantine":
            ran[target]["probe"] = vars(nic_probe(bdf))
    return ran


def guard_hotplug(step: dict[str, Any], out: Path) -> dict[str, Any]:
    """Start ``pciguard guard`` with the step's policy, tell the host to plug its devices
    in, wait for the guard's decisions, probe the edu's DMA, stop the guard."""
    from pciguard.platforms.linux.guard import request
    from pciguard.platforms.linux.journal import Journal

    state = Path("/run/pciguard")
    state.mkdir(mode=0o700, exist_ok=True)
    policy, sock, log_path = state / "policy.rules", state / "guard.sock", state / "guard.log"
    policy.write_text(step["policy"])
    autoprobe = Path("/sys/bus/pci/drivers_autoprobe")
    result: dict[str, Any] = {"autoprobe-before": autoprobe.read_text().strip()}
    with open(log_path, "w") as log:
        guard = subprocess.Popen(
            [sys.executable, "-m", "pciguard", "guard", "--policy", str(policy), "--state-dir", str(state),
             "--socket", str(sock)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not sock.exists() and guard.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        result["autoprobe-while-running"] = autoprobe.read_text().strip()
        watcher = Watcher()
        watcher.start()
        (out / f"{HOTPLUG_READY}-{step['round']}").write_text("ready\n")
        expected: dict[str, str] = step["expect"]  # devices that stay, by locator
        plugged = len(expected) + step.get("rejected", 0)  # and those the policy removes
        decided: dict[str, Any] = {}
        while time.monotonic() < deadline and guard.poll() is None:
            devices = {name: locate(where) for name, where in expected.items()}
            listed = next(request(sock, {"op": "list"}))["devices"]
            decided = {d["device"]: d for d in listed if d["source"] == "hotplug"}
            if all(devices.values()) and len(decided) == plugged:
                break
            time.sleep(0.2)
        time.sleep(0.5)  # let the watcher see the drivers settle
        watcher.stopping.set()
        watcher.join()
        result["devices"] = devices
        result["decisions"] = decided
        result["watched"] = {bdf: watcher.seen.get(bdf) for bdf in decided}
        result["drivers"] = drivers_of([b for b in devices.values() if b])
        result["listed-after"] = sorted(os.listdir("/sys/bus/pci/devices"))
        for name, bdf in devices.items():
            if bdf and step.get("probe", {}).get(name) == "edu":
                result[f"probe-{name}"] = vars(probe(bdf))
            elif bdf and step.get("probe", {}).get(name) == "xen-edu":
                result[f"probe-{name}"] = vars(xen_probe(bdf))
            elif bdf and step.get("probe", {}).get(name) == "nic":
                result[f"probe-{name}"] = vars(nic_probe(bdf))
        if (present := locate(step.get("control", ""))) is not None:
            result["control"] = control_a_present_nic(present, sock)
    finally:
        guard.send_signal(signal.SIGTERM)
        result["guard-exit"] = guard.wait(60)
        result["autoprobe-after"] = autoprobe.read_text().strip()
        result["guard-log"] = log_path.read_text()
        done = out / f"{HOTPLUG_DONE}-{step['round']}"
        result["monitor"] = done.read_text() if done.exists() else None
    result["journaled"] = [json.loads(d) for _, d in Journal(state).decisions()]
    return result


def xl(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=120)
    return {"exit": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def pciback_seize(bdf: str) -> dict[str, Any]:
    """What ``xen-pciback.hide=`` does at boot: pciback's slot list names the device and
    pciback binds it (Xen is not asked to move it anywhere)."""
    pciback = Path("/sys/bus/pci/drivers/pciback")
    (pciback / "new_slot").write_text(bdf)
    (pciback / "bind").write_text(bdf)
    return {"driver": drivers_of([bdf])[bdf]}


def xl_create(step: dict[str, Any], kernel: str) -> dict[str, Any]:
    """A PV domain from ``step["config"]`` (``{kernel}``: the lab's kernel), created
    paused: built, with its memory and IOMMU context, but never run; ``-e``: no xl
    left behind to wait for its death."""
    config = Path("/run") / f"{step['name']}.cfg"
    config.write_text(step["config"].format(kernel=kernel))
    return xl(["create", "-p", "-e", str(config)])


def run(plan_path: Path) -> dict[str, Any]:
    plan = json.loads(plan_path.read_text())
    out = plan_path.parent
    devices = {name: locate(locator) for name, locator in plan["devices"].items()}
    results: dict[str, Any] = {"devices": devices, "steps": {}, "errors": {}}
    actions: dict[str, Callable[[dict[str, Any]], Any]] = {
        "truth": lambda step: ground_truth(),
        "audit": lambda step: pciguard(["audit", "--json", *step.get("args", [])], step.get("user")),
        "audit-table": lambda step: pciguard(["audit"]),
        "pciguard": lambda step: pciguard([arg.format(**devices) for arg in step["args"]]),
        "vfio-session": lambda step: vfio_session(devices[step["device"]] or "absent", step.get("user")),
        "snapshot": lambda step: pciguard(["snapshot", str(out / f"{step['name']}.tar.gz")]),
        "probe": lambda step: vars(probe(devices[step["device"]] or "absent")),
        "nic-probe": lambda step: vars(nic_probe(devices[step["device"]] or "absent")),
        "unbind": lambda step: unbind(devices[step["device"]] or "absent"),
        "group-type": lambda step: set_group_type(devices[step["device"]] or "absent", step["type"]),
        "plug-without-guard": lambda step: plug_without_guard(step, out),
        "guard-hotplug": lambda step: guard_hotplug(step, out),
        "xl": lambda step: xl([arg.format(**devices) for arg in step["args"]]),
        "xl-create": lambda step: xl_create(step, plan["kernel"]),
        "pciback-seize": lambda step: pciback_seize(devices[step["device"]] or "absent"),
        "xen-probe": lambda step: vars(
            xen_probe(devices[step["device"]] or "absent", step.get("domain"), step.get("towards", "dom0"))
        ),
    }
    for step in plan["steps"]:
        try:
            results["steps"][step["name"]] = actions[step["do"]](step)
        except Exception:
            results["errors"][step["name"]] = traceback.format_exc()
    return results


if __name__ == "__main__":
    plan_file = Path(sys.argv[1])
    outcome = run(plan_file)
    (plan_file.parent / "result.json").write_text(json.dumps(outcome, indent=1))
