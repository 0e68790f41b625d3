"""The kernel's answers to sysfs writes, on a fake tree rendered by ``fakesys``.

``prepare(root, host)`` adds the files pciguard writes (``bind``/``unbind`` of every
driver, ``drivers_probe``, each device's ``reset`` and ``remove``) and remembers which
driver would claim each device if probed; inside ``installed(root)``, ``Fs.write`` acts
as the kernel would: unbinding drops the ``driver`` link, ``drivers_probe`` binds the
``driver_override`` (or the device's own driver), ``bind`` binds. With ``kill_at=N``
the process kills itself (SIGKILL) just before its N-th write (or hand-over of a
``/dev/vfio`` node): a crash at that point (``crash_before`` moves that point later).
Each write's call stack is kept in ``WRITERS``, for the test that only the modules
allowed to write to a host do.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pciguard.model import Host
from pciguard.platforms.linux.sysfs import Fs

STATE = "fakekernel.json"  # per tree: device -> the driver a probe without override binds
UNPLUGGED = "unplugged.json"  # links of devices taken off the bus, to plug them back
CLAIM = "vfio-claims-all"  # present while vfio-pci carries the catch-all dynamic ID
VFIO_PCI = "vfio-pci"
PCIBACK_SLOTS = "sys/bus/pci/drivers/pciback/slots"  # xen-pciback's slot list, one pattern a line
WRITERS: list[tuple[str, str, traceback.StackSummary]] = []  # (path, value, the writer's stack)
_KILL_AT = [0]  # the write to crash before, counted from the start of ``installed``


def with_pciback(root: Path) -> None:
    """xen-pciback loaded (a dom0's): its driver folder with an empty slot list."""
    folder = root / "sys/bus/pci/drivers/pciback"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("bind", "unbind", "new_slot", "remove_slot", "slots"):
        (folder / name).write_text("")


def prepare(root: Path, host: Host, vfio_loaded: bool = True) -> None:
    pci = root / "sys/bus/pci"
    (pci / "drivers_probe").write_text("")
    (pci / "drivers_autoprobe").write_text("1\n")
    natural = {str(b): f.driver for b, f in host.topology.items() if f.driver}
    for driver in {*natural.values(), *([VFIO_PCI] if vfio_loaded else [])}:
        folder = pci / "drivers" / driver
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("bind", "unbind", "new_id", "remove_id"):
            (folder / name).write_text("")
    for bdf in host.topology:
        for name in ("reset", "remove"):
            (pci / "devices" / str(bdf) / name).write_text("")
    (root / STATE).write_text(json.dumps(natural))


def driver_of(root: Path, bdf: str) -> str | None:
    link = root / "sys/bus/pci/devices" / bdf / "driver"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


def _bind(root: Path, bdf: str, driver: str) -> None:
    folder = root / "sys/bus/pci/drivers" / driver
    link = root / "sys/bus/pci/devices" / bdf / "driver"
    if folder.is_dir() and not link.is_symlink():
        os.symlink(os.path.relpath(folder, link.resolve().parent), link)
        group = root / "sys/bus/pci/devices" / bdf / "iommu_group"
        if driver == VFIO_PCI and group.is_symlink():  # vfio-pci makes the group's node
            node = root / "dev/vfio" / os.readlink(group).rsplit("/", 1)[-1]
            node.parent.mkdir(parents=True, exist_ok=True)
            node.touch(mode=0o600, exist_ok=True)


def emulate(root: Path, rel: str, value: str) -> None:
    parts, value = rel.split("/"), value.strip()
    devices = root / "sys/bus/pci/devices"
    if parts[-1] == "unbind":
        bdf = value
        if parts[-2] == "driver" or driver_of(root, bdf) == parts[-2]:
            (devices / bdf / "driver").unlink(missing_ok=True)
    elif parts[-1] == "bind":
        if not _matches(root, value, parts[-2]):
            raise OSError(errno.ENODEV, "No such device")  # the driver's ID table does not match
        _bind(root, value, parts[-2])
    elif parts[-1] == "driver_override":
        (root / rel).write_text((value or "(null)") + "\n")
    elif parts[-1] == "remove" and value == "1":
        unplug(root, parts[-2])
    elif parts[-1] == "drivers_probe":
        probe(root, value)
    elif parts[-2:] == [VFIO_PCI, "new_id"] and value.startswith("ffffffff ffffffff"):
        (root / CLAIM).touch()  # the catch-all ID: and the driver is offered every unbound device
        for link in devices.iterdir():
            if driver_of(root, link.name) is None:
                probe(root, link.name)
    elif parts[-2:] == [VFIO_PCI, "remove_id"] and value.startswith("ffffffff ffffffff"):
        (root / CLAIM).unlink(missing_ok=True)
    elif parts[-2:] == ["pciback", "new_slot"]:
        (root / PCIBACK_SLOTS).write_text("".join(f"{slot}\n" for slot in [*_slots(root), value]))
    elif parts[-2:] == ["pciback", "remove_slot"]:  # every slot the pattern covers goes
        kept = [slot for slot in _slots(root) if not _slot_matches(value, slot.replace("*", "0"))]
        (root / PCIBACK_SLOTS).write_text("".join(f"{slot}\n" for slot in kept))


def _matches(root: Path, bdf: str, driver: str) -> bool:
    """Would ``driver`` match the device (its override, its ID table, a dynamic ID)?"""
    override = (root / "sys/bus/pci/devices" / bdf / "driver_override").read_text().strip()
    if override != "(null)":
        return override == driver
    natural = json.loads((root / STATE).read_text()).get(bdf)
    if driver == "pciback":
        return any(_slot_matches(slot, bdf) for slot in _slots(root))
    return driver == natural or (driver == VFIO_PCI and (root / CLAIM).exists())


def probe(root: Path, bdf: str) -> None:
    """Offer an unbound device to the drivers, as the kernel does at enumeration (whatever
    drivers_autoprobe says) and on drivers_probe: its driver_override alone if it has one
    (none matches a name no driver has), else vfio-pci first while it carries the
    catch-all ID (it registered first and refuses bridges), else its own driver."""
    device = root / "sys/bus/pci/devices" / bdf
    override = (device / "driver_override").read_text().strip()
    bridge = (device / "class").read_text().strip().startswith("0x0604")
    if override != "(null)":
        chosen: str | None = override
    elif (root / CLAIM).exists() and not bridge:
        chosen = VFIO_PCI
    elif not bridge and any(_slot_matches(slot, bdf) for slot in _slots(root)):
        chosen = "pciback"  # registered before the host drivers; seizes what its slots list
    else:
        chosen = json.loads((root / STATE).read_text()).get(bdf)
    if chosen:
        _bind(root, bdf, chosen)


def _slots(root: Path) -> list[str]:
    listed = root / PCIBACK_SLOTS
    return listed.read_text().split() if listed.exists() else []


def _slot_matches(pattern: str, bdf: str) -> bool:
    """xen-pciback's slot patterns: DDDD:BB:SS.F, with * for the slot and function."""
    wanted, found = (text.replace(".", ":").split(":") for text in (pattern, bdf))
    return all(want in ("*", have) for want, have in zip(wanted, found, strict=True))


def _below(root: Path, bdf: str) -> list[str]:
    """``bdf`` and the functions below it, parents first (as the kernel announces them)."""
    devices = root / "sys/bus/pci/devices"
    top = (devices / bdf).resolve()
    found = [link.name for link in devices.iterdir() if link.resolve().is_relative_to(top)]
    return sorted(found, key=lambda name: len((devices / name).resolve().parts))


def unplug(root: Path, bdf: str) -> list[str]:
    """Take ``bdf`` and everything below it off the (fake) bus: gone from
    /sys/bus/pci/devices and from its IOMMU group, its driver unbound. The links are
    remembered so that ``plug`` can bring each back. Returns what went, parents first."""
    gone = _below(root, bdf)
    devices = root / "sys/bus/pci/devices"
    stash = root / UNPLUGGED
    kept = json.loads(stash.read_text()) if stash.exists() else {}
    for name in gone:
        path = (devices / name).resolve()
        (path / "driver").unlink(missing_ok=True)
        links = [devices / name]
        if (path / "iommu_group").is_symlink():
            links.append((path / "iommu_group").resolve() / "devices" / name)
        kept[name] = [(str(link), os.readlink(link)) for link in links]
        for link in links:
            link.unlink()
    stash.write_text(json.dumps(kept))
    return gone


def plug(root: Path, bdf: str) -> None:
    """The kernel finds ``bdf`` again (after ``unplug``): listed, in its group, and
    offered to the drivers already loaded (the lab shows Linux does so even with
    drivers_autoprobe=0)."""
    stash = root / UNPLUGGED
    kept = json.loads(stash.read_text())
    for link, target in kept.pop(bdf):
        os.symlink(target, link)
    stash.write_text(json.dumps(kept))
    (root / "sys/bus/pci/devices" / bdf / "driver_override").write_text("(null)\n")
    probe(root, bdf)


def command(writes: list[tuple[str, str]], argv: tuple[str, ...]) -> None:
    """A command that changes the host (Xen's ``xl``), counted with the writes: a crash
    may come just before it."""
    if len(writes) + 1 == _KILL_AT[0]:
        os.kill(os.getpid(), signal.SIGKILL)
    writes.append((argv[0], " ".join(argv[1:])))


def crash_before(writes: list[tuple[str, str]], more: int) -> None:
    """Inside ``installed``: crash just before the ``more``-th write from now."""
    _KILL_AT[0] = len(writes) + more


@contextmanager
def installed(root: Path, kill_at: int = 0) -> Iterator[list[tuple[str, str]]]:
    """Emulate the kernel's answers while inside; yields the writes made, in order."""
    original_write, original_hand_over = Fs.write, Fs.hand_over
    writes: list[tuple[str, str]] = []
    _KILL_AT[0] = kill_at

    def crash_here(rel: str, value: str) -> None:
        if len(writes) + 1 == _KILL_AT[0]:
            os.kill(os.getpid(), signal.SIGKILL)
        writes.append((rel, value))
        WRITERS.append((rel, value, traceback.extract_stack()[:-2]))

    def write(fs: Fs, rel: str, text: str) -> None:
        crash_here(rel, text)
        original_write(fs, rel, text)
        emulate(Path(fs.root), rel, text)

    def hand_over(fs: Fs, rel: str, uid: int) -> None:
        crash_here(rel, f"owner {uid}")
        original_hand_over(fs, rel, uid)

    Fs.write, Fs.hand_over = write, hand_over  # type: ignore[method-assign]
    try:
        yield writes
    finally:
        Fs.write, Fs.hand_over = original_write, original_hand_over  # type: ignore[method-assign]
