"""A corpus of hostile inputs: sysfs trees and snapshot tarballs built to crash, hang,
fool or escape pciguard. Each is a named builder, so tests and ``bench/fuzz.py`` share
them; each says what it attacks."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GPU = "sys/bus/pci/devices/0000:01:00.0"  # the workstation's GPU (group with its audio function)
ROOT_PORT = "sys/devices/pci0000:00/0000:00:01.0"


def _device(root: Path, link: str = GPU) -> Path:
    return (root / link).resolve()


def _group_of(root: Path, link: str = GPU) -> Path:
    return (root / link / "iommu_group").resolve()


@dataclass(frozen=True)
class HostileTree:
    name: str
    attack: str  # what it tries
    damage: Callable[[Path, Path], object]  # (root, a folder outside the root)
    needs_root: bool = False
    as_user: bool = False  # its damage shows only to an ordinary user (root reads mode 000)


def _fifo_config(root: Path, outside: Path) -> None:
    config = _device(root) / "config"
    config.unlink()
    os.mkfifo(config)


def _endless_config(root: Path, outside: Path) -> None:
    config = _device(root) / "config"
    config.unlink()
    os.mknod(config, 0o444 | 0o020000, os.makedev(1, 5))  # a character device like /dev/zero


def _sparse_config(root: Path, outside: Path) -> None:
    with open(_device(root) / "config", "r+b") as f:
        f.truncate(16 << 30)


def _large_interrupts(root: Path, outside: Path) -> None:
    (root / "proc/interrupts").write_bytes(b"  9:  0  IO-APIC  9-fasteoi  acpi\n" * 2_000_000)


def _config_outside(root: Path, outside: Path) -> None:
    secret = outside / "secret-config"
    secret.write_bytes((_device(root) / "config").read_bytes()[:64] + b"SECRET" * 100)
    config = _device(root) / "config"
    config.unlink()
    config.symlink_to(secret)


def _device_link_outside(root: Path, outside: Path) -> None:
    target = outside / "device"
    target.mkdir()
    (target / "config").write_bytes(b"SECRET" * 100)
    link = root / "sys/bus/pci/devices/0000:09:00.0"
    link.symlink_to(target)


def _link_loop(root: Path, outside: Path) -> None:
    (root / "sys/bus/pci/devices/0000:09:00.0").symlink_to("0000:09:00.1")
    (root / "sys/bus/pci/devices/0000:09:00.1").symlink_to("0000:09:00.0")


def _deep_link(root: Path, outside: Path) -> None:
    (root / "sys/bus/pci/devices/0000:09:00.0").symlink_to("a/" * 2000)


def _folder_loop(root: Path, outside: Path) -> None:
    groups = root / "sys/kernel/iommu_groups"
    groups.rename(root / "sys/kernel/groups-moved")
    groups.symlink_to("iommu_groups")


def _group_named_superscript(root: Path, outside: Path) -> None:
    (root / "sys/kernel/iommu_groups/²").mkdir()


def _undecodable_names(root: Path, outside: Path) -> None:
    os.mkdir(os.path.join(os.fsencode(root / "sys/bus/pci/devices"), b"0000:\xff\xfe:00.0"))
    os.mkdir(os.path.join(os.fsencode(root / "sys/kernel/iommu_groups"), b"\x1b[31m\xff"))
    driver = _device(root) / "driver"
    if driver.is_symlink():
        driver.unlink()
    os.symlink(b"../../../../bus/pci/drivers/\x1b]0;owned\x07\xff", os.fsencode(driver))


def _mountinfo_ending_in_dash(root: Path, outside: Path) -> None:
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/mountinfo").write_text("22 1 259:2 / / rw,relatime shared:1 master:2 x y -\n")


def _group_type(kind: str) -> Callable[[Path, Path], None]:
    def damage(root: Path, outside: Path) -> None:
        type_file = _group_of(root) / "type"
        type_file.unlink()
        if kind == "dir":
            type_file.mkdir()
        elif kind == "dangling":
            type_file.symlink_to("nowhere")
        elif kind == "mode000":
            type_file.write_text("identity\n")
            type_file.chmod(0)

    return damage


def _group_link_contradicts_listing(root: Path, outside: Path) -> None:
    """The GPU's iommu_group link names another group than the one listing it."""
    groups = root / "sys/kernel/iommu_groups"
    other = next(g for g in sorted(groups.iterdir()) if g != _group_of(root))
    link = _device(root) / "iommu_group"
    link.unlink()
    link.symlink_to(os.path.relpath(other, link.parent))


def _listed_twice(root: Path, outside: Path) -> None:
    groups = root / "sys/kernel/iommu_groups"
    other = next(g for g in sorted(groups.iterdir()) if g != _group_of(root))
    (other / "devices/0000:01:00.0").symlink_to(os.path.relpath(_device(root), other / "devices"))


TREES = [
    HostileTree("fifo-config", "a FIFO where config space should be: blocks a reader forever", _fifo_config),
    HostileTree(
        "endless-config", "a character device like /dev/zero: never ends", _endless_config, needs_root=True
    ),
    HostileTree("sparse-config", "a 16 GiB sparse config file: reads for minutes", _sparse_config),
    HostileTree("large-interrupts", "a 70 MB /proc/interrupts: quadratic reading", _large_interrupts),
    HostileTree("config-outside", "config is a link to a file outside the root", _config_outside),
    HostileTree("device-outside", "a device link to a folder outside the root", _device_link_outside),
    HostileTree("deep-link", "a device link of 2,000 parts: deep recursion", _deep_link),
    HostileTree("link-loop", "two device links pointing at each other (ELOOP)", _link_loop),
    HostileTree("folder-loop", "the groups folder is a link to itself (ELOOP)", _folder_loop),
    HostileTree(
        "group-superscript", "a group folder named '²' (isdigit, but not int)", _group_named_superscript
    ),
    HostileTree("undecodable-names", "folder names that are not UTF-8 and carry escapes", _undecodable_names),
    HostileTree("mountinfo-dash", "a mountinfo line ending in '-'", _mountinfo_ending_in_dash),
    HostileTree("type-missing", "a group without its type file (older kernels)", _group_type("missing")),
    HostileTree("type-dir", "a group whose type is a folder", _group_type("dir")),
    HostileTree("type-dangling", "a group whose type is a dangling link", _group_type("dangling")),
    HostileTree("type-mode000", "a group type file nobody may read", _group_type("mode000"), as_user=True),
    HostileTree("group-contradicted", "iommu_group names another group", _group_link_contradicts_listing),
    HostileTree("listed-twice", "a device listed in two groups", _listed_twice),
]


# -- snapshot tarballs ------------------------------------------------------------------


def _tar(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]], compress: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tuple):
                info, data = entry
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(entry)
    raw = buffer.getvalue()
    return gzip.compress(raw) if compress else raw


def _file(name: str, data: bytes = b"x\n") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _typed(name: str, kind: bytes, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _declared_huge() -> bytes:
    """A header that declares a 2 GiB config, with no data behind it."""
    info = tarfile.TarInfo("sys/devices/pci0000:00/0000:00:01.0/config")
    info.size = 2 << 30
    return gzip.compress(info.tobuf(tarfile.GNU_FORMAT) + bytes(10240))


def _bomb() -> bytes:
    """A few hundred KB of gzip that unpacks to 300 MB of one file."""
    info = tarfile.TarInfo("proc/interrupts")
    info.size = 300 << 20
    head = info.tobuf(tarfile.GNU_FORMAT)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb") as z:
        z.write(head)
        zeros = bytes(1 << 20)
        for _ in range(300):
            z.write(zeros)
    return out.getvalue()


def _many_members(count: int) -> bytes:
    return _tar([_file(f"sys/m/{i}") for i in range(count)])


def _escape_then_write(outside: Path) -> bytes:
    """CVE-2025-4517's shape: a link out of the folder, then a file written through it."""
    return _tar(
        [
            _typed("sys/a", tarfile.SYMTYPE, linkname=str(outside)),
            _file("sys/a/pwned", b"owned\n"),
            _typed("sys/b", tarfile.SYMTYPE, linkname="../../../../../../" + str(outside).lstrip("/")),
            _file("sys/b/pwned2", b"owned\n"),
        ]
    )


@dataclass(frozen=True)
class HostileSnapshot:
    name: str
    attack: str
    make: Callable[[Path], bytes]  # (a folder outside) -> the file's bytes
    refusal: str  # a part of the error message


SNAPSHOTS = [
    HostileSnapshot(
        "absolute-name", "a member named /etc/x", lambda o: _tar([_file("/etc/pwned")]), "plain path"
    ),
    HostileSnapshot(
        "dotdot-name", "a member climbing out", lambda o: _tar([_file("sys/../../x")]), "plain path"
    ),
    HostileSnapshot(
        "not-sys", "a member outside sys/ and proc/", lambda o: _tar([_file("etc/x")]), "plain path"
    ),
    HostileSnapshot(
        "hard-link",
        "a hard link to a host file",
        lambda o: _tar([_typed("sys/h", tarfile.LNKTYPE, linkname="/etc/shadow")]),
        "a hard link",
    ),
    HostileSnapshot(
        "fifo", "a FIFO member", lambda o: _tar([_typed("sys/f", tarfile.FIFOTYPE)]), "special file"
    ),
    HostileSnapshot(
        "char-device",
        "a character device member",
        lambda o: _tar([_typed("sys/zero", tarfile.CHRTYPE, devmajor=1, devminor=5)]),
        "special file",
    ),
    HostileSnapshot(
        "sparse",
        "a GNU sparse member",
        lambda o: _tar([_typed("sys/s", tarfile.GNUTYPE_SPARSE)]),
        "sparse",
    ),
    HostileSnapshot(
        "declared-huge", "a 2 GiB config declared in the header", lambda o: _declared_huge(), "never writes"
    ),
    HostileSnapshot("bomb", "300 MB of zeros in a small gzip", lambda o: _bomb(), "never writes"),
    HostileSnapshot(
        "duplicate", "one name twice", lambda o: _tar([_file("sys/x"), _file("sys/x")]), "appears twice"
    ),
    HostileSnapshot("truncated", "a snapshot cut short", lambda o: _many_members(50)[:300], "cut short"),
    HostileSnapshot("not-gzip", "text", lambda o: b"hello, not a tarball\n" * 30, "not a readable snapshot"),
    HostileSnapshot("empty", "an empty tarball", lambda o: _tar([]), "holds nothing"),
    HostileSnapshot(
        "link-target-nul",
        "a link target with a NUL",
        lambda o: _tar([_typed("sys/l", tarfile.SYMTYPE, linkname="a" * 5000)]),
        "malformed link",
    ),
]

# Accepted, but must write nothing outside and read nothing of the host.
ESCAPES = {"escape-then-write": _escape_then_write}

TREES_BY_NAME = {case.name: case for case in TREES}
