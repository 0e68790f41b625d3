"""The rule language of hot-plug policies, after USBGuard's: one rule a line,

    TARGET [ATTRIBUTE ...] [if CONDITION]

matched top to bottom against a device; the first rule that matches decides, and a
device no rule matches is quarantined. docs/policy.md is the reference. Pure: the
parser takes text, decisions take facts; nothing here reads the host.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from pciguard.errors import PolicyError
from pciguard.model import Bdf, Host
from pciguard.model.kernel import ThunderboltDevice
from pciguard.policy.default import Decision, Target

IMPLICIT = "implicit: no rule matched, so it is quarantined"
IMPLICIT_THUNDERBOLT = "implicit: no rule matched, so it stays unauthorised (no PCI tunnel)"
EXTERNAL_BRIDGE = (
    "presents itself as a bridge behind an external port, and the rule that matched does not say "
    "'bridge': rejected"
)


class Operator(StrEnum):
    ONE_OF = "one-of"  # some pattern matches
    ALL_OF = "all-of"  # every pattern matches
    NONE_OF = "none-of"  # no pattern matches
    EQUALS = "equals"  # every pattern matches and every value of the device is matched


@dataclass(frozen=True)
class Subject:
    """What a rule can see of a device: a PCI function, or a Thunderbolt device
    waiting for authorisation (before any PCI function behind it exists)."""

    address: str  # a BDF, or the Thunderbolt device's sysfs name (0-1)
    thunderbolt: bool = False
    ids: str = ""  # vendor:device, 4 hex digits each
    class_code: int = 0
    ports: tuple[Bdf, ...] = ()  # the bridges above it, root first
    external: bool = False
    bridge: bool = False
    name: str = ""
    vendor_name: str = ""
    unique_id: str = ""
    present: bool = False  # there when the guard started (not hot-plugged)
    iommu: bool = False  # an IOMMU translates its DMA
    interrupt_remapping: bool = False

    @classmethod
    def of_function(cls, host: Host, bdf: Bdf, *, present: bool = False) -> Subject:
        fn = host.topology[bdf]
        ports = host.topology.path_to_root(bdf)
        return cls(
            address=str(bdf),
            ids=fn.ids,
            class_code=fn.class_code,
            ports=tuple(p.bdf for p in reversed(ports)),
            external=any(p.external for p in ports),  # came in through an external port
            bridge=fn.kind.is_bridge,
            name=fn.name,
            present=present,
            iommu=host.dma_translated(bdf),
            interrupt_remapping=host.msi_isolated(bdf),
        )

    @classmethod
    def of_thunderbolt(cls, device: ThunderboltDevice, *, present: bool = False) -> Subject:
        return cls(
            address=device.name,
            thunderbolt=True,
            external=True,
            name=device.device_name,
            vendor_name=device.vendor_name,
            unique_id=device.unique_id,
            present=present,
        )

    @property
    def port_path(self) -> str:
        return "/".join(str(p) for p in self.ports)


# -- attributes -----------------------------------------------------------------------
@dataclass(frozen=True)
class Attribute:
    """``name [operator] {patterns}``; flags (external, bridge, thunderbolt) have none."""

    name: str
    operator: Operator = Operator.ONE_OF
    patterns: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.patterns:
            return self.name
        shown = [_quote(p) if ATTRIBUTES[self.name].quoted else p for p in self.patterns]
        if len(shown) == 1 and self.operator is Operator.ONE_OF:
            return f"{self.name} {shown[0]}"
        return f"{self.name} {self.operator} {{ {' '.join(shown)} }}"

    def applies_to(self, subject: Subject) -> bool:
        return subject.thunderbolt in ATTRIBUTES[self.name].kinds

    def matches(self, subject: Subject) -> bool:
        spec = ATTRIBUTES[self.name]
        values = spec.values(subject)
        if not self.patterns:
            return bool(values)
        hits = [any(spec.match(p, v) for v in values) for p in self.patterns]
        if self.operator is Operator.ONE_OF:
            return any(hits)
        if self.operator is Operator.ALL_OF:
            return all(hits)
        if self.operator is Operator.NONE_OF:
            return not any(hits)
        return all(hits) and all(any(spec.match(p, v) for p in self.patterns) for v in values)


@dataclass(frozen=True)
class _Spec:
    values: Callable[[Subject], tuple[str, ...]]  # the device's values; a flag: non-empty when set
    kinds: tuple[bool, ...]  # which subjects it can describe: (False,) PCI, (True,) Thunderbolt
    check: Callable[[str], str | None] | None = None  # a pattern's problem, if any; None: a flag
    match: Callable[[str, str], bool] = lambda pattern, value: _match_text(pattern, value)
    quoted: bool = False  # patterns are free text, written in quotes
    equals: bool = True  # may be compared with 'equals'


_ID = re.compile(r"^(?:[0-9a-fA-F]{4}|\*):(?:[0-9a-fA-F]{4}|\*)$")
_CLASS = re.compile(r"^(?:[0-9a-fA-F]{2}|\*)(?::(?:[0-9a-fA-F]{2}|\*)){0,2}$")


def _check_id(text: str) -> str | None:
    return None if _ID.match(text) else f"'{text}' is not a vendor:device ID such as 8086:1572 or 8086:*"


def _check_class(text: str) -> str | None:
    if _CLASS.match(text):
        return None
    return f"'{text}' is not a class such as 02, 02:00 or 02:00:* (class:subclass:interface, in hex)"


def _check_port(text: str) -> str | None:
    for part in text.split("/"):
        try:
            Bdf.parse(part)
        except ValueError as exc:
            return f"{exc}; a port is a bridge's address, a port path is such addresses joined by '/'"
    return None


def _match_text(pattern: str, value: str) -> bool:
    """Free text with ``*`` for any run of characters and nothing else special (device
    names are full of brackets). Greedy leftmost search for each piece between stars is
    exact for such patterns and takes time linear in the name, whatever the pattern: a
    device chooses its name, so matching must not backtrack."""
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == value
    first, *middle, last = parts
    if len(value) < len(first) + len(last) or not value.startswith(first) or not value.endswith(last):
        return False
    at, end = len(first), len(value) - len(last)
    for part in middle:
        found = value.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True


def _match_id(pattern: str, value: str) -> bool:
    wanted, found = pattern.split(":"), value.split(":")
    return len(found) == 2 and all(p == "*" or p.lower() == v for p, v in zip(wanted, found, strict=True))


def _match_class(pattern: str, value: str) -> bool:
    return all(p == "*" or p.lower() == v for p, v in zip(pattern.split(":"), value.split(":"), strict=False))


def _match_port(pattern: str, value: str) -> bool:
    """A port matches when the device sits anywhere below it; a port path only when it
    is the device's whole chain of ports, root first (``value`` is that chain)."""
    ports = [str(Bdf.parse(p)) for p in pattern.split("/")]
    chain = value.split("/") if value else []
    return chain == ports if len(ports) > 1 else ports[0] in chain


def _flag(attribute: str) -> Callable[[Subject], tuple[str, ...]]:
    return lambda s: (attribute,) if getattr(s, attribute) else ()


def _text(attribute: str) -> Callable[[Subject], tuple[str, ...]]:
    return lambda s: (getattr(s, attribute),) if getattr(s, attribute) else ()


PCI, THUNDERBOLT, EITHER = (False,), (True,), (False, True)
ATTRIBUTES: dict[str, _Spec] = {
    "id": _Spec(lambda s: (s.ids.lower(),), PCI, _check_id, _match_id),
    "class": _Spec(
        lambda s: (f"{s.class_code >> 16:02x}:{s.class_code >> 8 & 0xFF:02x}:{s.class_code & 0xFF:02x}",),
        PCI,
        _check_class,
        _match_class,
    ),
    "via-port": _Spec(lambda s: (s.port_path,), PCI, _check_port, _match_port, equals=False),
    "name": _Spec(_text("name"), EITHER, lambda _: None, quoted=True),
    "vendor-name": _Spec(_text("vendor_name"), THUNDERBOLT, lambda _: None, quoted=True),
    "unique-id": _Spec(_text("unique_id"), THUNDERBOLT, lambda _: None, quoted=True),
    "external": _Spec(_flag("external"), EITHER),
    "bridge": _Spec(_flag("bridge"), PCI),
    "thunderbolt": _Spec(_flag("thunderbolt"), EITHER),
}


# -- conditions -----------------------------------------------------------------------
CONDITIONS: dict[str, Callable[[Subject], bool]] = {
    "true": lambda s: True,
    "false": lambda s: False,
    "present": lambda s: s.present,
    "hotplugged": lambda s: not s.present,
    "external": lambda s: s.external,
    "bridge": lambda s: s.bridge,
    "thunderbolt": lambda s: s.thunderbolt,
    "iommu": lambda s: s.iommu,
    "interrupt-remapping": lambda s: s.interrupt_remapping,
}


@dataclass(frozen=True)
class Condition:
    """``if [!]term`` or ``if OPERATOR { [!]term ... }`` (equals is not a condition)."""

    terms: tuple[tuple[bool, str], ...]  # (negated, term)
    operator: Operator | None = None  # None: a single term

    def holds(self, subject: Subject) -> bool:
        results = [CONDITIONS[term](subject) != negated for negated, term in self.terms]
        if self.operator is Operator.ALL_OF:
            return all(results)
        if self.operator is Operator.NONE_OF:
            return not any(results)
        return any(results)

    def __str__(self) -> str:
        shown = [("!" if negated else "") + term for negated, term in self.terms]
        return shown[0] if self.operator is None else f"{self.operator} {{ {' '.join(shown)} }}"


# -- rules and policies -----------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    target: Target
    attributes: tuple[Attribute, ...] = ()
    condition: Condition | None = None
    line: int = 0
    source: str = ""

    def __str__(self) -> str:
        parts = [str(self.target), *(str(a) for a in self.attributes)]
        if self.condition is not None:
            parts += ["if", str(self.condition)]
        return " ".join(parts)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def mismatch(self, subject: Subject) -> str | None:
        """Why the rule does not match ``subject``; None when it does."""
        for attribute in self.attributes:
            if not attribute.applies_to(subject):
                kind = "Thunderbolt devices" if subject.thunderbolt else "PCI functions"
                return f"'{attribute.name}' does not describe {kind}"
            if not attribute.matches(subject):
                return f"'{attribute}' does not match"
        if self.condition is not None and not self.condition.holds(subject):
            return f"condition '{self.condition}' does not hold"
        return None

    @property
    def names_bridges(self) -> bool:
        return any(a.name == "bridge" and not a.patterns for a in self.attributes)


@dataclass(frozen=True)
class Verdict:
    """A decision with the reasoning ``pciguard policy test`` shows."""

    decision: Decision
    rule: Rule | None  # the rule that matched, None when none did
    considered: tuple[tuple[Rule, str], ...]  # rules tried before it, and why each did not match


@dataclass(frozen=True)
class Policy:
    """An ordered list of rules; implements the toolstack's HotplugPolicy."""

    rules: tuple[Rule, ...] = ()
    source: str = "<policy>"

    def mentions(self, attribute: str) -> bool:
        return any(a.name == attribute for rule in self.rules for a in rule.attributes)

    def judge(self, subject: Subject) -> Verdict:
        considered = []
        for rule in self.rules:
            why_not = rule.mismatch(subject)
            if why_not is not None:
                considered.append((rule, why_not))
                continue
            if subject.bridge and subject.external and not rule.names_bridges:
                decision = Decision(Target.REJECT, f"{rule.where}: {EXTERNAL_BRIDGE}", explicit=False)
            else:
                decision = Decision(rule.target, f"{rule.where}: {rule}", explicit=True)
            return Verdict(decision, rule, tuple(considered))
        if subject.bridge and subject.external:
            decision = Decision(Target.REJECT, f"{IMPLICIT}; but it {EXTERNAL_BRIDGE}", explicit=False)
        elif subject.thunderbolt:
            decision = Decision(Target.REJECT, IMPLICIT_THUNDERBOLT, explicit=False)
        else:
            decision = Decision(Target.QUARANTINE, IMPLICIT, explicit=False)
        return Verdict(decision, None, tuple(considered))

    def decide(self, host: Host, device: Bdf) -> Decision:
        """For the toolstack, which asks only about devices that have just appeared."""
        return self.judge(Subject.of_function(host, device)).decision


# -- the parser -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Token:
    text: str
    column: int  # 1-based
    quoted: bool = False


_BARE = re.compile(r"[^\s{}!\"#]+")


def _tokens(line: str, error: Callable[[int, str], PolicyError]) -> Iterator[_Token]:
    i = 0
    while i < len(line):
        char = line[i]
        if char.isspace():
            i += 1
        elif char == "#":
            return
        elif char in "{}!":
            yield _Token(char, i + 1)
            i += 1
        elif char == '"':
            start, i, text = i, i + 1, []
            while i < len(line) and line[i] != '"':
                if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in '"\\':
                    i += 1
                text.append(line[i])
                i += 1
            if i >= len(line):
                raise error(start + 1, "this string has no closing quote")
            yield _Token("".join(text), start + 1, quoted=True)
            i += 1
        else:
            match = _BARE.match(line, i)
            assert match is not None  # every other character starts a bare word
            yield _Token(match.group(), i + 1)
            i = match.end()


class _Line:
    """The tokens of one line, consumed left to right."""

    def __init__(self, source: str, number: int, text: str) -> None:
        self.source, self.number, self.end = source, number, len(text.rstrip()) + 1
        self.tokens = list(_tokens(text, self.error))
        self.at = 0

    def error(self, column: int, message: str) -> PolicyError:
        return PolicyError(self.source, message, line=self.number, column=column)

    def peek(self) -> _Token | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, wanted: str) -> _Token:
        token = self.peek()
        if token is None:
            raise self.error(self.end, f"the rule ends where {wanted} was expected")
        self.at += 1
        return token


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Every rule of ``text``; the first malformed one raises PolicyError."""
    rules = []
    for number, line_text in enumerate(text.splitlines(), 1):
        line = _Line(source, number, line_text)
        if line.peek() is not None:
            rules.append(_rule(line))
    return Policy(tuple(rules), source)


def parse_rule(text: str, source: str = "<rule>") -> Rule:
    line = _Line(source, 1, text)
    if line.peek() is None:
        raise line.error(1, "the rule is empty")
    return _rule(line)


def _rule(line: _Line) -> Rule:
    first = line.take("a target")
    try:
        target = Target(first.text)
    except ValueError:
        raise line.error(
            first.column, f"a rule starts with allow, quarantine or reject, not '{first.text}'"
        ) from None
    attributes: list[Attribute] = []
    seen: set[str] = set()
    condition = None
    while (token := line.peek()) is not None:
        line.at += 1
        if token.text == "if" and not token.quoted:
            condition = _condition(line)
            if (extra := line.peek()) is not None:
                raise line.error(extra.column, f"'{extra.text}' after the condition: one condition a rule")
            break
        spec = ATTRIBUTES.get(token.text) if not token.quoted else None
        if spec is None:
            known = ", ".join(ATTRIBUTES)
            raise line.error(token.column, f"'{token.text}' is not an attribute (known: {known}) or 'if'")
        if token.text in seen:
            raise line.error(token.column, f"'{token.text}' is given twice in one rule")
        seen.add(token.text)
        attributes.append(_attribute(line, token, spec))
    return Rule(target, tuple(attributes), condition, line.number, line.source)


def _attribute(line: _Line, name: _Token, spec: _Spec) -> Attribute:
    if spec.check is None:  # a flag
        return Attribute(name.text)
    operator, patterns = _values(line, f"a value for '{name.text}'")
    if operator is Operator.EQUALS and not spec.equals:
        raise line.error(name.column, f"'{name.text}' cannot be compared with 'equals'")
    for token in patterns:
        if token.quoted != spec.quoted:
            how = "in quotes" if spec.quoted else "without quotes"
            raise line.error(token.column, f"'{name.text}' takes its values {how}")
        problem = spec.check(token.text)
        if problem is not None:
            raise line.error(token.column, problem)
    return Attribute(name.text, operator, tuple(t.text for t in patterns))


def _values(line: _Line, wanted: str) -> tuple[Operator, list[_Token]]:
    """``value`` or ``OPERATOR { value ... }``."""
    token = line.take(wanted)
    if token.quoted or token.text not in set(Operator):
        if token.text in "{}!" and not token.quoted:
            hint = " (write one-of, all-of, none-of or equals before '{')" if token.text == "{" else ""
            raise line.error(token.column, f"'{token.text}' where {wanted} was expected{hint}")
        return Operator.ONE_OF, [token]
    operator = Operator(token.text)
    opening = line.take("'{'")
    if opening.text != "{" or opening.quoted:
        raise line.error(opening.column, f"'{operator}' is followed by '{{', not '{opening.text}'")
    items = []
    while (item := line.take("'}'")).text != "}" or item.quoted:
        if item.text in "{!" and not item.quoted:
            raise line.error(item.column, f"'{item.text}' inside a set of values")
        items.append(item)
    if not items:
        raise line.error(opening.column, "an empty set of values")
    return operator, items


def _condition(line: _Line) -> Condition:
    token = line.peek()
    if token is not None and not token.quoted and token.text in set(Operator):
        line.at += 1
        operator = Operator(token.text)
        if operator is Operator.EQUALS:
            raise line.error(token.column, "conditions combine with one-of, all-of or none-of")
        opening = line.take("'{'")
        if opening.text != "{" or opening.quoted:
            raise line.error(opening.column, f"'{operator}' is followed by '{{', not '{opening.text}'")
        terms = []
        while (after := line.peek()) is None or after.text != "}" or after.quoted:
            terms.append(_term(line))
        line.at += 1
        if not terms:
            raise line.error(opening.column, "an empty set of conditions")
        return Condition(tuple(terms), operator)
    return Condition((_term(line),))


def _term(line: _Line) -> tuple[bool, str]:
    token = line.take("a condition")
    negated = token.text == "!" and not token.quoted
    if negated:
        token = line.take("a condition after '!'")
    if token.quoted or token.text not in CONDITIONS:
        known = ", ".join(CONDITIONS)
        raise line.error(token.column, f"'{token.text}' is not a condition (known: {known})")
    return negated, token.text


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- writing a policy for what is present now ---------------------------------------------
def generate(host: Host, thunderbolt: tuple[ThunderboltDevice, ...] = ()) -> str:
    """Rules that allow every function and Thunderbolt device present now, each pinned
    to its IDs, class and port path (PCI has no serial numbers); anything else falls to
    the implicit quarantine."""
    lines = [
        f"# pciguard policy for {host.name}: allows the devices present when it was written.",
        "# First match wins; a device no rule matches is quarantined (vfio-pci, DMA blocked).",
    ]
    for bdf in host.topology:
        if bdf in host.hotplug_later:
            continue  # a simulated host's devices that are not there yet
        subject = Subject.of_function(host, bdf)
        attributes = [
            Attribute("id", patterns=(subject.ids.lower(),)),
            Attribute("class", patterns=(ATTRIBUTES["class"].values(subject)[0],)),
        ]
        if subject.ports:
            attributes.append(Attribute("via-port", patterns=(subject.port_path,)))
        if subject.bridge and subject.external:
            attributes.append(Attribute("bridge"))
        if subject.name:
            attributes.append(Attribute("name", patterns=(subject.name,)))
        lines.append(str(Rule(Target.ALLOW, tuple(attributes))) + f"  # {bdf}")
    for device in thunderbolt:
        if device.authorized is False:
            continue  # not let in now: left to the implicit target
        attributes = [Attribute("thunderbolt")]
        if device.unique_id:
            attributes.append(Attribute("unique-id", patterns=(device.unique_id,)))
        if device.vendor_name:
            attributes.append(Attribute("vendor-name", patterns=(device.vendor_name,)))
        if device.device_name:
            attributes.append(Attribute("name", patterns=(device.device_name,)))
        lines.append(str(Rule(Target.ALLOW, tuple(attributes))) + f"  # Thunderbolt {device.name}")
    return "\n".join(lines) + "\n"
