"""``pciguard snapshot``: pack exactly what an audit reads into a .tar.gz, so that
``pciguard audit --snapshot`` gives the same report on another machine.

Serial numbers stay behind: the Device Serial Number capability is zeroed in config
space, Thunderbolt unique IDs are left out, and of the kernel command line and mount
table only what the audit uses is kept.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from pciguard.errors import InputError
from pciguard.model.kernel import printable
from pciguard.platforms.linux.config import EXT_DSN, parse_config
from pciguard.platforms.linux.sysfs import IOMMU_SWITCHES, Fs, Reading, Tree, largest_file

SNAPSHOT_HOSTNAME = b"snapshot\n"


@dataclass(frozen=True)
class SnapshotSummary:
    path: Path
    files: int
    links: int
    functions: int
    scrubbed: list[str]


IOMMU_WORDS = ("iommu", "intremap", "no-intremap")  # Xen's switches a snapshot keeps


def _scrub(rel: str, data: bytes, scrubbed: list[str]) -> bytes | None:
    """The bytes to store for ``rel``; None to leave the file out."""
    if rel.endswith("/unique_id"):
        scrubbed.append(rel)
        return None
    if rel.endswith("/config"):
        dsn = parse_config(data).extended.get(EXT_DSN)
        if dsn is not None and dsn + 12 <= len(data):
            scrubbed.append(f"{rel} (device serial number)")
            return data[: dsn + 4] + bytes(8) + data[dsn + 12 :]
    if rel == "proc/cmdline":
        words = [w for w in data.decode("utf-8", "replace").split() if IOMMU_SWITCHES.match(w)]
        return (" ".join(words) + "\n").encode()
    if rel == "proc/self/mountinfo":
        root = [line for line in data.decode("utf-8", "replace").splitlines() if line.split()[4:5] == ["/"]]
        return ("\n".join(root[-1:]) + "\n").encode()
    if rel == "proc/sys/kernel/hostname":
        return SNAPSHOT_HOSTNAME
    if rel == "xen/xl-info":  # its host name, and no command line switch but the IOMMU's
        from pciguard.platforms.xen.evidence import parse_xl_info

        info = parse_xl_info(data.decode("utf-8", "replace"))
        if "host" in info:
            info["host"] = SNAPSHOT_HOSTNAME.decode().strip()
        words = info.get("xen_commandline", "").split()
        info["xen_commandline"] = " ".join(w for w in words if w.startswith(IOMMU_WORDS))
        return "".join(f"{key:<23}: {value}\n" for key, value in info.items()).encode()
    return data


def take_snapshot(root: str, out: Path) -> SnapshotSummary:
    from pciguard.platforms.xen.dom0 import read

    fs = Fs(root, record=True)
    reading = read(fs)
    assert fs.recorded is not None
    files = links = 0
    scrubbed: list[str] = []
    try:
        with tarfile.open(out, "w:gz") as tar:
            for rel, (kind, content) in sorted(fs.recorded.items()):
                info = tarfile.TarInfo(rel)
                info.mtime = 0
                if kind == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif kind == "link":
                    assert isinstance(content, str)
                    target = content
                    if os.path.isabs(target):  # keep the snapshot self-contained
                        target = os.path.relpath(target.lstrip("/"), os.path.dirname(rel))
                    info.type, info.linkname = tarfile.SYMTYPE, target
                    tar.addfile(info)
                    links += 1
                else:
                    assert isinstance(content, bytes)
                    data = _scrub(rel, content, scrubbed)
                    if data is None:
                        continue
                    info.size, info.mode = len(data), 0o444
                    tar.addfile(info, io.BytesIO(data))
                    files += 1
    except OSError as exc:
        raise InputError(str(out), f"cannot write the snapshot: {exc.strerror}") from None
    return SnapshotSummary(out, files, links, len(reading.host.topology), scrubbed)


# What a snapshot may hold. A real host of 10,000 functions packs into some 200,000
# members and 60 MB; anything larger is refused before it is unpacked.
MAX_MEMBERS = 500_000
MAX_CONTENT = 256 << 20  # the files' bytes, added up
MAX_STREAM = 1 << 30  # the uncompressed tar stream, headers included
_MEMBER = re.compile(r"^(sys|proc|xen)(/[^/\x00]+)*$")  # xen/: what xl said in a dom0


class SnapshotFs(Tree):
    """A snapshot held in memory: nothing is written to disk, so no member can land
    outside a folder, and links are resolved as in any other tree, inside it."""

    def __init__(self, entries: dict[str, tuple[str, bytes | str | None]]) -> None:
        super().__init__()
        self.entries = entries
        self.children: dict[str, set[str]] = {}
        for rel in list(entries):
            parent, _, name = rel.rpartition("/")
            while True:  # every folder on the way exists, as tar's own unpacking makes them
                self.children.setdefault(parent, set()).add(name)
                if not parent or parent in entries:
                    break
                entries[parent] = ("dir", None)
                parent, _, name = parent.rpartition("/")

    def _kind(self, real: str) -> str | None:
        if not real:
            return "dir"
        entry = self.entries.get(real)
        return None if entry is None else entry[0]

    def _target(self, real: str) -> str:
        target = self.entries[real][1]
        assert isinstance(target, str)
        return target

    def read_bytes(self, rel: str) -> bytes | None:
        path = self.real(rel)
        if path is None:
            return None
        kind, content = self.entries.get(path, ("dir", None))
        return content if kind == "file" and isinstance(content, bytes) else None

    def listdir(self, rel: str) -> list[str]:
        path = self._folder(rel.strip("/"), 0)
        return [] if path is None else sorted(self.children.get(path, ()))


class _Bounded(io.RawIOBase):
    """A stream that refuses to give more than ``limit`` bytes (a decompression bomb
    stops here, whatever tarfile asks for)."""

    def __init__(self, inner: io.BufferedIOBase | gzip.GzipFile, limit: int, source: str) -> None:
        self.inner, self.left, self.source = inner, limit, source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(min(len(buffer), self.left + 1))
        if len(data) > self.left:
            raise InputError(
                self.source, f"unpacks to more than {MAX_STREAM >> 20} MiB: not a pciguard snapshot"
            )
        self.left -= len(data)
        buffer[: len(data)] = data
        return len(data)


def _sparse(member: tarfile.TarInfo) -> bool:
    """GNU or PAX sparse, whether or not tarfile found any holes in its header."""
    return member.type == tarfile.GNUTYPE_SPARSE or member.sparse is not None


def load_snapshot(snapshot: Path) -> SnapshotFs:
    """The snapshot's members, checked one by one: regular files, folders and symbolic
    links under sys/ and proc/, each no larger than the kernel would make it; anything
    else (hard links, devices, FIFOs, sparse files, names with ``..``) is refused."""
    source = str(snapshot)
    entries: dict[str, tuple[str, bytes | str | None]] = {}
    content = 0
    try:
        with open(snapshot, "rb") as raw:
            head = raw.read(2)
            raw.seek(0)
            inner: io.BufferedIOBase | gzip.GzipFile = (
                gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
            )
            stream = io.BufferedReader(_Bounded(inner, MAX_STREAM, source), 1 << 16)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    name = member.name.rstrip("/")
                    where = f"member '{printable(name)[:200]}'"
                    if len(entries) >= MAX_MEMBERS:
                        raise InputError(source, f"more than {MAX_MEMBERS} members: not a pciguard snapshot")
                    if not _MEMBER.match(name) or any(p in (".", "..") for p in name.split("/")):
                        raise InputError(source, f"{where} is not a plain path under sys/ or proc/: refused")
                    if name in entries and entries[name][0] != "dir":
                        raise InputError(source, f"{where} appears twice: refused")
                    if member.isdir():
                        entries[name] = ("dir", None)
                    elif member.issym():
                        if "\x00" in member.linkname or len(member.linkname) > 4096:
                            raise InputError(source, f"{where}: a malformed link target: refused")
                        entries[name] = ("link", member.linkname)
                    elif member.isreg() and not _sparse(member):
                        limit = largest_file(name)
                        if member.size > limit:
                            raise InputError(
                                source,
                                f"{where} holds {member.size} bytes; the kernel never writes more than "
                                f"{limit} there: refused",
                            )
                        content += member.size
                        if content > MAX_CONTENT:
                            raise InputError(source, f"more than {MAX_CONTENT >> 20} MiB of files: refused")
                        data = tar.extractfile(member)
                        entries[name] = ("file", data.read() if data is not None else b"")
                    else:
                        kind = (
                            "a hard link"
                            if member.islnk()
                            else "a sparse file"
                            if _sparse(member)
                            else ("a device, FIFO or other special file")
                        )
                        raise InputError(
                            source, f"{where} is {kind}; a snapshot holds only files, folders and links"
                        )
    except FileNotFoundError:
        raise InputError(source, "no such file") from None
    except IsADirectoryError:
        raise InputError(source, "is a folder, not a snapshot file") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(
            source, f"not a readable snapshot (.tar.gz), or cut short: {exc or type(exc).__name__}"
        ) from None
    except OSError as exc:
        raise InputError(source, f"cannot read: {exc.strerror or exc}") from None
    if not entries:
        raise InputError(source, "holds nothing: not a pciguard snapshot")
    return SnapshotFs(entries)


def read_snapshot(snapshot: Path) -> Reading:
    from pciguard.platforms.xen.dom0 import read

    return read(load_snapshot(snapshot))
