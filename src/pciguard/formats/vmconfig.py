"""What to put in a VM's configuration for devices pciguard assigned: libvirt's
``<hostdev>`` and Xen xl.cfg's ``pci =`` line. Pure text."""

from __future__ import annotations

from collections.abc import Sequence

from pciguard.model import Bdf


def libvirt_hostdev(device: Bdf) -> str:
    """``managed='no'``: pciguard, not libvirt, binds and unbinds the device."""
    return (
        "<hostdev mode='subsystem' type='pci' managed='no'>\n"
        "  <driver name='vfio'/>\n"
        "  <source>\n"
        f"    <address domain='0x{device.segment:04x}' bus='0x{device.bus:02x}' "
        f"slot='0x{device.device:02x}' function='0x{device.function:x}'/>\n"
        "  </source>\n"
        "</hostdev>"
    )


def xl_pci(devices: Sequence[Bdf]) -> str:
    return "pci = [ " + ", ".join(f"'{d}'" for d in devices) + " ]"
