"""What a running Linux kernel says beyond the topology: pure values for the audit.

Filled by ``pciguard.platforms.linux`` (from sysfs, /proc and ACPI tables) or by the
``lspci`` reader; judged by ``pciguard.report``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pciguard.model.host import Feature
from pciguard.model.pci import Bdf


def printable(text: str) -> str:
    """``text`` as it can safely be shown or written to JSON: control characters, and
    bytes that were not UTF-8 (kept by the file system as surrogates), as escapes."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        code = ord(char)
        if char.isprintable():
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's escape for a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


VFIO_PCI = "vfio-pci"
# Drivers that hold a device without driving it: its DMA stays where its group's
# default domain puts it, and nothing programs it.
PCIBACK = "pciback"  # Xen's: offers a device to guests and, while Xen quarantines, leaves it with DOMID_IO
QUARANTINE_DRIVERS = frozenset({VFIO_PCI, "pci-stub", PCIBACK})


@dataclass(frozen=True)
class Unreadable:
    """Something the audit could not read, and what that hides from the report."""

    path: str
    why: str
    hides: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", printable(self.path))


@dataclass(frozen=True)
class InputProblem:
    """Input that is there but malformed; the audit carries on without it."""

    path: str
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", printable(self.path))
        object.__setattr__(self, "message", printable(self.message))


class XenQuarantine(StrEnum):
    """Where Xen puts a device that is assignable but with no guest (``iommu=`` options)."""

    NONE = "none"  # back with dom0 (before Xen 4.12.2/4.13, or iommu=no-quarantine)
    BASIC = "basic"  # DOMID_IO with nothing mapped: its DMA faults
    SCRATCH_PAGE = "scratch-page"  # DOMID_IO with every address on one scratch page


@dataclass(frozen=True)
class XenFacts:
    """What the hypervisor says to its dom0 (``xl info``, ``xl dmesg``, Xen's command
    line, xen-pciback), for a host whose kernel sees no IOMMU of its own."""

    version: str | None  # xen_version
    commandline: str
    iommu_vendor: str | None  # "Intel VT-d" or "AMD-Vi", from the boot messages
    dma_remapping: Feature  # "I/O virtualisation enabled"
    interrupt_remapping: Feature
    dom0_mode: str | None  # Relaxed, Strict or Passthrough
    quarantine: XenQuarantine | None  # None: the evidence does not say
    directio: frozenset[str] = frozenset()  # virt_caps: hvm_directio, pv_directio
    assignable: tuple[Bdf, ...] = ()  # xl pci-assignable-list
    permissive: tuple[str, ...] = ()  # pciback lets guests write these devices' config space
    boot_log_complete: bool = True  # False: the console ring lost the boot messages
    # The devices pciguard's journal says it made assignable or gave to a guest: the only
    # record that `xl pci-assignable-add` moved one into DOMID_IO (xen-pciback holding a
    # device does not). None: the journal was not read.
    made_assignable: frozenset[Bdf] | None = None


@dataclass(frozen=True)
class ThunderboltDomain:
    name: str
    security: str | None  # none, user, secure, dponly, usbonly, nopcie
    iommu_dma_protection: bool | None


@dataclass(frozen=True)
class ThunderboltDevice:
    name: str
    vendor_name: str
    device_name: str
    authorized: bool | None
    unique_id: str = ""


@dataclass(frozen=True)
class KernelFacts:
    source_kind: str = "sysfs"  # sysfs, snapshot, lspci
    release: str | None = None
    iommu_switches: tuple[str, ...] = ()  # IOMMU-related words of the kernel command line
    firmware_table: str | None = None  # DMAR, IVRS, or None when there is none (or unreadable)
    firmware_units: int = 0  # remapping units the firmware table describes
    firmware_flags: tuple[str, ...] = ()  # DMAR flags by name
    preboot_dma_protection: bool | None = None
    interrupt_remapping_in_use: bool | None = None  # None: could not tell
    kernel_unsafe: tuple[str, ...] = ()  # unsafe switches the kernel has in force
    thunderbolt_domains: tuple[ThunderboltDomain, ...] = ()
    thunderbolt_devices: tuple[ThunderboltDevice, ...] = ()
    driver_overrides: Mapping[Bdf, str] = field(default_factory=dict)
    unreadable: tuple[Unreadable, ...] = ()
    problems: tuple[InputProblem, ...] = ()
    xen: XenFacts | None = None  # a Xen dom0: the hypervisor's evidence, not the kernel's
    topology_complete: bool = True  # False: capabilities unseen, so derived groups are guesses
