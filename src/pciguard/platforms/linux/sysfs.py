"""Read a Linux host: sysfs, /proc and the ACPI IOMMU tables. The only code that
touches /sys.

``read_host(root)`` reads under ``root`` ("/" on a live host; tests point it at a fake
tree, ``pciguard audit --snapshot`` at an unpacked snapshot). Nothing here raises on
bad input: unreadable files become ``Unreadable`` entries (with what they hide) and
malformed ones ``InputProblem`` entries naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from pciguard.errors import TopologyError
from pciguard.model import (
    Arch,
    Bar,
    Bdf,
    DomainType,
    Feature,
    Function,
    Host,
    IommuGroup,
    IommuUnit,
    Kind,
    MsiController,
    ReservedRegion,
    Topology,
)
from pciguard.model.groups import TRANSLATING_TYPES
from pciguard.model.kernel import (
    PCIBACK,
    VFIO_PCI,
    InputProblem,
    KernelFacts,
    ThunderboltDevice,
    ThunderboltDomain,
    Unreadable,
    printable,
)
from pciguard.model.pci import ancestors
from pciguard.platforms.linux.acpi import (
    DeviceScope,
    Dmar,
    DmarFlags,
    Ivrs,
    MalformedTable,
    ScopeType,
    parse_dmar,
    parse_ivrs,
)
from pciguard.platforms.linux.config import ConfigSpace, parse_config, reset_methods_from_config

PCI_DEVICES = "sys/bus/pci/devices"
PCI_DRIVERS = "sys/bus/pci/drivers"
DRIVERS_PROBE = "sys/bus/pci/drivers_probe"
AUTOPROBE = "sys/bus/pci/drivers_autoprobe"
VFIO_NODES = "dev/vfio"  # a group N's node is dev/vfio/N
VFIO_DRIVER = f"{PCI_DRIVERS}/{VFIO_PCI}"
CATCH_ALL = "ffffffff ffffffff ffffffff ffffffff 0 0 0"  # a new_id for any vendor, device, subsystem
CATCH_ALL_KEY = "ffffffff ffffffff"  # how remove_id names it
HOLD = "pciguard-hold"  # a driver_override no driver has: matches nothing
PCIBACK_DRIVER = f"{PCI_DRIVERS}/{PCIBACK}"
PCIBACK_MODULE = "xen_pciback"
IOMMU_GROUPS = "sys/kernel/iommu_groups"
IOMMU_CLASS = "sys/class/iommu"
ACPI_TABLES = "sys/firmware/acpi/tables"
THUNDERBOLT = "sys/bus/thunderbolt/devices"
UNSAFE_PARAMETERS = {
    "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts": (
        "vfio_iommu_type1 allow_unsafe_interrupts=Y: VFIO assigns devices without interrupt isolation"
    ),
    "sys/module/iommufd/parameters/allow_unsafe_interrupts": (
        "iommufd allow_unsafe_interrupts=Y: devices are assigned without interrupt isolation"
    ),
    "sys/module/vfio/parameters/enable_unsafe_noiommu_mode": (
        "vfio enable_unsafe_noiommu_mode=Y: user space may drive DMA with no IOMMU at all"
    ),
}
IOMMU_SWITCHES = re.compile(
    r"^(intel_iommu|amd_iommu|amd_iommu_intr|iommu|iommu\.\w+|intremap|nointremap|"
    r"vfio_iommu_type1\.\w+|vfio\.\w+|iommufd\.\w+|vfio-pci\.\w+|vfio_pci\.\w+|pcie_acs_override|"
    r"pci|efi|thunderbolt\.\w+|intel_iommu\.\w+)(=|$)"
)
# Chips in /proc/interrupts whose names say interrupts pass through remapping.
IR_CHIP = re.compile(r"\bIR-[A-Z]|\b(?:INTEL|AMD)-IR\b|\bAMD-IR-")
PLAIN_CHIP = re.compile(r"\b(?:IO-APIC|PCI-MSI|PCI-MSIX)")
CONSOLE_GPU = "the console GPU (boot_vga)"
_BDF_NAME = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_GROUP_NAME = re.compile(r"^[0-9]{1,9}$")
_HEX_ADDRESS = re.compile(r"^(?:0x)?[0-9a-fA-F]{1,16}$")  # a 64-bit address
_ROOT_BUS_NAME = re.compile(r"^pci[0-9a-f]{4,8}:[0-9a-f]{2}$")
HIDES_CONFIG = (
    "PCIe port types, ACS, FLR, phantom functions and SR-IOV: pciguard's own group "
    "derivation is a guess (the kernel's groups still hold); run as root"
)
HIDES_DMAR = (
    "firmware IOMMU flags (interrupt remapping support, pre-boot DMA protection) and "
    "firmware 1:1 regions (RMRR) with the devices they name; run as root"
)


class NotSafeToRead(OSError):
    """A file the reader refuses: not a regular file, larger than the kernel ever makes
    it, or a path whose links go round in circles. ``strerror`` says which."""


# The most the kernel ever puts in a file pciguard reads. sysfs text attributes are a
# page (64 KiB pages on some arm64 kernels); config space is 4 KiB; ACPI tables and
# /proc files of very large machines are bigger.
LARGEST_ATTRIBUTE = 64 << 10
STANDARD_BARS = 6  # the first lines of a function's ``resource`` file
IORESOURCE_MEM = 0x200  # include/linux/ioport.h
_UNASSIGNED_RESOURCE = " ".join(["0x0000000000000000"] * 3)  # a `resource` line for an unused BAR
_CHUNK = 64 << 10
# O_NONBLOCK: a FIFO must not hold the reader at open (it is refused after).
_READ = os.O_RDONLY | os.O_NONBLOCK
_MAX_LINK_HOPS = 40  # as the kernel's own path walk (ELOOP)
_MAX_DEPTH = 128  # parts of a path; sysfs paths of the deepest PCI trees have some 30


def largest_file(rel: str) -> int:
    """The most bytes the kernel would ever put in the file ``rel``."""
    if rel.endswith("/config"):
        return 4096
    if rel.startswith("proc/"):
        return 16 << 20
    return 1 << 20 if rel.startswith(ACPI_TABLES) else LARGEST_ATTRIBUTE


def _last_part(target: str) -> str:
    """A link target's last part, as it may be shown (a driver's or a group's name)."""
    return printable(target.rstrip("/").rpartition("/")[2])


class Tree:
    """Paths under a root, resolved as if the root were ``/``: a link may point anywhere,
    but ``..`` and absolute targets stop at the root, so nothing outside is ever read.
    Subclasses say what one name is (``_kind``) and where a link points (``_target``).
    ``Directory`` handles are opaque: ``open_dir`` gives them, ``close_dir`` ends them."""

    live = False  # the running host itself (``Fs`` of "/"), whose kernel pciguard may ask

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}  # rel folder -> its path with no link in it

    # -- what a subclass provides ----------------------------------------------------
    def _kind(self, real: str) -> str | None:
        """ "dir", "file", "link", "other", or None when missing (``real`` has no links)."""
        raise NotImplementedError

    def _target(self, real: str) -> str:
        raise NotImplementedError

    def _forget(self) -> None:
        self._folders.clear()

    # -- resolution ------------------------------------------------------------------
    def real(self, rel: str, follow: bool = True) -> str | None:
        """``rel`` with every link in it resolved under the root ("" for the root itself);
        the last component is left a link unless ``follow``. None when a part is missing
        or a folder in the way is not one. Raises NotSafeToRead on a link loop."""
        return self._resolve(rel, follow, 0)[0]

    def _resolve(self, rel: str, follow: bool, hops: int) -> tuple[str | None, str | None]:
        """(real path, what is there: see ``_kind``)."""
        if rel.count("/") > _MAX_DEPTH:  # a link may carry thousands of "a/": not sysfs
            raise NotSafeToRead(errno.ENAMETOOLONG, f"a path of more than {_MAX_DEPTH} parts", rel[:200])
        parent, _, name = rel.strip("/").rpartition("/")
        base = self._folder(parent, hops)
        if base is None:
            return None, None
        if name in ("", "."):
            return base, "dir"
        if name == "..":
            return base.rpartition("/")[0], "dir"
        path = f"{base}/{name}" if base else name
        kind = self._kind(path)
        if follow and kind == "link":
            if hops >= _MAX_LINK_HOPS:
                raise NotSafeToRead(errno.ELOOP, "too many levels of symbolic links", rel)
            target = self._target(path)
            return self._resolve(target if target.startswith("/") else f"{base}/{target}", True, hops + 1)
        return (path, kind) if kind is not None else (None, None)

    def _folder(self, rel: str, hops: int) -> str | None:
        if not rel:
            return ""
        if (known := self._folders.get(rel)) is not None:
            return known
        path, kind = self._resolve(rel, True, hops)
        if path is None or kind != "dir":
            return None
        self._folders[rel] = path
        return path

    # -- what the reader uses --------------------------------------------------------
    def link(self, rel: str) -> str | None:
        """Where a symbolic link points, as a path relative to the root (not resolved
        further); None if it is not a link. ``..`` cannot climb out of the root."""
        target = self.readlink(rel)
        if target is None:
            return None
        if target.startswith("/"):
            resolved = os.path.normpath(target)
        else:
            resolved = os.path.normpath(f"/{rel.rpartition('/')[0]}/{target}")
        return resolved.lstrip("/") or None

    def link_name(self, rel: str, directory: object = None) -> str | None:
        """The last component of where a link points (a driver's name, a PF's address).
        ``directory``: an open_dir of rel's folder (a hint; the path alone decides)."""
        target = self.readlink(rel)
        return None if target is None else _last_part(target)

    def readlink(self, rel: str) -> str | None:
        """A link's target as written; None when ``rel`` is not a readable link."""
        try:
            path = self.real(rel, follow=False)
            if path is None or self._kind(path) != "link":
                return None
            target = self._target(path)
        except OSError:
            return None
        self._note(rel, "link", target)
        return target

    def exists(self, rel: str) -> bool:
        try:
            return self.real(rel) is not None
        except OSError:
            return False

    def read_bytes(self, rel: str) -> bytes | None:
        """A file's bytes; None when missing. OSErrors (NotSafeToRead among them) propagate."""
        raise NotImplementedError

    def listdir(self, rel: str) -> list[str]:
        """The names in a folder, sorted; [] when it is missing."""
        raise NotImplementedError

    def open_dir(self, rel: str) -> object | None:
        """A handle to read several files of one folder with (None when missing)."""
        return self.real(rel)

    def read_in(self, directory: object, rel: str, name: str) -> bytes | None:
        """read_bytes(f"{rel}/{name}"), with ``directory`` an open_dir of ``rel``."""
        return self.read_bytes(f"{rel}/{name}")

    def close_dir(self, directory: object) -> None:
        pass

    def _note(self, rel: str, kind: str, content: bytes | str | None = None) -> None:
        """Recording (for snapshots) is the disk's business; others keep nothing."""


class Fs(Tree):
    """Files under a root on disk ("/" on a live host; tests give a fake tree, the
    CLI ``--root`` a mounted image), never following a link out of it, reading only
    regular files and no more of each than the kernel would write. Optionally recorded,
    so that ``pciguard snapshot`` can pack exactly what an audit read. The only writer
    of a host (``write``, ``hand_over``)."""

    def __init__(self, root: str, record: bool = False) -> None:
        super().__init__()
        self.root = os.path.abspath(root).rstrip(os.sep)  # "" for /
        # The running host itself, not a tree standing for one: only then may pciguard
        # load modules (modprobe acts on the running kernel, whatever the root).
        self.live = self.root == ""
        # rel path -> ("file", bytes) | ("link", target) | ("dir", None), when recording
        self.recorded: dict[str, tuple[str, bytes | str | None]] | None = {} if record else None

    def _note(self, rel: str, kind: str, content: bytes | str | None = None) -> None:
        if self.recorded is not None:
            self.recorded.setdefault(rel, (kind, content))

    def _kind(self, real: str) -> str | None:
        try:
            mode = os.lstat(f"{self.root}/{real}").st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # a folder above that cannot be searched
            raise NotSafeToRead(exc.errno, exc.strerror, real) from None
        if stat.S_ISDIR(mode):
            return "dir"
        if stat.S_ISLNK(mode):
            return "link"
        return "file" if stat.S_ISREG(mode) else "other"

    def _target(self, real: str) -> str:
        return os.readlink(f"{self.root}/{real}")

    def link_name(self, rel: str, directory: object = None) -> str | None:
        if not isinstance(directory, int):
            return super().link_name(rel)
        try:  # readlink never follows the link it reads: safe through the resolved folder
            target = os.readlink(rel.rpartition("/")[2], dir_fd=directory)
        except OSError:
            return None
        self._note(rel, "link", target)
        return _last_part(target)

    def _open(self, rel: str, flags: int) -> int | None:
        """Open ``rel`` without leaving the root: its folder resolved (and remembered),
        its last part opened with O_NOFOLLOW, and only if that part is a link, resolved
        too. None when missing; other OSErrors propagate."""
        parent, _, name = rel.rpartition("/")
        base = self._folder(parent, 0)
        if base is None:
            return None
        flags |= os.O_NOFOLLOW
        try:
            return os.open(f"{self.root}/{base}/{name}" if base else f"{self.root}/{name}", flags)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
        path = self.real(rel)  # the last part is a link: resolved under the root
        if path is None:
            return None
        try:
            return os.open(f"{self.root}/{path}", flags)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_bytes(self, rel: str) -> bytes | None:
        """None when missing; NotSafeToRead, PermissionError and other OSErrors propagate."""
        fd = self._open(rel, _READ)
        return None if fd is None else self._read_fd(fd, rel)

    # Reading inside one directory through its descriptor spares the kernel a path walk
    # per attribute: the audit reads some 60,000 of them on a host of 10,000 functions.
    def open_dir(self, rel: str) -> int | None:
        return self._open(rel, os.O_RDONLY | os.O_DIRECTORY)

    def close_dir(self, directory: object) -> None:
        assert isinstance(directory, int)
        os.close(directory)

    def read_in(self, directory: object, rel: str, name: str) -> bytes | None:
        """read_bytes(f"{rel}/{name}"), with ``directory`` an open_dir of ``rel``: the
        folder is resolved, so a link here is one the kernel never makes (O_NOFOLLOW)."""
        assert isinstance(directory, int)
        try:
            fd = os.open(name, _READ | os.O_NOFOLLOW, dir_fd=directory)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotSafeToRead(
                    exc.errno, "a symbolic link where a file should be", f"{rel}/{name}"
                ) from None
            raise
        return self._read_fd(fd, f"{rel}/{name}")

    def _read_fd(self, fd: int, rel: str) -> bytes | None:
        """The bytes of an opened file, if it is a regular one no larger than the kernel
        writes there (the descriptor is closed)."""
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                return None
            if not stat.S_ISREG(info.st_mode):
                raise NotSafeToRead(errno.EINVAL, "not a regular file", rel)
            limit = largest_file(rel)
            if info.st_size > limit and info.st_size > 4096:  # sysfs says 4096 for any attribute
                raise NotSafeToRead(errno.EFBIG, f"{info.st_size} bytes, more than the kernel writes", rel)
            # At most 64 KiB a read: a sysctl file answers a larger request with ENOMEM (the
            # kernel allocates what is asked for; seen in the lab on /proc/sys/kernel).
            data = os.read(fd, min(limit + 1, _CHUNK))
            # sysfs hands over an attribute in one read; /proc and larger files may take more.
            if data and len(data) <= limit and not (len(data) < 4096 and rel.startswith("sys/")):
                chunks = [data]
                size = len(data)
                while size <= limit and (chunk := os.read(fd, min(limit + 1 - size, _CHUNK))):
                    chunks.append(chunk)
                    size += len(chunk)
                data = b"".join(chunks) if len(chunks) > 1 else data
            if len(data) > limit:
                raise NotSafeToRead(errno.EFBIG, f"more than the kernel writes ({limit} bytes)", rel)
        finally:
            os.close(fd)
        self._note(rel, "file", data)
        return data

    def readlink(self, rel: str) -> str | None:
        parent, _, name = rel.rpartition("/")
        try:
            base = self._folder(parent, 0)
            if base is None:
                return None
            target = os.readlink(f"{self.root}/{base}/{name}" if base else f"{self.root}/{name}")
        except OSError:
            return None
        self._note(rel, "link", target)
        return target

    def listdir(self, rel: str) -> list[str]:
        """The names in a folder, sorted; [] when it is missing. OSErrors (a loop, no
        permission) propagate."""
        path = self._folder(rel.strip("/"), 0)
        if path is None:
            return []
        try:
            names = sorted(os.listdir(f"{self.root}/{path}"))
        except (FileNotFoundError, NotADirectoryError):
            return []
        if self.recorded is not None:  # a snapshot must list the same entries
            self._note(rel, "dir")
            for name in names:
                if self._kind(f"{path}/{name}") == "link":
                    self.readlink(f"{rel}/{name}")
        return names

    def hand_over(self, rel: str, uid: int) -> None:
        """Give a device node (``dev/vfio/N``) to ``uid`` alone (mode 0600)."""
        path = self._writable(rel)  # resolved: its last part is not a link
        os.chown(path, uid, -1)
        os.chmod(path, 0o600)

    def write(self, rel: str, text: str) -> None:
        """Write one sysfs attribute (the only way pciguard changes a host). OSErrors
        propagate: the caller knows which step failed."""
        fd = os.open(self._writable(rel), os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
            self._forget()  # the kernel may move links in answer

    def keep(self, rel: str, data: bytes) -> None:
        """Record a command's output with what was read, as the file ``rel`` of a
        snapshot (``xen/xl-info``): a snapshot is audited from what the host said."""
        self._note(rel, "file", data)

    def load_module(self, name: str) -> None:
        """Load a kernel module, as udev would (a missing ``modprobe`` loads nothing); on
        the live host only: a tree standing for one has no kernel of its own."""
        if self.live:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["modprobe", "-b", "-q", name], check=False, timeout=30)

    def load_module_for(self, device: Bdf) -> None:
        """What udev does on a device's add event: load the module its modalias names."""
        alias = self.read_bytes(f"{PCI_DEVICES}/{device}/modalias")
        if alias and alias.strip():
            self.load_module(alias.decode("ascii", "replace").strip())

    def _writable(self, rel: str) -> str:
        path = self.real(rel)
        if path is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", f"/{rel}")
        return f"{self.root}/{path}"


@dataclass
class _Raw:
    """One PCI function as sysfs shows it, before it joins a topology."""

    bdf: Bdf
    path: str  # its directory under sys/devices
    parent: Bdf | None = None
    config: ConfigSpace | None = None
    ids: str = ""  # vendor:device; empty until known
    class_code: int = 0
    driver: str | None = None
    driver_override: str | None = None
    reset_methods: tuple[str, ...] | None = None  # None: no reset_method file
    removable: str | None = None
    physfn: Bdf | None = None
    boot_vga: bool = False
    kind: Kind = Kind.ENDPOINT
    group_link: str | None = None  # the group its iommu_group link names
    bars: tuple[Bar, ...] = ()
    irq: int | None = None  # the ``irq`` attribute: its INTx line, when it signals no other way


@dataclass(frozen=True)
class Reading:
    host: Host
    facts: KernelFacts


@dataclass
class _Notes:
    unreadable: list[Unreadable] = field(default_factory=list)
    problems: list[InputProblem] = field(default_factory=list)

    def cannot_read(self, path: str, exc: OSError, hides: str) -> None:
        self.unreadable.append(Unreadable(path, exc.strerror or type(exc).__name__, hides))

    def problem(self, path: str, message: str) -> None:
        self.problems.append(InputProblem(path, message))


# -- the hot-plug guard's hold on new devices (see platforms/linux/guard.py) ----------
def set_autoprobe(fs: Fs, value: str) -> None:
    fs.write(AUTOPROBE, value)


def vfio_pci_loaded(fs: Fs) -> bool:
    """Whether vfio-pci can claim new devices, loading it first if it is not."""
    if not fs.exists(f"{VFIO_DRIVER}/new_id"):
        fs.load_module(VFIO_PCI)  # late is better than never: before the modules not yet loaded
    return fs.exists(f"{VFIO_DRIVER}/new_id")


def claim_new_devices(fs: Fs) -> None:
    """vfio-pci's catch-all dynamic ID (``vfio_pci_loaded`` first): it claims every
    function enumerated from now on."""
    release_claim(fs)  # one left by a guard that was killed
    fs.write(f"{VFIO_DRIVER}/new_id", CATCH_ALL)


def release_claim(fs: Fs) -> None:
    with contextlib.suppress(OSError):  # ENODEV: there was none
        fs.write(f"{VFIO_DRIVER}/remove_id", CATCH_ALL_KEY)


def pciback_loaded(fs: Fs) -> bool:
    """Whether xen-pciback can seize new devices (in a Xen dom0), loading it first."""
    if not fs.exists(f"{PCIBACK_DRIVER}/new_slot"):
        fs.load_module(PCIBACK_MODULE)
    return fs.exists(f"{PCIBACK_DRIVER}/new_slot")


def buses_below_bridges(fs: Fs, host: Host) -> list[str]:
    """Every bus number a device could appear on, as xen-pciback slot patterns
    (``DDDD:BB:*.*``): the secondary to subordinate bus range of each bridge (config
    space bytes 0x19 and 0x1a), filled or not."""
    found: set[tuple[int, int]] = set()
    for bdf, fn in host.topology.items():
        if not fn.kind.is_bridge:
            continue
        config = fs.read_bytes(f"{PCI_DEVICES}/{bdf}/config") or b""
        if len(config) > 0x1A and 0 < config[0x19] <= config[0x1A]:
            found.update((bdf.segment, bus) for bus in range(config[0x19], config[0x1A] + 1))
    return [f"{domain:04x}:{bus:02x}:*.*" for domain, bus in sorted(found)]


def claim_with_pciback(fs: Fs, patterns: list[str]) -> None:
    """xen-pciback seizes every function enumerated from now on at ``patterns`` (it
    offers each new device to its slot list at probe): one left by a guard that was
    killed goes first, so none is listed twice."""
    release_pciback_claim(fs, patterns)
    for pattern in patterns:
        fs.write(f"{PCIBACK_DRIVER}/new_slot", pattern)


def release_pciback_claim(fs: Fs, patterns: list[str], kept: list[str] | None = None) -> None:
    """The guard's slot patterns off xen-pciback's list; ``kept``: the slots listed
    before the guard (a pattern takes every slot of its bus), listed again."""
    for pattern in patterns:
        with contextlib.suppress(OSError):  # ENOENT: there was none
            fs.write(f"{PCIBACK_DRIVER}/remove_slot", pattern)
    listed = set(pciback_slots(fs))
    for slot in kept or []:
        if slot not in listed:
            fs.write(f"{PCIBACK_DRIVER}/new_slot", slot)


def pciback_slots(fs: Fs) -> list[str]:
    """xen-pciback's slot list (its ``slots`` file: one DDDD:BB:SS.F a line)."""
    listed = fs.read_bytes(f"{PCIBACK_DRIVER}/slots") or b""
    return [line.strip() for line in listed.decode("ascii", "replace").splitlines() if line.strip()]


def hold(fs: Fs, device: Bdf) -> bool:
    """Keep a driverless device out of vfio-pci's claim and every other driver's: a
    ``driver_override`` no driver has. True when it is held (now, or by a guard that was
    killed)."""
    override = fs.read_bytes(f"{PCI_DEVICES}/{device}/driver_override")
    if override is not None and override.strip() in (b"", b"(null)"):
        fs.write(f"{PCI_DEVICES}/{device}/driver_override", HOLD)
        return True
    return override is not None and override.strip() == HOLD.encode()


def release_holds(fs: Fs) -> None:
    """Every device held with ``HOLD`` gets no override again (it may be gone)."""
    for name in fs.listdir(PCI_DEVICES):
        override = fs.read_bytes(f"{PCI_DEVICES}/{name}/driver_override")
        if override is not None and override.strip() == HOLD.encode():
            with contextlib.suppress(OSError):
                fs.write(f"{PCI_DEVICES}/{name}/driver_override", "\n")


def authorize_thunderbolt(fs: Fs, name: str) -> None:
    fs.write(f"{THUNDERBOLT}/{name}/authorized", "1")


def holders_of(fs: Tree, node: str) -> list[int]:
    """The processes that hold ``/node`` (a device node such as ``dev/vfio/7``) open."""
    holders = []
    for pid in fs.listdir("proc"):
        if not (pid.isascii() and pid.isdigit()):
            continue
        try:
            descriptors = fs.listdir(f"proc/{pid}/fd")
        except OSError:
            holders.append(int(pid))  # cannot look: it may hold the node (fail closed)
            continue
        if any(fs.link(f"proc/{pid}/fd/{fd}") == node for fd in descriptors):
            holders.append(int(pid))
    return holders


def read_host(root: str = "/", fs: Tree | None = None, name: str | None = None) -> Reading:
    return _Reader(fs or Fs(root)).read(name)


class _Reader:
    def __init__(self, fs: Tree) -> None:
        self.fs = fs
        self.notes = _Notes()
        # Functions alike (the VFs of one PF) have the same config space: parsed once.
        self._configs: dict[bytes, ConfigSpace] = {}

    # -- small helpers that turn OSErrors into notes -------------------------------
    def _text(self, rel: str, hides: str = "this value", directory: object = None) -> str | None:
        data = self._bytes(rel, hides, directory)
        return None if data is None else data.decode("utf-8", "replace").strip()

    def _bytes(self, rel: str, hides: str, directory: object = None) -> bytes | None:
        """``directory``: an Fs.open_dir of rel's folder, to read through."""
        try:
            if directory is None:
                return self.fs.read_bytes(rel)
            folder, _, name = rel.rpartition("/")
            return self.fs.read_in(directory, folder, name)
        except OSError as exc:
            self.notes.cannot_read(rel, exc, hides)
            return None

    def _hex(self, rel: str) -> int | None:
        text = self._text(rel)
        if text is None:
            return None
        try:
            return int(text, 16)
        except ValueError:
            self.notes.problem(rel, f"expected a hexadecimal number, found {text[:40]!r}")
            return None

    # -- the whole reading ---------------------------------------------------------
    def read(self, name: str | None) -> Reading:
        raws = self._pci_functions()
        critical = self._host_critical(raws)
        release = self._text("proc/sys/kernel/osrelease")
        topology = self._topology(raws, critical, release or "")
        groups = self._kernel_groups(raws, topology)
        interrupts = self._text("proc/interrupts", "whether interrupt remapping is in use")
        ir_in_use = _interrupt_remapping_in_use(interrupts)
        arch_text = self._text("proc/sys/kernel/arch") or ""
        arch = Arch.ARM if arch_text.startswith(("aarch64", "arm")) else Arch.X86
        dmar, ivrs = self._firmware_tables()
        topology = self._with_regions(topology, groups, dmar, ivrs)
        units = self._units(raws, topology, arch, ir_in_use, interrupts, dmar, ivrs)
        cmdline = (self._text("proc/cmdline") or "").split()
        switches = tuple(w for w in cmdline if IOMMU_SWITCHES.match(w))
        hostname = name or self._text("proc/sys/kernel/hostname") or "this host"
        host = Host(hostname, arch, topology, units, kernel_groups=groups)
        facts = KernelFacts(
            release=release,
            iommu_switches=switches,
            firmware_table="DMAR" if dmar else "IVRS" if ivrs else None,
            firmware_units=len(dmar.drhds) if dmar else len(ivrs.units) if ivrs else 0,
            firmware_flags=tuple(f.name or "" for f in DmarFlags if dmar and f in dmar.flags),
            preboot_dma_protection=(
                DmarFlags.DMA_CTRL_PLATFORM_OPT_IN in dmar.flags
                if dmar
                else ivrs.preboot_dma_protection
                if ivrs
                else None
            ),
            interrupt_remapping_in_use=ir_in_use,
            kernel_unsafe=self._kernel_unsafe(switches),
            thunderbolt_domains=tuple(self._thunderbolt_domains()),
            thunderbolt_devices=tuple(self._thunderbolt_devices()),
            driver_overrides={r.bdf: r.driver_override for r in raws.values() if r.driver_override},
            unreadable=tuple(self.notes.unreadable),
            problems=tuple(self.notes.problems),
            topology_complete=all(r.config is not None and not r.config.header_only for r in raws.values()),
        )
        return Reading(host, facts)

    # -- PCI functions -------------------------------------------------------------
    def _pci_functions(self) -> dict[Bdf, _Raw]:
        raws: dict[Bdf, _Raw] = {}
        found: list[tuple[Bdf, str]] = []
        names = self._list(PCI_DEVICES, "every PCI device")
        if not names and not self.fs.exists(PCI_DEVICES):
            self.notes.unreadable.append(
                Unreadable(PCI_DEVICES, "missing", "every PCI device: is sysfs mounted, and is this Linux?")
            )
        for entry in names:
            rel = f"{PCI_DEVICES}/{entry}"
            if not _BDF_NAME.match(entry):
                self.notes.problem(rel, f"'{entry}' is not a PCI address (SSSS:BB:DD.F); skipped")
                continue
            path = self.fs.link(rel)
            if path is None:
                self.notes.problem(rel, "not a link to a device directory; skipped")
                continue
            found.append((Bdf.parse(entry), path))
        for bdf, path in found:
            raw = self._function(bdf, path)
            if raw is None:
                self.notes.problem(
                    f"{PCI_DEVICES}/{bdf}",
                    "dangling link: the device directory it points to is missing; skipped",
                )
                continue
            raws[bdf] = raw
        self._identify(raws)
        header_only = [r for r in raws.values() if r.config is not None and r.config.header_only]
        if header_only:
            self.notes.unreadable.append(
                Unreadable(
                    f"{PCI_DEVICES}/*/config",
                    f"only the 64-byte header is readable ({len(header_only)} functions)",
                    HIDES_CONFIG,
                )
            )
        for raw in raws.values():
            parent_name = os.path.basename(os.path.dirname(raw.path))
            if _BDF_NAME.match(parent_name):
                parent = Bdf.parse(parent_name)
                if parent in raws:
                    raw.parent = parent
                else:
                    self.notes.problem(raw.path, f"parent {parent} is not listed in {PCI_DEVICES}")
            elif not _ROOT_BUS_NAME.match(parent_name):
                self.notes.problem(raw.path, f"sits under '{parent_name}', not a PCI bridge or root bus")
        return raws

    def _function(self, bdf: Bdf, path: str) -> _Raw | None:
        """One function: config space first; the sysfs attributes only where config space
        cannot tell (virtual functions read all ones there) or the host alone knows.
        None when its directory is missing."""
        fs = self.fs
        raw = _Raw(bdf, path)
        try:
            directory = fs.open_dir(path)
        except OSError as exc:
            # Kept with nothing known (no config space, no reset method, no driver):
            # left out, its IOMMU group would look smaller than it is.
            self.notes.cannot_read(path, exc, "this function's config space, driver and reset methods")
            return raw
        if directory is None:
            return None
        try:

            def text(name: str) -> str | None:
                return self._text(f"{path}/{name}", directory=directory)

            data = self._bytes(f"{path}/config", "this function's capabilities", directory)
            if data is not None:
                cfg = self._configs.get(data) or self._configs.setdefault(data, parse_config(data))
                raw.config = cfg
                for message in cfg.problems:
                    self.notes.problem(f"{path}/config", message)
                if cfg.vendor != 0xFFFF and len(data) >= 0x40:
                    raw.ids, raw.class_code = f"{cfg.vendor:04x}:{cfg.device:04x}", cfg.class_code
            raw.driver = fs.link_name(f"{path}/driver", directory)
            raw.group_link = fs.link_name(f"{path}/iommu_group", directory)
            override = text("driver_override")
            raw.driver_override = None if override in (None, "(null)", "") else override
            methods = text("reset_method")
            raw.reset_methods = None if methods is None else tuple(methods.split())
            raw.removable = text("removable")
            raw.bars = self._memory_bars(f"{path}/resource", text("resource"))
            # Only functions that can signal nothing but INTx are tied to their line: VFIO
            # gives a guest a line only exclusively or masked at the device (DisINTx), and
            # the `irq` of a function using MSI-X still names a line it does not use.
            if raw.config is not None and raw.config.intx_only and (irq := text("irq")) is not None:
                raw.irq = self._irq(f"{path}/irq", irq)
            if raw.class_code >> 16 == 0x03:  # display controllers: is it the console?
                raw.boot_vga = text("boot_vga") == "1"
        finally:
            fs.close_dir(directory)
        return raw

    def _memory_bars(self, rel: str, text: str | None) -> tuple[Bar, ...]:
        """The assigned memory BARs in a ``resource`` file: one line per resource,
        ``start end flags`` in hex, the first six the standard BARs."""
        if text is None:
            return ()
        bars = []
        for number, line in enumerate(text.splitlines()[:STANDARD_BARS]):
            if line == _UNASSIGNED_RESOURCE:  # most of them: said at once
                continue
            try:
                start, end, flags = (int(word, 16) for word in line.split())
            except ValueError:
                self.notes.problem(
                    rel, f"line {number + 1}: expected three hexadecimal numbers, found {line[:60]!r}"
                )
                return ()
            if flags & IORESOURCE_MEM and start and end >= start:
                bars.append(Bar(start, end))
        return tuple(bars)

    def _irq(self, rel: str, text: str) -> int | None:
        try:
            line = int(text)
        except ValueError:
            self.notes.problem(rel, f"expected a decimal number, found {text[:40]!r}")
            return None
        return line if line > 0 else None

    def _identify(self, raws: dict[Bdf, _Raw]) -> None:
        """IDs of functions whose config space does not carry them. A VF's vendor is its
        PF's and its device ID is in the PF's SR-IOV capability (as Linux reads them);
        anything else comes from the vendor, device, class and physfn attributes."""
        for pf in raws.values():
            sriov = pf.config.sriov if pf.config else None
            if sriov is None or not pf.ids:
                continue
            for rid in sriov.vf_rids(pf.bdf.rid):
                vf = raws.get(Bdf.from_rid(pf.bdf.segment, rid)) if rid <= 0xFFFF else None
                if vf is not None and not vf.ids and vf.config is not None and len(vf.config.problems) == 0:
                    vf.ids = f"{pf.ids[:4]}:{sriov.vf_device:04x}"
                    vf.class_code, vf.physfn = vf.config.class_code, pf.bdf
        for raw in raws.values():
            if raw.ids:
                continue
            path = raw.path
            vendor, device = self._hex(f"{path}/vendor"), self._hex(f"{path}/device")
            unknown = 0xFFFF
            raw.ids = (
                f"{unknown if vendor is None else vendor:04x}:{unknown if device is None else device:04x}"
            )
            class_code = self._hex(f"{path}/class")
            raw.class_code = (
                class_code if class_code is not None else raw.config.class_code if raw.config else 0
            )
            physfn = self.fs.link_name(f"{path}/physfn")
            if physfn is not None and _BDF_NAME.match(physfn):
                raw.physfn = Bdf.parse(physfn)
            if raw.class_code >> 16 == 0x03:
                raw.boot_vga = self._text(f"{path}/boot_vga") == "1"

    def _topology(self, raws: dict[Bdf, _Raw], critical: dict[Bdf, str], release: str) -> Topology:
        children: dict[Bdf, list[_Raw]] = {}
        for raw in raws.values():
            if raw.parent is not None:
                children.setdefault(raw.parent, []).append(raw)
        trusts_missing_reset = _kernel_at_least(release, (5, 15))
        parent_of = _parent_of(raws)
        for raw in sorted(raws.values(), key=lambda r: len(ancestors(r.bdf, parent_of))):
            parent = raws[raw.parent] if raw.parent is not None else None
            raw.kind = _kind(raw, parent, children.get(raw.bdf, []), raws)
        functions: dict[Bdf, Function] = {}
        for raw in raws.values():
            cfg = raw.config
            if raw.reset_methods is not None:
                resets = raw.reset_methods
            elif trusts_missing_reset or cfg is None:
                resets = ()  # since 5.15 the attribute is hidden exactly when there is none
            else:
                siblings = children.get(raw.parent, []) if raw.parent else []
                resets = reset_methods_from_config(
                    cfg, raw.parent is None, all(s.bdf.slot == raw.bdf.slot for s in siblings)
                )
            physfn = raw.physfn if raw.physfn in raws else None
            functions[raw.bdf] = Function(
                bdf=raw.bdf,
                kind=raw.kind,
                parent=raw.parent,
                ids=raw.ids,
                class_code=raw.class_code,
                driver=raw.driver,
                acs=cfg.acs if cfg else None,
                ats=cfg.ats if cfg else False,
                external=raw.removable != "removable"
                and any(c.removable == "removable" for c in children.get(raw.bdf, [])),
                phantom_functions=cfg.phantom_functions if cfg else 0,
                reset_methods=resets,
                bars=raw.bars,
                intx=raw.irq,
                physfn=physfn,
                host_critical=critical.get(raw.bdf, ""),
            )
        # The tree sysfs gives can still break the model's rules (a port type that cannot sit
        # where it sits). Drop what breaks them, with a note, rather than refuse the host.
        for _ in range(len(functions) + 1):
            try:
                return Topology(functions)
            except TopologyError as exc:
                culprit = _culprit(exc, functions)
                gone = [culprit, *(b for b in functions if culprit in ancestors(b, _parent_in(functions)))]
                for b in gone:
                    functions.pop(b, None)
                self.notes.problem(raws[culprit].path, f"{exc}; left out of the audit with what is below it")
        raise AssertionError("unreachable: every round removes a function")

    # -- IOMMU groups and units ----------------------------------------------------
    def _kernel_groups(self, raws: dict[Bdf, _Raw], topology: Topology) -> tuple[IommuGroup, ...] | None:
        """The kernel's groups. A group the sources contradict each other about (a device
        listed in one group while its ``iommu_group`` link names another, or listed twice)
        is kept with the contradiction, which makes it not assignable."""
        names = self._list(IOMMU_GROUPS, "the kernel's IOMMU groups")
        listed: dict[int, list[Bdf]] = {}
        doubts: dict[int, list[str]] = {}
        seen: dict[Bdf, int] = {}
        by_name = {str(b): b for b in topology.functions}
        for entry in names:
            rel = f"{IOMMU_GROUPS}/{entry}"
            if not _GROUP_NAME.match(entry):
                self.notes.problem(rel, f"'{entry}' is not a group number; skipped")
                continue
            number = int(entry)
            members = listed.setdefault(number, [])
            for member in self._list(f"{rel}/devices", f"the members of IOMMU group {entry}"):
                bdf = by_name.get(member)
                if bdf is None and not _BDF_NAME.match(member):
                    continue  # non-PCI members (platform devices on ARM)
                if bdf is None:
                    self.notes.problem(
                        f"{rel}/devices/{member}", "names a device that is not in the topology"
                    )
                    continue
                if bdf in seen:
                    why = f"{bdf} is listed in both group {seen[bdf]} and group {number}"
                    self.notes.problem(f"{rel}/devices/{member}", why)
                    doubts.setdefault(seen[bdf], []).append(why)
                    doubts.setdefault(number, []).append(why)
                    continue
                seen[bdf] = number
                members.append(bdf)
        for bdf, raw in raws.items():
            if bdf not in topology or raw.group_link is None:
                continue
            said = int(raw.group_link) if _GROUP_NAME.match(raw.group_link) else None
            listed_in = seen.get(bdf)
            if said is not None and said == listed_in:
                continue
            link = f"the iommu_group link of {bdf}"
            if said is None:
                why = f"{link} names '{raw.group_link}', not a group number"
            elif listed_in is not None:
                why = f"{bdf} is listed in group {listed_in} while {link} names group {said}"
            elif said in listed:
                why = f"{link} names group {said}, which does not list it"
            else:
                why = f"{link} names group {said}, which the kernel does not list"
            self.notes.problem(f"{raw.path}/iommu_group", why)
            if listed_in is None and said is not None:  # the link is all there is: it joins that group
                listed.setdefault(said, []).append(bdf)
                seen[bdf] = said
            for doubted in (n for n in (listed_in, said) if n is not None):
                listed.setdefault(doubted, [])
                doubts.setdefault(doubted, []).append(why)
        groups = []
        for number, members in sorted(listed.items()):
            if not members and number not in doubts:
                continue
            rel = f"{IOMMU_GROUPS}/{number}/type"
            type_text = self._text(rel, f"whether the DMA of group {number} is translated")
            if type_text is None:
                if not any(u.path == rel for u in self.notes.unreadable):
                    self.notes.problem(rel, "missing: the group's domain is unknown, so counted untranslated")
                domain = DomainType.UNKNOWN
            else:
                try:
                    domain = DomainType(type_text)
                except ValueError:
                    self.notes.problem(rel, f"unknown domain type {type_text[:40]!r}: counted untranslated")
                    domain = DomainType.UNKNOWN
            doubt = "; ".join(dict.fromkeys(doubts.get(number, ()))) or None
            groups.append(IommuGroup(number, tuple(sorted(members)), domain, doubt))
        return tuple(groups) or None

    def _list(self, rel: str, hides: str) -> list[str]:
        try:
            return self.fs.listdir(rel)
        except OSError as exc:
            self.notes.cannot_read(rel, exc, hides)
            return []

    def _units(
        self,
        raws: dict[Bdf, _Raw],
        topology: Topology,
        arch: Arch,
        ir_in_use: bool | None,
        interrupts: str | None,
        dmar: Dmar | None,
        ivrs: Ivrs | None,
    ) -> tuple[IommuUnit, ...]:
        units = []
        msi = None
        if arch is Arch.ARM:
            msi = MsiController.ITS if interrupts and "ITS" in interrupts else MsiController.GICV2M
        for entry in self._list(IOMMU_CLASS, "the IOMMU units the kernel uses"):
            path = self.fs.link(f"{IOMMU_CLASS}/{entry}") or f"{IOMMU_CLASS}/{entry}"
            ecap = self._hex(f"{path}/intel-iommu/ecap")
            # VT-d: ecap bit 3. AMD IOMMUs and SMMUs: capable; /proc/interrupts says if in use.
            ir_capable = bool(ecap & 0x8) if ecap is not None else arch is Arch.X86
            if not ir_capable:
                ir = Feature.ABSENT
            elif ir_in_use is None:
                ir = Feature.DISABLED  # fail closed: unseen is not enabled
            else:
                ir = Feature.ENABLED if ir_in_use else Feature.DISABLED
            linked = self._list(f"{path}/devices", f"the devices IOMMU {entry} covers")
            scope = tuple(sorted(b for b in map(Bdf.parse, filter(_BDF_NAME.match, linked)) if b in topology))
            units.append(IommuUnit(entry, Feature.ENABLED, ir, msi, scope))
        if units:
            return tuple(units)
        # The firmware describes units the kernel does not use (intel_iommu=off, ...).
        if dmar is not None:
            # Interrupt remapping works without DMA remapping (intel_iommu=off leaves it on).
            ir = Feature.ABSENT
            if DmarFlags.INTR_REMAP in dmar.flags:
                ir = Feature.ENABLED if ir_in_use else Feature.DISABLED
            for i, drhd in enumerate(dmar.drhds):
                covers = (
                    None if drhd.include_all else self._resolve_scopes(drhd.scopes, drhd.segment, topology)
                )
                units.append(IommuUnit(f"dmar{i} (unused)", Feature.DISABLED, ir, None, covers))
            if sum(u.scope is None for u in units) > 1:
                units = [
                    replace(u, scope=None) if i == 0 else replace(u, scope=()) for i, u in enumerate(units)
                ]
        elif ivrs is not None:
            for i, _ in enumerate(ivrs.units):
                units.append(
                    IommuUnit(
                        f"ivhd{i} (unused)", Feature.DISABLED, Feature.DISABLED, None, None if i == 0 else ()
                    )
                )
        return tuple(units)

    def _resolve_scopes(
        self, scopes: Iterable[DeviceScope], segment: int, topology: Topology
    ) -> tuple[Bdf, ...]:
        found = []
        for scope in scopes:
            if scope.type not in (ScopeType.ENDPOINT, ScopeType.SUBHIERARCHY):
                continue
            bdf = scope.resolve(segment, topology.secondary_bus)
            if bdf is not None and bdf in topology:
                found.append(bdf)
        return tuple(found)

    def _firmware_tables(self) -> tuple[Dmar | None, Ivrs | None]:
        dmar = ivrs = None
        rel = f"{ACPI_TABLES}/DMAR"
        if not self.fs.exists(rel) and self.fs.exists(f"{ACPI_TABLES}/RMAD"):
            rel = f"{ACPI_TABLES}/RMAD"  # Xen's dom0: the same table under a signature no driver knows
        data = self._bytes(rel, HIDES_DMAR)
        if data is not None:
            if data[:4] == b"RMAD":  # the same four bytes: the checksum still holds
                data = b"DMAR" + data[4:]
            try:
                dmar = parse_dmar(data)
            except MalformedTable as exc:
                self.notes.problem(rel, str(exc))
            else:
                if not dmar.checksum_ok:
                    self.notes.problem(rel, "checksum does not add up; read anyway")
        data = self._bytes(f"{ACPI_TABLES}/IVRS", HIDES_DMAR.replace("RMRR", "IVMD"))
        if data is not None:
            try:
                ivrs = parse_ivrs(data)
            except MalformedTable as exc:
                self.notes.problem(f"{ACPI_TABLES}/IVRS", str(exc))
        return dmar, ivrs

    def _with_regions(
        self,
        topology: Topology,
        groups: tuple[IommuGroup, ...] | None,
        dmar: Dmar | None,
        ivrs: Ivrs | None,
    ) -> Topology:
        regions: dict[Bdf, list[ReservedRegion]] = {}

        def give(bdf: Bdf, region: ReservedRegion) -> None:
            if not topology[bdf].kind.is_bridge and region not in regions.setdefault(bdf, []):
                regions[bdf].append(region)

        for rmrr in dmar.rmrrs if dmar else ():
            for top in self._resolve_scopes(rmrr.scopes, rmrr.segment, topology):
                for bdf in topology.subtree(top):
                    give(bdf, ReservedRegion("RMRR", rmrr.base, rmrr.limit))
        for ivmd in ivrs.unity_maps if ivrs else ():
            for bdf in topology:
                if ivmd.first is None or ivmd.first <= bdf.rid <= (ivmd.last or ivmd.first):
                    give(bdf, ReservedRegion("IVMD", ivmd.start, ivmd.end))
        # The kernel's view: a group's 1:1 ("direct") regions. Any the tables did not
        # attribute (or that could not be read) are charged to every endpoint of the group.
        for group in groups or ():
            rel = f"{IOMMU_GROUPS}/{group.number}/reserved_regions"
            for start, end, kind in self._direct_regions(rel):
                attributed = any(
                    r.start == start and r.end == end for m in group.members for r in regions.get(m, ())
                )
                if not attributed:
                    for bdf in group.members:
                        give(bdf, ReservedRegion(kind, start, end))
        if not regions:
            return topology
        return Topology(
            {
                b: replace(f, reserved_regions=tuple(regions[b])) if b in regions else f
                for b, f in topology.items()
            }
        )

    def _direct_regions(self, rel: str) -> list[tuple[int, int, str]]:
        """A group's 1:1 regions, named by the kernel's type: ``direct``, or
        ``direct-relaxable`` (ISA floppy workaround, USB and GPU RMRRs), which VFIO may
        leave unmapped for a guest."""
        out = []
        for number, line in enumerate((self._text(rel) or "").splitlines(), 1):
            words = line.split()
            try:
                if not all(_HEX_ADDRESS.match(w) for w in words[:2]):
                    raise ValueError
                start, end, kind = int(words[0], 16), int(words[1], 16), words[2]
            except (IndexError, ValueError):
                self.notes.problem(f"{rel}:{number}", f"expected 'START END TYPE', found {line[:60]!r}")
                continue
            if end < start:
                self.notes.problem(
                    f"{rel}:{number}", f"the region ends ({end:#x}) before it starts ({start:#x})"
                )
                continue
            if kind in ("direct", "direct-relaxable"):
                out.append((start, end, kind))
        return out

    # -- host facts ----------------------------------------------------------------
    def _host_critical(self, raws: dict[Bdf, _Raw]) -> dict[Bdf, str]:
        critical: dict[Bdf, str] = {}
        for bdf, raw in raws.items():
            if raw.boot_vga:
                critical[bdf] = CONSOLE_GPU
            elif raw.class_code >> 8 == 0x0600:
                critical[bdf] = "the host bridge"
            elif raw.class_code >> 8 == 0x0601:
                critical[bdf] = "the ISA bridge (chipset)"
        for device, where in self._root_filesystem_devices():
            target = self.fs.link(f"sys/dev/block/{device}") or ""
            holders = [Bdf.parse(p) for p in target.split("/") if _BDF_NAME.match(p)]
            if holders and holders[-1] in raws:
                critical.setdefault(holders[-1], f"holds the root filesystem ({where})")
        return critical

    def _root_filesystem_devices(self) -> list[tuple[str, str]]:
        out = []
        for number, line in enumerate((self._text("proc/self/mountinfo") or "").splitlines(), 1):
            fields = line.split()
            if len(fields) > 9 and fields[4] == "/" and ":" in fields[2]:
                # After the optional fields, "-" then the file system type and its source.
                separator = fields.index("-", 6) if "-" in fields[6:] else None
                if separator is None:
                    out.append((fields[2], fields[2]))
                elif separator + 2 < len(fields):
                    out.append((fields[2], fields[separator + 2]))
                else:
                    self.notes.problem(f"proc/self/mountinfo:{number}", "no mount source after '-'")
        return out[-1:]

    def _kernel_unsafe(self, switches: tuple[str, ...]) -> tuple[str, ...]:
        unsafe = [why for rel, why in UNSAFE_PARAMETERS.items() if (self._text(rel) or "N")[:1] in "Y1"]
        for word in switches:
            if word.startswith("pcie_acs_override="):
                unsafe.append(
                    f"{word}: the ACS override patch makes groups claim isolation the hardware lacks"
                )
            elif word.startswith("pci=") and any(o.startswith("config_acs=") for o in word[4:].split(",")):
                unsafe.append(
                    f"{word}: ACS controls forced from the command line (a debugging switch), so "
                    "the groups rest on settings the firmware and the kernel did not choose"
                )
            elif word.split("=")[0].endswith(
                ("allow_unsafe_interrupts", "enable_unsafe_noiommu_mode")
            ) and word.split("=", 1)[-1] in ("1", "Y", "y"):
                unsafe.append(f"{word} on the kernel command line")
        return tuple(dict.fromkeys(unsafe))

    def _thunderbolt_domains(self) -> Iterable[ThunderboltDomain]:
        for entry in self._list(THUNDERBOLT, "Thunderbolt domains and devices"):
            if entry.startswith("domain"):
                base = self.fs.link(f"{THUNDERBOLT}/{entry}") or f"{THUNDERBOLT}/{entry}"
                protection = self._text(f"{base}/iommu_dma_protection")
                yield ThunderboltDomain(
                    entry, self._text(f"{base}/security"), None if protection is None else protection == "1"
                )

    def _thunderbolt_devices(self) -> Iterable[ThunderboltDevice]:
        for entry in self._list(THUNDERBOLT, "Thunderbolt domains and devices"):
            if entry.startswith("domain") or ":" in entry:
                continue  # domains, and services (X-Y:Z.W) that are not devices
            base = self.fs.link(f"{THUNDERBOLT}/{entry}") or f"{THUNDERBOLT}/{entry}"
            authorized = self._text(f"{base}/authorized")
            yield ThunderboltDevice(
                entry,
                self._text(f"{base}/vendor_name") or "",
                self._text(f"{base}/device_name") or "",
                None if authorized is None else authorized != "0",
                self._text(f"{base}/unique_id") or "",
            )


@dataclass(frozen=True)
class Arrival:
    """A function as the hot-plug guard judges it the moment it appears: read alone, not
    with the whole host (under emulation a whole reading takes a tenth of a second)."""

    bdf: Bdf
    ids: str
    class_code: int
    bridge: bool
    ports: tuple[Bdf, ...]  # the bridges above it, root first
    external: bool  # below an external-facing port (the kernel's ``removable``)
    driver: str | None
    translated: bool  # in an IOMMU group whose domain translates


def read_arrival(fs: Fs, bdf: Bdf) -> Arrival | None:
    """None when ``bdf`` is not (or no longer) on the bus."""
    path = fs.link(f"{PCI_DEVICES}/{bdf}")
    reader = _Reader(fs)
    raw = reader._function(bdf, path) if path is not None else None
    if path is None or raw is None:
        return None
    if not raw.ids:
        reader._identify({bdf: raw})
    group = fs.link_name(f"{path}/iommu_group")
    kind = reader._text(f"{IOMMU_GROUPS}/{group}/type") if group else None
    return Arrival(
        bdf=bdf,
        ids=raw.ids,
        class_code=raw.class_code,
        bridge=raw.config.is_bridge_header if raw.config else raw.class_code >> 8 == 0x0604,
        ports=tuple(Bdf.parse(p) for p in path.split("/")[:-1] if _BDF_NAME.match(p)),
        external=raw.removable == "removable",
        driver=raw.driver,
        translated=group is not None and kind in TRANSLATING_TYPES,
    )


def thunderbolt_devices(fs: Fs) -> list[ThunderboltDevice]:
    """The Thunderbolt devices under ``fs`` as they stand now (what the guard authorises)."""
    return list(_Reader(fs)._thunderbolt_devices())


def _interrupt_remapping_in_use(interrupts: str | None) -> bool | None:
    if not interrupts:
        return None
    if IR_CHIP.search(interrupts):
        return True
    return False if PLAIN_CHIP.search(interrupts) else None


def _kernel_at_least(release: str, version: tuple[int, int]) -> bool:
    match = re.match(r"(\d+)\.(\d+)", release)
    return bool(match) and (int(match[1]), int(match[2])) >= version  # type: ignore[index]


def _culprit(exc: TopologyError, functions: dict[Bdf, Function]) -> Bdf:
    """The function a topology error names first (every message starts with it)."""
    try:
        bdf = Bdf.parse(str(exc)[:12])
    except ValueError:
        return max(functions)
    return bdf if bdf in functions else max(functions)


def _parent_in(functions: dict[Bdf, Function]) -> Callable[[Bdf], Bdf | None]:
    return lambda b: functions[b].parent if b in functions else None


def _kind(raw: _Raw, parent: _Raw | None, children: list[_Raw], raws: dict[Bdf, _Raw]) -> Kind:
    """The function's kind from its capabilities, or a guess from where it sits when the
    capabilities cannot be read (non-root: only 64 bytes of config space)."""
    if raw.config is not None and (kind := raw.config.kind()) is not None:
        if kind is Kind.PCI_ENDPOINT and parent is not None and not _behind_pci_bridge(raw, raws):
            return Kind.ENDPOINT  # no PCIe capability seen below a PCIe port: treat as PCIe
        return kind
    is_bridge = raw.config.is_bridge_header if raw.config else bool(children)
    if is_bridge:
        if parent is None:
            return Kind.ROOT_PORT
        if parent.kind is Kind.SWITCH_UPSTREAM:
            return Kind.SWITCH_DOWNSTREAM
        if (
            parent.kind in (Kind.ROOT_PORT, Kind.SWITCH_DOWNSTREAM)
            and children
            and all(c.config is not None and c.config.is_bridge_header for c in children)
        ):
            return Kind.SWITCH_UPSTREAM
        return Kind.PCIE_TO_PCI_BRIDGE
    if parent is None:
        # On a root bus with its capabilities unseen: counted conventional (no ACS, grouped
        # with its slot's other functions), the reading that claims no isolation.
        return Kind.PCI_ENDPOINT
    return Kind.PCI_ENDPOINT if _behind_pci_bridge(raw, raws) else Kind.ENDPOINT


def _parent_of(raws: dict[Bdf, _Raw]) -> Callable[[Bdf], Bdf | None]:
    return lambda b: raws[b].parent if b in raws else None


def _behind_pci_bridge(raw: _Raw, raws: dict[Bdf, _Raw]) -> bool:
    return any(raws[b].kind is Kind.PCIE_TO_PCI_BRIDGE for b in ancestors(raw.bdf, _parent_of(raws)))
