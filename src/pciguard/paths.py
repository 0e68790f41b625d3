"""Where pciguard keeps what it records on a host. Apart from the journal that uses it,
so that a command's options can name it without importing the Linux platform."""

from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/pciguard")
