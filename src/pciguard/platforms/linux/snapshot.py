"""``pciguard snapshot``: pack exactly what an audit reads into a .tar.gz, so that
``pciguard audit --snapshot`` gives the same report on another machine.

Serial numbers stay behind: the Device Serial Number capability is zeroed in config
space, Thunderbolt unique IDs are left out, and of the kernel command line and mount
table only what the audit uses is kept.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pciguard.errors import InputError
from pciguard.platforms.linux.config import EXT_DSN, parse_config
from pciguard.platforms.linux.sysfs import IOMMU_SWITCHES, Fs, Reading, read_host

SNAPSHOT_HOSTNAME = b"snapshot\n"


@dataclass(frozen=True)
class SnapshotSummary:
    path: Path
    files: int
    links: int
    functions: int
    scrubbed: list[str]


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
    return data


def take_snapshot(root: str, out: Path) -> SnapshotSummary:
    fs = Fs(root, record=True)
    reading = read_host(fs=fs)
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


_MEMBER = re.compile(r"^(sys|proc)/")


@contextmanager
def unpacked(snapshot: Path) -> Iterator[str]:
    """The snapshot unpacked into a temporary root (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="pciguard-snapshot-") as root:
        try:
            with tarfile.open(snapshot, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    if not _MEMBER.match(member.name):
                        raise InputError(
                            str(snapshot),
                            f"member '{member.name}' is not under sys/ or proc/: not a pciguard snapshot",
                        )
                tar.extractall(root, members=members, filter="data")
        except FileNotFoundError:
            raise InputError(str(snapshot), "no such file") from None
        except tarfile.TarError as exc:
            raise InputError(str(snapshot), f"not a readable snapshot (.tar.gz): {exc}") from None
        except OSError as exc:
            raise InputError(str(snapshot), f"cannot unpack: {exc.strerror or exc}") from None
        yield root


def read_snapshot(snapshot: Path) -> Reading:
    with unpacked(snapshot) as root:
        return read_host(root)
