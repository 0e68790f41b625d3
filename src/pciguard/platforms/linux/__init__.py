"""Real Linux hosts: ``sysfs`` reads them (the only module that touches /sys);
``config`` and ``acpi`` decode what it reads, without I/O."""

from pciguard.platforms.linux.sysfs import Fs, Reading, read_host

__all__ = ["Fs", "Reading", "read_host"]
