"""`pciguard snapshot` packs what the audit reads; the report from it is the same."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import audit_reading
from fakesys import DSN_SERIAL
from pciguard.errors import InputError
from pciguard.platforms.linux import read_host
from pciguard.platforms.linux.snapshot import read_snapshot, take_snapshot


def test_a_snapshot_gives_the_same_report(tree: Callable[..., Path], tmp_path: Path) -> None:
    root = tree("workstation", thunderbolt={"security": "user", "iommu_dma_protection": "1"})
    summary = take_snapshot(str(root), tmp_path / "snap.tar.gz")
    direct, packed = audit_reading(read_host(str(root))), audit_reading(read_snapshot(summary.path))
    assert packed.groups == direct.groups
    assert packed.findings == direct.findings
    assert packed.limitations == direct.limitations
    assert summary.functions == len(read_host(str(root)).host.topology)


def test_a_snapshot_carries_no_serial_numbers(tree: Callable[..., Path], tmp_path: Path) -> None:
    root = tree("server", cmdline="root=UUID=1234-abcd intel_iommu=on quiet")
    (root / "sys/bus/thunderbolt/devices").mkdir(parents=True)
    device = root / "sys/devices/tb/0-1"
    device.mkdir(parents=True)
    (device / "unique_id").write_text("dead-beef-serial\n")
    (device / "authorized").write_text("0\n")
    (root / "sys/bus/thunderbolt/devices/0-1").symlink_to("../../../devices/tb/0-1")
    serial = DSN_SERIAL.to_bytes(8, "little")
    assert serial in (root / "sys/devices/pci0000:00/0000:00:01.0/config").read_bytes()
    summary = take_snapshot(str(root), tmp_path / "snap.tar.gz")
    with tarfile.open(summary.path) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert not any(serial in data for data in blobs.values())
    assert not any(name.endswith("unique_id") for name in blobs)
    assert blobs["proc/cmdline"] == b"intel_iommu=on\n"
    assert read_snapshot(summary.path).facts.thunderbolt_devices[0].authorized is False


def _tarball(path: Path, name: str, data: bytes = b"x", link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("not a tarball"), "not a readable snapshot"),
        (lambda p: _tarball(p, "etc/shadow"), "not a plain path under sys/ or proc/"),
        (lambda p: _tarball(p, "sys/../../evil"), "not a plain path under sys/ or proc/"),
    ],
)
def test_bad_snapshots_are_refused_by_name(
    tmp_path: Path, make: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "bad.tar.gz"
    make(path)
    with pytest.raises(InputError, match=message) as info:
        read_snapshot(path)
    assert str(path) in str(info.value)
