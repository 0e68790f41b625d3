"""`pciguard audit --lspci`: hosts from the text of `lspci -vvv`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from conftest import CORPUS, audit_reading, bdf
from fakesys import render
from pciguard.errors import InputError
from pciguard.formats.lspci import parse_lspci
from pciguard.formats.platform_file import build_host
from pciguard.model import Feature, Host
from strategies import platform_file

LSPCI = shutil.which("lspci")
needs_lspci = pytest.mark.skipif(LSPCI is None, reason="pciutils is not installed (.ci/run installs it)")


def lspci_of(root: Path, *flags: str) -> str:
    assert LSPCI is not None
    command = [LSPCI, "-vvv", *flags, "-A", "linux-sysfs", "-O", f"sysfs.path={root}/sys/bus/pci"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def shown_by_lspci(host: Host) -> dict[str, Any]:
    """lspci prints FLR support for endpoints only."""
    return {
        str(b): (
            f.kind,
            f.parent,
            f.ids,
            f.acs,
            f.phantom_functions,
            f.physfn,
            f.driver,
            "flr" in f.reset_methods and not f.kind.is_bridge,
        )
        for b, f in host.topology.items()
    }


@needs_lspci
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)
@given(spec=platform_file())
def test_real_lspci_output_of_a_rendered_host_reads_back(spec: dict[str, Any]) -> None:
    host = build_host(spec, {}, "<random>")
    with TemporaryDirectory() as tmp:
        render(host, Path(tmp))
        text = lspci_of(Path(tmp), "-nn", "-D")
    reading = parse_lspci(text, "dump")
    assert shown_by_lspci(reading.host) == shown_by_lspci(host)
    if any(u.dma_remapping is Feature.ENABLED for u in host.iommus):
        kernel = {frozenset(g.members) for g in reading.host.kernel_groups or ()}
        assert kernel == {frozenset(g.members) for g in host.derived_groups}


@needs_lspci
def test_without_domains_or_ids_the_dump_still_reads(tree: Any) -> None:
    text = lspci_of(tree("server"))
    reading = parse_lspci(text, "dump")
    assert set(reading.host.topology) == set(build_host_from("server").topology)
    assert any("-nn" in u.why for u in reading.facts.unreadable)


def build_host_from(name: str) -> Host:
    from conftest import example

    return example(name)


def test_a_forum_paste_by_an_ordinary_user() -> None:
    path = CORPUS / "lspci" / "forum-non-root.txt"
    reading = parse_lspci(path.read_text(), str(path))
    host = reading.host
    assert host.topology[bdf("0000:01:00.0")].parent == bdf("0000:00:01.0")
    assert host.topology[bdf("0000:00:01.0")].kind.is_bridge
    gpu_group = host.group_of(bdf("0000:01:00.0"))
    assert set(gpu_group.members) == {bdf("0000:00:01.0"), bdf("0000:01:00.0"), bdf("0000:01:00.1")}
    assert any("not run as root" in u.why for u in reading.facts.unreadable)
    assert not reading.facts.topology_complete
    report = audit_reading(reading)
    group = next(g for g in report.groups if g.number == 1)
    assert group.verdict == "not-assignable"  # interrupt remapping cannot be seen: fail closed
    assert {m.state for m in group.members if m.bdf == "0000:01:00.0"} == {"quarantined"}
    assert not any(n.code == "groups-differ" for g in report.groups for n in g.notes)


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("", "no device entries", 1),
        ("hello world\n", "not a device line", 1),
        ("\tIOMMU group: 3\n", "outside any device entry", 1),
        ("00:01.0 Ethernet controller: X\n\n00:01.0 Ethernet controller: Y\n", "appears twice", 3),
        (
            "00:1f.0 Ethernet controller: X\n\n03:00.0 PCI bridge: Y\n\tBus: primary=03, secondary=03, x\n",
            "",
            0,
        ),
    ],
)
def test_bad_dumps_name_the_line(text: str, message: str, line: int) -> None:
    if not message:  # a bridge claiming its own bus: read without looping
        parse_lspci(text, "dump.txt")
        return
    with pytest.raises(InputError, match=message) as info:
        parse_lspci(text, "dump.txt")
    assert info.value.line == line and "dump.txt" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        (
            "00:02.0 VGA compatible controller [0300]: Intel [8086:3e92]\n\tIOMMU group: x\n",
            "names no group",
            2,
        ),
        (
            "00:02.0 VGA compatible controller [0300]: Intel [8086:3e92]\n\tIOMMU group: ²\n",
            "names no group",
            2,
        ),
        (
            "123456789:00:02.0 VGA compatible controller [0300]: Intel [8086:3e92]\n",
            "not a device line",
            1,
        ),
        (  # lspci -v: the group number at the end of the Flags line
            "00:02.0 VGA compatible controller [0300]: Intel [8086:3e92]\n"
            "\tFlags: bus master, fast devsel, latency 0, IOMMU group 9999999999\n",
            "names no group",
            2,
        ),
    ],
)
def test_malformed_dumps_name_the_line(text: str, message: str, line: int) -> None:
    with pytest.raises(InputError, match=message) as info:
        parse_lspci(text, "dump.txt")
    assert info.value.line == line


def test_domains_beyond_four_hex_digits_are_kept_whole() -> None:
    """Linux numbers VMD domains from 10000: truncating them made 0000:e0:17.0 out of 10000:e0:17.0."""
    reading = parse_lspci("10000:e0:17.0 SATA controller [0106]: Intel Corporation Device [8086:a0d3]\n")
    assert [str(b) for b in reading.host.topology] == ["10000:e0:17.0"]


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (
            "00:17.0 SATA controller: Intel Corporation Comet Lake SATA AHCI Controller"
            " (prog-if 01 [AHCI 1.0])",
            "Intel Corporation Comet Lake SATA AHCI Controller",
        ),
        (
            "00:14.0 USB controller [0c03]: Intel Corporation Device [8086:a3af] (prog-if 30 [XHCI])",
            "Intel Corporation Device 8086:a3af",
        ),
        (
            "01:00.0 VGA compatible controller [0300]: NVIDIA Corporation TU116 [10de:2182] (rev a1)"
            " (prog-if 00 [VGA controller])",
            "NVIDIA Corporation TU116",
        ),
    ],
)
def test_names_lose_the_programming_interface_and_keep_ids_where_pci_ids_had_no_name(
    header: str, name: str
) -> None:
    (fn,) = parse_lspci(header + "\n").host.topology.values()
    assert fn.name == name


def test_control_characters_in_a_dump_never_reach_the_terminal() -> None:
    reading = parse_lspci("00:02.0 VGA compatible controller [0300]: Evil \x1b[2J Inc [8086:3e92]\n")
    name = reading.host.topology[bdf("0000:00:02.0")].name
    assert "\x1b" not in name and "\\x1b" in name


def test_a_dump_on_stdin_that_is_not_utf8_is_a_clear_error() -> None:
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "pciguard", "audit", "--lspci", "-", "--json"],
        input=b"00:02.0 VGA compatible controller [0300]: Intel \xff\xfe [8086:3e92]\n",
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 2 and b"not UTF-8" in run.stderr and b"Traceback" not in run.stderr


PLAIN = (
    "00:1c.4 PCI bridge [0604]: Intel Corporation Root Port [8086:a33c]\n"
    "\tBus: primary=00, secondary=07, subordinate=08, sec-latency=0\n"
    "\tIOMMU group: 9\n"
    "\n"
    "07:00.0 USB controller [0c03]: ASMedia Technology Inc. USB 3.1 [1b21:2142]\n"
    "\tIOMMU group: 10\n"
)


def _same_devices(text: str) -> None:
    reading = parse_lspci(text, "pasted.txt")
    assert [str(b) for b in reading.host.topology] == ["0000:00:1c.4", "0000:07:00.0"]
    assert [g.members for g in reading.host.kernel_groups or ()] == [
        (bdf("0000:00:1c.4"),),
        (bdf("0000:07:00.0"),),
    ]


@pytest.mark.parametrize(
    "dialect",
    [
        pytest.param(lambda t: t.replace("\n", "\r\n"), id="crlf"),
        pytest.param(lambda t: "".join(f"> {line}\n" for line in t.splitlines()), id="mail-quoted"),
        pytest.param(lambda t: "".join(f">> {line}\n" for line in t.splitlines()), id="quoted-twice"),
        pytest.param(lambda t: "$ sudo lspci -nnvvv\n" + t + "\nuser@host:~$\n", id="shell-prompt"),
        pytest.param(
            lambda t: t.replace(
                "\n\n07:00.0",
                "\n00: 86 80 3c a3 07 04 10 00 f0 00 04 06 10 00 81 00\n"
                "pcilib: sysfs_read_vpd: read failed: Input/output error\n\n07:00.0",
            ),
            id="hex-dump-and-pcilib-warning",
        ),
        pytest.param(lambda t: t.replace("07:00.0 USB", "00:1c.4/07:00.0 USB"), id="lspci-PP-path"),
        pytest.param(
            lambda t: re.sub(
                r"\tIOMMU group: (\d+)", r"\tFlags: bus master, fast devsel, latency 0, IOMMU group \1", t
            ),
            id="lspci-v-flags",
        ),
        pytest.param(
            lambda t: t.replace("00:1c.4 PCI", "0000:00:1c.4 PCI").replace(
                "07:00.0 USB", "0000:00:1c.4/07:00.0 USB"
            ),
            id="lspci-PP-D",
        ),
    ],
)
def test_every_pasted_dialect_reads_the_same_devices(dialect: Any) -> None:
    _same_devices(dialect(PLAIN))


def test_text_around_a_dump_is_named_and_the_rest_audited() -> None:
    reading = parse_lspci("Here is my lspci:\n" + PLAIN + "\nthanks!\n", "mail.txt")
    named = [f"{p.path} {p.message}" for p in reading.facts.problems]
    assert any(n.startswith("mail.txt:1 'Here is my lspci:'") for n in named), named
    assert any("thanks!" in n for n in named) and len(reading.host.topology) == 2


ROOT_DUMP = """\
00:00.0 Host bridge [0600]: Intel Corporation Device [8086:3ec2] (rev 07)
\tIOMMU group: 0
\tKernel driver in use: skl_uncore

00:14.0 USB controller [0c03]: Intel Corporation Device [8086:a36d] (rev 10) (prog-if 30 [XHCI])
\tIOMMU group: 1
\tCapabilities: [70] Power Management version 2
\tKernel driver in use: xhci_hcd
"""


def finding_codes(text: str) -> set[str]:
    return {f.code for f in audit_reading(parse_lspci(text)).findings}


def test_a_root_dump_with_a_host_bridge_is_complete_and_its_groups_are_compared() -> None:
    """The host bridge has no PCI Express capability; that hides nothing."""
    assert parse_lspci(ROOT_DUMP).facts.topology_complete
    assert "derivation-skipped" not in finding_codes(ROOT_DUMP)
    hidden = ROOT_DUMP.replace(
        "\tCapabilities: [70] Power Management version 2", "\tCapabilities: <access denied>"
    )
    assert "derivation-skipped" in finding_codes(hidden)


def test_a_dump_says_what_it_cannot_show_and_names_nothing_it_did_not_read() -> None:
    report = audit_reading(parse_lspci(ROOT_DUMP))
    text = " ".join(f.message for f in report.findings)
    assert "/proc/interrupts" not in text and "an lspci dump cannot show whether interrupt remapping" in text
    without_groups = audit_reading(
        parse_lspci(ROOT_DUMP.replace("\tIOMMU group: 0\n", "").replace("\tIOMMU group: 1\n", ""))
    )
    codes = {f.code for f in without_groups.findings}
    assert "no-groups-in-dump" in codes and "no-firmware-iommu" not in codes
    assert not any("enable VT-d" in f.message for f in without_groups.findings)


def group_sets(report: Any) -> set[frozenset[str]]:
    return {frozenset(m.bdf for m in g.members) for g in report.groups}


@needs_lspci
def test_a_dump_without_group_lines_plans_the_groups_the_kernel_made(tree: Any) -> None:
    dump = lspci_of(tree("workstation"), "-nn", "-D")
    truth = audit_reading(parse_lspci(dump))
    assert not any(g.planned for g in truth.groups) and "planning" not in {f.code for f in truth.findings}
    planned = audit_reading(parse_lspci("\n".join(x for x in dump.splitlines() if "IOMMU group" not in x)))
    assert all(g.planned for g in planned.groups)
    assert group_sets(planned) == group_sets(truth)  # what the kernel would make with the IOMMU on
    (planning,) = [f.message for f in planned.findings if f.code == "planning"]
    assert "ACS was visible" in planning


def test_unread_acs_is_said_to_be_unseen_not_missing() -> None:
    text = (CORPUS / "lspci" / "forum-non-root.txt").read_text()
    pasted = audit_reading(parse_lspci(text))
    notes = [n.message for g in pasted.groups for n in g.notes if n.code == "no-acs"]
    assert notes and all("with no ACS seen (not read as root)" in n and "may reach" in n for n in notes)
    stripped = "\n".join(x for x in text.splitlines() if "IOMMU group" not in x)
    (planning,) = [f.message for f in audit_reading(parse_lspci(stripped)).findings if f.code == "planning"]
    assert "ACS was hidden" in planning and "run lspci (or pciguard) as root" in planning


def text_stripped_to_hex(dump: str) -> str:
    """A dump with only device lines, group and driver lines, and the hex: what is left
    must come from the config space bytes."""
    kept = ("\tIOMMU group:", "\tKernel driver in use:")
    return "\n".join(x for x in dump.splitlines() if not x.startswith("\t") or x.startswith(kept))


@needs_lspci
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=40)
@given(spec=platform_file())
def test_lspci_hex_dumps_are_decoded_as_config_space(spec: dict[str, Any]) -> None:
    host = build_host(spec, {}, "<random>")
    with TemporaryDirectory() as tmp:
        render(host, Path(tmp))
        dump = lspci_of(Path(tmp), "-nn", "-D", "-xxxx")
    from_hex = parse_lspci(text_stripped_to_hex(dump), "hex")
    assert shown_by_lspci(from_hex.host) == shown_by_lspci(host)
    assert from_hex.facts.topology_complete


def test_a_hex_dump_with_a_gap_is_named_once_and_not_used() -> None:
    lines = PLAIN.splitlines()
    header = "00: 86 80 3c a3 07 04 10 00 f0 00 04 06 10 00 81 00"
    rest = [f"{at:02x}: " + " ".join(["00"] * 16) for at in range(0x20, 0x100, 0x10)]  # 10: is missing
    gapped = "\n".join([*lines[:2], header, *rest, *lines[2:]])
    reading = parse_lspci(gapped, "gap.txt")
    (problem,) = [p for p in reading.facts.problems if "hex dump" in p.message]
    assert problem.path == "gap.txt:4" and "skips to 0x20" in problem.message
    assert reading.host.topology[bdf("0000:00:1c.4")].kind.is_bridge  # the text still holds
