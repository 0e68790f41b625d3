"""The policy language: good and bad corpora, what each construct matches, and
Hypothesis fuzzing of the parser (no input may crash it; printed rules read back)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CORPUS, header
from pciguard.errors import PolicyError
from pciguard.model import Bdf
from pciguard.policy import Target
from pciguard.policy.rules import (
    ATTRIBUTES,
    CONDITIONS,
    Operator,
    Rule,
    Subject,
    parse_policy,
    parse_rule,
)
from strategies import rules

BAD = sorted((CORPUS / "policy" / "bad").glob("*.rules"))
GOOD = sorted((CORPUS / "policy" / "good").glob("*.rules"))


def same(a: Rule, b: Rule) -> bool:
    """The same rule, wherever each was written."""
    return (a.target, a.attributes, a.condition) == (b.target, b.attributes, b.condition)


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_policies_parse_and_print_back_the_same(path: Path) -> None:
    policy = parse_policy(path.read_text(), str(path))
    assert policy.rules
    for rule in policy.rules:
        again = parse_rule(str(rule), rule.source)
        assert (again.target, again.attributes, again.condition) == (
            rule.target,
            rule.attributes,
            rule.condition,
        )


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_policies_name_file_line_and_column(path: Path) -> None:
    message, line, column = header(path)
    with pytest.raises(PolicyError) as caught:
        parse_policy(path.read_text(), str(path))
    assert message in str(caught.value)
    assert (caught.value.source, caught.value.line, caught.value.column) == (str(path), line, column)
    assert str(caught.value).startswith(f"{path}:{line}:{column}: ")


NIC = Subject(
    "0000:03:00.0",
    ids="8086:1572",
    class_code=0x020000,
    ports=(Bdf(0, 0, 0x1C, 0), Bdf(0, 2, 0, 0)),
    name="Ethernet Controller X710",
    iommu=True,
    interrupt_remapping=True,
)
FAKE_BRIDGE = Subject("0000:06:00.0", ids="8086:15d3", class_code=0x060400, external=True, bridge=True)
DOCK = Subject(
    "0-1",
    thunderbolt=True,
    external=True,
    name="Thunderbolt Dock",
    vendor_name="Apple Inc.",
    unique_id="d003-0080",
)


def decides(text: str, subject: Subject) -> Target:
    return parse_policy(text).judge(subject).decision.target


@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        ("allow id 8086:1572", True),
        ("allow id 8086:*", True),
        ("allow id *:1572", True),
        ("allow id 8086:1573", False),
        ("allow id 8086:15AB", False),
        ("allow class 02", True),
        ("allow class 02:00:*", True),
        ("allow class 02:80", False),
        ("allow via-port 0000:00:1c.0", True),  # anywhere below the port
        ("allow via-port 0000:02:00.0", True),
        ("allow via-port 0000:00:1c.0/0000:02:00.0", True),  # the whole chain
        ("allow via-port 0000:00:1c.0/0000:02:00.0/0000:03:00.0", False),
        ("allow via-port 0000:02:00.0/0000:00:1c.0", False),
        ("allow via-port 0000:00:1d.0", False),
        ('allow name "Ethernet Controller X710"', True),
        ('allow name "Ethernet*"', True),
        ('allow name "ethernet*"', False),  # case matters, as in USBGuard
        ("allow id one-of { 10de:* 8086:1572 }", True),
        ("allow id all-of { 8086:* *:1572 }", True),
        ("allow id all-of { 8086:* 10de:* }", False),
        ("allow id none-of { 10de:* 1002:* }", True),
        ("allow id none-of { 10de:* 8086:* }", False),
        ("allow id equals { 8086:1572 }", True),
        ("allow external", False),
        ("allow bridge", False),
        ("allow thunderbolt", False),
        ("allow if iommu", True),
        ("allow if !iommu", False),
        ("allow if all-of { iommu interrupt-remapping hotplugged }", True),
        ("allow if one-of { external present }", False),
        ("allow if none-of { external present }", True),
        ('allow unique-id "d003-0080"', False),  # a Thunderbolt attribute
        ("allow", True),
    ],
)
def test_what_each_construct_matches(rule: str, matches: bool) -> None:
    assert decides(rule, NIC) is (Target.ALLOW if matches else Target.QUARANTINE)


def test_first_match_wins_and_no_match_is_quarantine() -> None:
    policy = "reject id 8086:1572\nallow id 8086:*\n"
    verdict = parse_policy(policy, "p").judge(NIC)
    assert verdict.decision.target is Target.REJECT and verdict.rule is not None and verdict.rule.line == 1
    verdict = parse_policy("allow id 10de:*  # GPUs only\n", "p").judge(NIC)
    assert verdict.decision.target is Target.QUARANTINE and verdict.rule is None
    assert verdict.considered[0][1] == "'id 10de:*' does not match"


def test_an_external_bridge_is_rejected_unless_the_rule_says_bridge() -> None:
    assert decides("allow id 8086:*", FAKE_BRIDGE) is Target.REJECT
    assert decides("quarantine if external", FAKE_BRIDGE) is Target.REJECT
    assert decides("", FAKE_BRIDGE) is Target.REJECT  # not even the implicit quarantine
    assert decides("allow bridge id 8086:15d3", FAKE_BRIDGE) is Target.ALLOW
    internal = Subject("0000:00:1c.0", ids="8086:a338", class_code=0x060400, bridge=True)
    assert decides("allow id 8086:*", internal) is Target.ALLOW


def test_thunderbolt_devices_are_judged_by_thunderbolt_attributes() -> None:
    assert decides('allow thunderbolt vendor-name "Apple*"', DOCK) is Target.ALLOW
    assert decides('allow unique-id "d003-0080" name "Thunderbolt Dock"', DOCK) is Target.ALLOW
    assert decides('allow unique-id "other"', DOCK) is Target.REJECT  # no rule: stays unauthorised
    assert decides("allow id 8086:*", DOCK) is Target.REJECT  # PCI attributes never match one
    assert decides("quarantine thunderbolt", DOCK) is Target.QUARANTINE
    assert decides("reject external", DOCK) is Target.REJECT
    assert decides("allow thunderbolt", NIC) is Target.QUARANTINE


def test_conditions_about_presence() -> None:
    assert decides("allow if present", NIC) is Target.QUARANTINE
    present = Subject(**{**NIC.__dict__, "present": True})
    assert decides("allow if present", present) is Target.ALLOW


# -- fuzzing ------------------------------------------------------------------------------
WORDS = [
    *map(str, Target),
    *ATTRIBUTES,
    *CONDITIONS,
    *map(str, Operator),
    "if",
    "{",
    "}",
    "!",
    "#",
    '"',
    "8086:*",
    "02:00:*",
    "0000:00:1c.0",
    "0000:00:1c.0/0000:02:00.0",
    '"Intel*"',
    "\\",
    "\t",
]
tried = {"inputs": 0}


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from(WORDS), st.text(max_size=6)),
        max_size=14,
    ).map(" ".join)
    | st.text(max_size=80)
)
def test_fuzzed_text_parses_or_fails_with_a_place(text: str) -> None:
    tried["inputs"] += 1
    try:
        policy = parse_policy(text, "fuzz.rules")
    except PolicyError as exc:
        lines = text.splitlines() or [""]
        assert exc.line is not None and 1 <= exc.line <= len(lines)
        assert exc.column is not None and 1 <= exc.column <= len(lines[exc.line - 1]) + 1
        assert re.match(r"fuzz\.rules:\d+:\d+: \S", str(exc))
        return
    for rule in policy.rules:  # whatever parses prints as a rule that parses the same
        again = parse_rule(str(rule))
        assert (again.target, again.attributes, again.condition) == (
            rule.target,
            rule.attributes,
            rule.condition,
        )


def test_fuzzing_tried_enough_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    if tried["inputs"] == 0:
        test_fuzzed_text_parses_or_fails_with_a_place()
    with capsys.disabled():
        print(f"\npolicy parser fuzzing: {tried['inputs']} inputs, none crashed")
    assert tried["inputs"] >= 1000


@settings(max_examples=500, deadline=None)
@given(rules())
def test_every_rule_prints_as_text_that_parses_back_to_it(rule: Rule) -> None:
    assert same(parse_rule(str(rule)), rule)


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "*", "[", "]", "ab"]), max_size=8).map("".join),
    st.text(alphabet="ab[]", max_size=12),
)
def test_name_patterns_match_as_a_glob_would(pattern: str, name: str) -> None:
    """Against fnmatch-like semantics with only ``*`` special (an independent oracle)."""
    oracle = re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), name, re.DOTALL) is not None
    assert ATTRIBUTES["name"].match(pattern, name) is oracle


def test_a_name_pattern_cannot_be_made_to_backtrack() -> None:
    """A device chooses its name: ``*a*a*a*a*a*b`` against a long run of ``a`` once took
    22 s and blocked every other decision."""
    import time

    subject_name = "a" * 100_000
    started = time.process_time()
    for stars in range(2, 40):
        assert not ATTRIBUTES["name"].match("*a" * stars + "*b", subject_name)
    assert time.process_time() - started < 2
