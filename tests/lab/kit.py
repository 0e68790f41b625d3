"""What the lab needs on the host, fetched and built once into a cache folder.

- Debian's ``qemu-system-x86`` and ``busybox-static`` (installed with apt-get when
  running as root and missing);
- a Debian kernel package, downloaded with ``apt-get download`` and unpacked, never
  installed; its bzImage is decompressed to the ELF ``vmlinux`` that QEMU boots directly
  (PVH), which skips the kernel's own decompression under emulation;
- an initramfs: static busybox, the kernel modules the guest loads (with every
  dependency named in their ``.modinfo``, in load order) and ``guest/init``;
- for the Xen machines: Debian's Xen hypervisor and tools, downloaded and unpacked,
  never installed (the hypervisor gunzipped to the multiboot ELF QEMU boots; the tools
  run in dom0 from the unpacked tree), and a dom0 initramfs with Xen's modules.

Nothing here is pciguard: it is the bench the real-kernel tests stand on.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PACKAGES = {"qemu-system-x86": "qemu-system-x86_64", "busybox-static": "busybox"}
# Loaded in the guest, in this order after their dependencies.
MODULES = ("9pnet_virtio", "9p", "virtio_pci", "vfio_pci", "vfio_iommu_type1", "e1000e")
# A PV dom0's: the 9p shares, and what Xen's tools need (/proc/xen, privcmd, event
# channels, grants) and xen-pciback.
DOM0_MODULES = (
    "9pnet_virtio",
    "9p",
    "virtio_pci",
    "xen_evtchn",
    "xenfs",
    "xen_privcmd",
    "xen_gntdev",
    "xen_gntalloc",
    "xen_pciback",
    "e1000e",  # after xen_pciback: pciback is offered a new device first, as a dom0 should have it
)
XEN_VERSION = "4.17"
XEN_PACKAGES = (
    f"xen-hypervisor-{XEN_VERSION}-amd64",
    f"xen-utils-{XEN_VERSION}",
    "xen-utils-common",
    f"libxenmisc{XEN_VERSION}",
    "libxencall1",
    "libxendevicemodel1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenhypfs1",
    "libxenstore4",
    "libxentoolcore1",
    "libxentoollog1",
    "libyajl2",
)
GUEST = Path(__file__).resolve().parent / "guest"
XZ_MAGIC = b"\xfd7zXZ\x00"


class LabUnavailable(Exception):
    """The lab cannot run on this machine; the message says what is missing."""


@dataclass(frozen=True)
class Kit:
    qemu: Path
    vmlinux: Path
    initramfs: Path
    kernel_version: str
    xen: Path  # the hypervisor, a multiboot ELF
    xen_tools: Path  # the unpacked Xen packages: usr/lib/xen-4.17/bin, usr/lib/x86_64-linux-gnu
    dom0_initramfs: Path


def cache_dir() -> Path:
    return Path(os.environ.get("PCIGUARD_LAB_CACHE", Path.home() / ".cache" / "pciguard-lab"))


def _run(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LabUnavailable(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def install_packages() -> None:
    missing = [pkg for pkg, command in PACKAGES.items() if shutil.which(command) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise LabUnavailable(f"the lab needs Debian packages {', '.join(missing)}; install them as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(argv, env=env, capture_output=True).returncode != 0:
        _run("apt-get", "update", "-q")
        _run(*argv)


def kernel_package() -> str:
    """The versioned kernel package ``linux-image-amd64`` currently points at."""
    depends = _run("apt-cache", "depends", "linux-image-amd64")
    found = re.findall(r"Depends: (linux-image-[0-9][^\s]*-amd64)", depends)
    if not found:
        raise LabUnavailable("apt-cache names no kernel package for linux-image-amd64")
    return found[0]


@contextmanager
def unpacked_kernel(package: str, scratch_parent: Path) -> Iterator[Path]:
    """The kernel package downloaded and unpacked into a scratch folder, removed afterwards."""
    with tempfile.TemporaryDirectory(dir=scratch_parent) as scratch:
        _run("apt-get", "download", package, cwd=Path(scratch))
        (deb,) = Path(scratch).glob("*.deb")
        root = Path(scratch) / "unpacked"
        _run("dpkg-deb", "-x", str(deb), str(root))
        yield root


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    data = vmlinuz.read_bytes()
    start = data.find(XZ_MAGIC)
    if start < 0:
        raise LabUnavailable(f"{vmlinuz}: no xz-compressed kernel inside")
    elf = lzma.LZMADecompressor().decompress(data[start:])
    if not elf.startswith(b"\x7fELF"):
        raise LabUnavailable(f"{vmlinuz}: decompressed kernel is not an ELF file")
    _write_atomically(out, elf)


def module_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files for ``wanted`` and their dependencies, dependencies first."""
    by_name = {p.stem.replace("-", "_"): p for p in modules_dir.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str) -> None:
        path = by_name.get(name)
        if path is None:
            raise LabUnavailable(f"kernel module {name} is not in {modules_dir}")
        if path in order:
            return
        depends = re.search(rb"\x00depends=([^\x00]*)\x00", path.read_bytes())
        for dep in filter(None, (depends.group(1).decode() if depends else "").split(",")):
            visit(dep.replace("-", "_"))
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def build_initramfs(kernel_root: Path, version: str, out: Path, wanted: tuple[str, ...] = MODULES) -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None
    with tempfile.TemporaryDirectory() as scratch:
        stage = Path(scratch)
        for folder in ("bin", "proc", "sys", "dev", "host", "out", "modules"):
            (stage / folder).mkdir()
        shutil.copy(busybox, stage / "bin" / "busybox")
        modules = module_load_order(kernel_root / "lib" / "modules" / version / "kernel", wanted)
        for path in modules:
            shutil.copy(path, stage / "modules" / path.name)
        (stage / "modules" / "order").write_text("".join(f"{p.name}\n" for p in modules))
        shutil.copy(GUEST / "init", stage / "init")
        (stage / "init").chmod(0o755)
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        archive = subprocess.run(
            [busybox, "cpio", "-o", "-H", "newc", "-R", "0:0"],
            cwd=stage,
            input="".join(f"{name}\n" for name in names).encode(),
            capture_output=True,
        )
        if archive.returncode != 0:
            raise LabUnavailable(f"busybox cpio failed: {archive.stderr.decode()[-300:]}")
        _write_atomically(out, archive.stdout)


def _write_atomically(path: Path, data: bytes) -> None:
    """Two lab runs may build the same cache file; neither sees a half-written one."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.rename(path)


def prepare() -> Kit:
    """Everything the lab needs; built once per kernel release, then reused from the cache."""
    install_packages()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    init = (GUEST / "init").read_bytes()
    init_hash = hashlib.sha256(init + ",".join(MODULES).encode()).hexdigest()[:12]
    dom0_hash = hashlib.sha256(init + ",".join(DOM0_MODULES).encode()).hexdigest()[:12]
    vmlinux = cache / f"vmlinux-{version}"
    initramfs = cache / f"initramfs-{version}-{init_hash}.cpio"
    dom0_initramfs = cache / f"dom0-initramfs-{version}-{dom0_hash}.cpio"
    if not (vmlinux.exists() and initramfs.exists() and dom0_initramfs.exists()):
        with unpacked_kernel(package, cache) as root:
            if not vmlinux.exists():
                extract_vmlinux(root / "boot" / f"vmlinuz-{version}", vmlinux)
            if not initramfs.exists():
                build_initramfs(root, version, initramfs)
            if not dom0_initramfs.exists():
                build_initramfs(root, version, dom0_initramfs, DOM0_MODULES)
    xen, tools = xen_kit(cache)
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    return Kit(Path(qemu), vmlinux, initramfs, version, xen, tools, dom0_initramfs)


def xen_kit(cache: Path) -> tuple[Path, Path]:
    """Debian's Xen, unpacked once into the cache: the hypervisor's ELF and the tools."""
    tools = cache / f"xen-{XEN_VERSION}"
    xen = cache / f"xen-{XEN_VERSION}.elf"
    if xen.exists() and (tools / "done").exists():
        return xen, tools
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        _run("apt-get", "download", *XEN_PACKAGES, cwd=Path(scratch))
        unpacked = Path(scratch) / "root"
        for deb in sorted(Path(scratch).glob("*.deb")):
            _run("dpkg-deb", "-x", str(deb), str(unpacked))
        (image,) = unpacked.glob(f"boot/xen-{XEN_VERSION}*-amd64.gz")
        _write_atomically(xen, gzip.decompress(image.read_bytes()))
        shutil.rmtree(tools, ignore_errors=True)
        unpacked.rename(tools)
        (tools / "done").touch()
    return xen, tools
