"""A Xen dom0 as a fake tree, with recorded ``xl`` output (tests/corpus/xen), and a fake ``xl``."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import CORPUS
from pciguard.platforms.xen.platform import Ran

XEN = CORPUS / "xen"
STATE = "fake-xl.json"  # what the fake xl knows (domains, attachments), kept in the tree
QUESTIONS = ("list", "pci-list", "info", "dmesg", "pci-assignable-list")  # xl calls that change nothing


def text(name: str) -> str:
    return (XEN / name).read_text()


def dom0(tree: Callable[..., Path], info: str, dmesg: str) -> Path:
    """The workstation as a PV dom0 sees it: no IOMMU groups, no IOMMU class, the DMAR
    table under another name; with the hypervisor's words recorded under xen/."""
    root = tree("workstation")
    shutil.rmtree(root / "sys/kernel/iommu_groups")
    shutil.rmtree(root / "sys/class/iommu", ignore_errors=True)
    for link in (root / "sys/bus/pci/devices").iterdir():
        (link / "iommu_group").unlink(missing_ok=True)
    tables = root / "sys/firmware/acpi/tables"
    data = (tables / "DMAR").read_bytes()
    (tables / "DMAR").unlink()
    (tables / "RMAD").write_bytes(b"RMAD" + data[4:])  # Xen's copy, hidden from Linux's driver
    (root / "sys/hypervisor").mkdir(parents=True, exist_ok=True)
    (root / "sys/hypervisor/type").write_text("xen\n")
    (root / "proc/xen").mkdir(parents=True, exist_ok=True)
    (root / "proc/xen/capabilities").write_text("control_d\n")
    (root / "xen").mkdir()
    (root / "xen/xl-info").write_text(text(info))
    (root / "xen/xl-dmesg").write_text(text(dmesg))
    return root


@dataclass
class FakeXl:
    """``xl`` as a dom0 would answer it, acting on the fake tree: pci-assignable-add binds
    pciback, pci-assignable-remove unbinds it, pci-attach/-detach move the device between
    a domain and pciback. ``fail`` names a subcommand that fails."""

    root: Path
    domains: dict[str, str | None] = field(default_factory=lambda: {"vm1": "enabled", "old": None})
    ran: list[tuple[str, ...]] = field(default_factory=list)
    attached: dict[str, str] = field(default_factory=dict)
    fail: str | None = None

    def __call__(self, argv: tuple[str, ...]) -> Ran:
        self.ran.append(argv)
        command, *args = argv[1:]
        if command == self.fail:
            return Ran(1, "", f"libxl: error: {command} failed")
        if command == "list":
            listed = [{"domid": 0, "config": {"c_info": {"name": "Domain-0"}}}]
            for i, (name, passthrough) in enumerate(self.domains.items(), 1):
                c_info = {"name": name, **({"passthrough": passthrough} if passthrough else {})}
                listed.append({"domid": i, "config": {"c_info": c_info}})
            return Ran(0, json.dumps(listed), "")
        if command == "pci-assignable-add":
            self._bind(args[0], "pciback")
        elif command == "pci-assignable-remove":
            (self.root / "sys/bus/pci/devices" / args[0] / "driver").unlink(missing_ok=True)
        elif command == "pci-attach":
            self.attached[args[1]] = args[0]
        elif command == "pci-detach":
            self.attached.pop(args[1], None)
        elif command == "pci-list":
            rows = [f"00.0 {bdf}" for bdf, domain in self.attached.items() if domain == args[0]]
            return Ran(0, "\n".join(["Vdev Device", *rows]) + "\n", "")
        elif command == "destroy":
            self.domains.pop(args[0], None)
        return Ran(0, "", "")

    def save(self) -> None:
        """Keep what xl knows in the tree, for another process (``load``)."""
        state = {"domains": self.domains, "attached": self.attached}
        (self.root / STATE).write_text(json.dumps(state))

    @classmethod
    def load(cls, root: Path) -> FakeXl:
        saved = root / STATE
        if not saved.exists():
            return cls(root)
        state = json.loads(saved.read_text())
        return cls(root, domains=state["domains"], attached=state["attached"])

    def _bind(self, bdf: str, driver: str) -> None:
        folder = self.root / "sys/bus/pci/drivers" / driver
        folder.mkdir(parents=True, exist_ok=True)
        link = self.root / "sys/bus/pci/devices" / bdf / "driver"
        link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(folder, link.resolve().parent), link)
