"""Transitions remembered by what they read.

A transition runs the real toolstack on the simulated platform, and both are
deterministic: what a step does depends only on the action, the operation in flight and
the parts of the platform and the ledger it looks at. So each transition is run once
with every table of the platform and the ledger seen through a recorder, which notes
the cells it reads (in order, each at its first read) and the cells it may change. The
outcome — the final value of every changed cell and the operation's next cursor — is
kept under the values the read cells had. Another state that agrees on those cells
makes the same run, so its successor is that state with the same cells changed: no
restore, no run, no snapshot.

The reads are kept as a tree per action: from each node, per cell read next, a branch
per value; a node where a run stopped reading holds its outcome. The order of reads may
differ between runs that read the same cells (a table's entries are walked in the order
they were made, which restoring a state does not fix), so a lookup follows every branch
the state agrees with. A run that reads the same cells with the same values as another
but ends differently read something the recorder cannot see, or is not deterministic:
that raises ``Undetermined`` instead of keeping a wrong entry.

A cell is one entry of a table (a requester ID's context entry, a device's ledger
record, a domain), a table's set of keys (``KEYS``, read by iterating it) or the whole
table (``ALL``, read by walking its items, and changed as a whole when its values are
objects changed in place). The VMs whose teardown finished are one cell, read by any
use and changed by assigning it (the toolstack keeps them in an attribute, not a table).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from typing import Any, NamedTuple

from pciguard.errors import Undetermined
from pciguard.platforms.sim import SimPlatform, SimSnapshot
from pciguard.toolstack import LedgerSnapshot, Toolstack


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


ABSENT = _Marker("ABSENT")  # the value of a cell whose table has no such key
KEYS = _Marker("KEYS")  # the cell of a table's set of keys
ALL = _Marker("ALL")  # the cell of a whole table


class Table(NamedTuple):
    """One table of the state: where it lives and how its part of a state is read."""

    position: int  # its part in ``parts(state)``
    owner: str  # platform | toolstack
    attribute: str
    is_set: bool  # a set of keys (present, driver bound, ATS enabled) rather than a mapping
    mutable: bool  # its values are objects changed in place: fetching one may change it


RECORDS = len(SimSnapshot._fields)  # the ledger's records: the last table
#: The platform's tables, in ``SimSnapshot`` order, then the ledger's records.
TABLES = (
    *(
        Table(
            i,
            "platform",
            "_" + name,
            name in ("present", "driver", "ats"),
            name in ("domains", "stale"),
        )
        for i, name in enumerate(SimSnapshot._fields)
    ),
    Table(RECORDS, "toolstack", "ledger", False, True),
)
TORN_DOWN = len(TABLES)  # the toolstack's torn-down VMs: read and written whole
DOMAINS = SimSnapshot._fields.index("domains")  # a part of DomainSnapshot values, keyed by name
Cell = tuple[int, Any]  # (table index, key | KEYS | ALL)
Parts = tuple[Any, ...]
Lens = list[dict[Any, int]]  # per part: cell key -> identity of the cell's value


def parts(platform: SimSnapshot, ledger: LedgerSnapshot) -> Parts:
    return (*platform, ledger.records, ledger.torn_down)


class Outcome(NamedTuple):
    """What one run did: each changed table's changes, and the next cursor (or the
    plan's footprint, the unit's verdict); for a run that changes nothing, the cells it
    read (any state that agrees with the run's on them has the same result)."""

    changes: tuple[tuple[int, Any], ...]  # (table, ALL part | ((key, value), ...))
    result: Any  # the operation's next cursor, or None once it ended
    reads: frozenset[Cell] = frozenset()


def _settled(outcome: Outcome) -> tuple[Any, ...]:
    """``outcome`` as a value two equal outcomes share: a table's changes are kept in
    the order the run made them (sorting them took a third of a store)."""
    changes = tuple((index, frozenset(c) if isinstance(c, tuple) else c) for index, c in outcome.changes)
    return (changes, outcome.result, outcome.reads)


class _Node:
    """What runs read next after the same reads with the same values, and the outcome of
    a run that read nothing more. Most nodes have one branch (a run reads on where the
    one before read), kept in three slots: the cell, the identity of its value, the next
    node; further branches go in ``more``, by cell and value."""

    __slots__ = ("cell", "child", "more", "outcome", "value")

    def __init__(self) -> None:
        self.cell: Cell | None = None
        self.value = 0
        self.child: _Node | None = None
        self.more: dict[Cell, dict[int, _Node]] | None = None
        self.outcome: Outcome | None = None

    def branch(self, cell: Cell, value: int) -> _Node:
        """The node after reading ``cell`` with ``value`` (made if new)."""
        if self.cell is None:
            self.cell, self.value, self.child = cell, value, _Node()
        if self.cell == cell and self.value == value:
            assert self.child is not None
            return self.child
        if self.more is None:
            self.more = {}
        children = self.more.setdefault(cell, {})
        child = children.get(value)
        if child is None:
            child = children[value] = _Node()
        return child


class Log:
    """What one run read (in order, each cell at its first read) and may have changed.
    A cell changed before it is read is not a read: its value came from the run."""

    __slots__ = ("reads", "seen", "touched")

    def __init__(self) -> None:
        self.reads: list[Cell] = []
        self.seen: set[Cell] = set()
        self.touched: set[Cell] = set()

    def read(self, cell: Cell) -> None:
        if cell not in self.seen:
            self.seen.add(cell)
            self.reads.append(cell)

    def touch(self, cell: Cell) -> None:
        self.seen.add(cell)
        self.touched.add(cell)


class _WatchedMap:
    """A mapping of the platform or the ledger as a step sees it: every access noted."""

    __slots__ = ("_data", "_log", "_mutable", "_table")

    def __init__(self, data: dict[Any, Any], table: Table, log: Log) -> None:
        self._data, self._table, self._log, self._mutable = data, table.position, log, table.mutable

    def _fetch(self, key: Any) -> None:
        self._log.read((self._table, key))
        if self._mutable:
            self._log.touch((self._table, key))

    def _change(self, key: Any) -> None:
        self._log.read((self._table, key))  # these calls return or check what was there
        self._log.touch((self._table, key))

    def __getitem__(self, key: Any) -> Any:
        self._fetch(key)
        return self._data[key]

    def get(self, key: Any, default: Any = None) -> Any:
        self._fetch(key)
        return self._data.get(key, default)

    def __contains__(self, key: Any) -> bool:
        self._log.read((self._table, key))
        return key in self._data

    def __setitem__(self, key: Any, value: Any) -> None:
        self._log.touch((self._table, key))
        self._data[key] = value

    def __delitem__(self, key: Any) -> None:
        self._change(key)
        del self._data[key]

    def pop(self, key: Any, *default: Any) -> Any:
        self._change(key)
        return self._data.pop(key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._change(key)
        return self._data.setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        new = dict(*args, **kwargs)
        for key in new:
            self._log.touch((self._table, key))
        self._data.update(new)

    def __iter__(self) -> Iterator[Any]:
        self._log.read((self._table, KEYS))
        return iter(self._data)

    def keys(self) -> Any:
        self._log.read((self._table, KEYS))
        return self._data.keys()

    def __len__(self) -> int:
        self._log.read((self._table, KEYS))
        return len(self._data)

    def items(self) -> Any:
        self._whole()
        return self._data.items()

    def values(self) -> Any:
        self._whole()
        return self._data.values()

    def _whole(self) -> None:
        self._log.read((self._table, ALL))
        if self._mutable:
            self._log.touch((self._table, ALL))


class _WatchedSet:
    """A set of the platform as a step sees it: every access noted."""

    __slots__ = ("_data", "_log", "_table")

    def __init__(self, data: set[Any], table: Table, log: Log) -> None:
        self._data, self._table, self._log = data, table.position, log

    def __contains__(self, key: Any) -> bool:
        self._log.read((self._table, key))
        return key in self._data

    def add(self, key: Any) -> None:
        self._log.touch((self._table, key))
        self._data.add(key)

    def discard(self, key: Any) -> None:
        self._log.touch((self._table, key))
        self._data.discard(key)

    def remove(self, key: Any) -> None:
        self._log.read((self._table, key))
        self._log.touch((self._table, key))
        self._data.remove(key)

    def __iter__(self) -> Iterator[Any]:
        self._log.read((self._table, ALL))
        return iter(self._data)

    def __len__(self) -> int:
        self._log.read((self._table, ALL))
        return len(self._data)


class _WatchedWhole:
    """The toolstack's torn-down VMs as a step sees them: any use reads the whole. A
    step changes them by assigning a new value (``|=``), which ``watching`` notes."""

    __slots__ = ("_data", "_log")

    def __init__(self, data: frozenset[str], log: Log) -> None:
        self._data, self._log = data, log

    def _read(self) -> frozenset[str]:
        self._log.read((TORN_DOWN, ALL))
        return self._data

    def __contains__(self, key: object) -> bool:
        return key in self._read()

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def __or__(self, other: AbstractSet[str]) -> frozenset[str]:
        return self._read() | other


@contextmanager
def watching(platform: SimPlatform, toolstack: Toolstack, log: Log) -> Iterator[None]:
    """Run the block with every table of ``platform`` and ``toolstack`` seen through
    ``log``; the tables themselves are put back afterwards (the torn-down VMs too,
    unless the block assigned them: then that is a change)."""
    owners = {"platform": platform, "toolstack": toolstack}
    saved = [(owners[t.owner], t.attribute, getattr(owners[t.owner], t.attribute)) for t in TABLES]
    torn_down = toolstack.torn_down
    watched_torn_down = _WatchedWhole(torn_down, log)
    try:
        for table, (owner, attribute, data) in zip(TABLES, saved, strict=True):
            watched = _WatchedSet(data, table, log) if table.is_set else _WatchedMap(data, table, log)
            setattr(owner, attribute, watched)
        setattr(toolstack, "torn_down", watched_torn_down)  # noqa: B010  # not its declared type
        yield
    finally:
        for owner, attribute, data in saved:
            setattr(owner, attribute, data)
        if getattr(toolstack, "torn_down") is watched_torn_down:  # noqa: B009  # not its declared type
            toolstack.torn_down = torn_down
        else:
            log.touch((TORN_DOWN, ALL))


class Memo:
    """Outcomes of runs, per action, under the values of the cells each run read.

    The tree branches on the identity of each value read: the values of a state's
    parts are interned here (equal values are one object, kept alive by the tables),
    so a branch is taken without hashing a record or a domain again."""

    def __init__(self) -> None:
        self.hits = 0
        self.runs = 0
        self.reset()

    def reset(self) -> None:
        """Forget every outcome (to bound memory: they are found again by running)."""
        self.size = 0  # reads kept in the tree: a bound on its nodes
        self._roots: dict[Any, _Node] = {}
        self._parts: dict[Any, Any] = {}
        self._values: dict[Any, Any] = {}
        self._dicts: dict[int, dict[Any, Any]] = {}
        self._keys: dict[int, frozenset[Any]] = {}
        self._after: dict[tuple[int, int], Any] = {}
        self._lenses: dict[int, dict[Any, int]] = {}
        self._platform_lenses: dict[int, tuple[tuple[Any, ...], list[dict[Any, int]]]] = {}

    def caches(self) -> list[dict[Any, Any]]:
        """What may be cleared at any time without forgetting an outcome."""
        return [self._after, self._dicts, self._keys, self._lenses, self._platform_lenses]

    # -- reading a state's cells ---------------------------------------------------
    def _part(self, part: Any) -> Any:
        """The one object of the parts equal to ``part`` (frozensets keep their hash)."""
        return self._parts.setdefault(part, part)

    def _as_dict(self, index: int, part: Any) -> dict[Any, Any]:
        """A mapping part as a dict of interned values (``part`` interned)."""
        found = self._dicts.get(id(part))
        if found is None:
            entries = ((d.name, d) for d in part) if index == DOMAINS else part
            intern = self._values.setdefault
            found = self._dicts[id(part)] = {key: intern(value, value) for key, value in entries}
        return found

    def value(self, state_parts: Parts, cell: Cell) -> Any:
        """The value ``cell`` has in a state, as an interned object (a set's member:
        True, else ``ABSENT``, as a mapping's missing key)."""
        index, key = cell
        part = self._part(state_parts[index])
        if key is ALL:
            return part
        if index < len(TABLES) and TABLES[index].is_set:
            return True if key in part else ABSENT
        if key is KEYS:
            return self._keys_of(index, part)
        return self._as_dict(index, part).get(key, ABSENT)

    def _keys_of(self, index: int, part: Any) -> frozenset[Any]:
        keys = self._keys.get(id(part))
        if keys is None:
            keys = self._keys[id(part)] = self._part(frozenset(self._as_dict(index, part)))
        return keys

    def lens(self, platform: tuple[Any, ...], ledger: LedgerSnapshot) -> Lens:
        """A state's cells as lookups see them: per part, the identity of each cell's
        value by key (``KEYS`` and ``ALL`` included; a missing key is ``ABSENT``).
        Made once per part, and once per platform (the entry keeps it, so its id stays
        its own), and shared by every lookup in states that have them."""
        found = self._platform_lenses.get(id(platform))
        if found is None:
            ids = [self._ids(index, self._part(part)) for index, part in enumerate(platform)]
            found = self._platform_lenses[id(platform)] = (platform, ids)
        return [
            *found[1],
            self._ids(RECORDS, self._part(ledger.records)),
            self._ids(TORN_DOWN, self._part(ledger.torn_down)),
        ]

    def _ids(self, index: int, part: Any) -> dict[Any, int]:
        found = self._lenses.get(id(part))
        if found is None:
            if index == TORN_DOWN:
                found = {}
            elif TABLES[index].is_set:
                found = dict.fromkeys(part, id(True))
            else:
                found = {key: id(value) for key, value in self._as_dict(index, part).items()}
                found[KEYS] = id(self._keys_of(index, part))
            found[ALL] = id(part)
            self._lenses[id(part)] = found
        return found

    # -- looking up and storing ------------------------------------------------------
    def find(self, action: Any, lens: Lens) -> Outcome | None:
        """The outcome of a run of ``action`` that read only cells on which the state
        (seen through its ``lens``) agrees with it, if one was kept."""
        root = self._roots.get(action)
        if root is None:
            return None
        absent, pending = id(ABSENT), [root]
        while pending:
            node = pending.pop()
            if node.outcome is not None:
                self.hits += 1
                return node.outcome
            if node.cell is not None:
                index, key = node.cell
                if lens[index].get(key, absent) == node.value:
                    pending.append(node.child)  # type: ignore[arg-type]  # set with the cell
            if node.more is not None:
                for (index, key), children in node.more.items():
                    child = children.get(lens[index].get(key, absent))
                    if child is not None:
                        pending.append(child)
        return None

    def store(self, action: Any, log: Log, before: Lens, after: Parts | None, result: Any) -> Outcome:
        """Keep the outcome of a run from the state ``before`` looks at to ``after``
        (None: a run that changes nothing, as a plan or a judgement) that read and
        touched what ``log`` holds. The values read are taken through the same lens
        lookups use, so both see a cell alike."""
        self.runs += 1
        self.size += len(log.reads)
        if after is None:
            outcome = Outcome((), result, frozenset(log.reads))
        else:
            outcome = Outcome(self._changes(log, after), result)
        node = self._roots.get(action)
        if node is None:
            node = self._roots[action] = _Node()
        absent = id(ABSENT)
        for index, key in log.reads:
            node = node.branch((index, key), before[index].get(key, absent))
        if node.outcome is not None and _settled(node.outcome) != _settled(outcome):
            raise Undetermined(f"{action}: two runs read the same values and ended differently")
        node.outcome = outcome
        return outcome

    def _changes(self, log: Log, after: Parts) -> tuple[tuple[int, Any], ...]:
        by_table: dict[int, Any] = {}
        for index, key in log.touched:
            if key is ALL:
                by_table[index] = ALL
            elif by_table.get(index) is not ALL:
                by_table.setdefault(index, {})[key] = self.value(after, (index, key))
        return tuple(
            (index, self._part(after[index]) if keyed is ALL else tuple(keyed.items()))
            for index, keyed in sorted(by_table.items())
        )

    @staticmethod
    def differ(before: Lens, after: Lens) -> set[Cell]:
        """The cells whose values differ between two states' lenses (a changed part's
        ``ALL``, and its ``KEYS`` when keys came or went, among them)."""
        absent, changed = id(ABSENT), set[Cell]()
        for index, (old, new) in enumerate(zip(before, after, strict=True)):
            if old is not new:
                came = 0  # keys of ``new`` that ``old`` lacks
                for key, value in new.items():
                    was = old.get(key, absent)
                    if was != value:
                        changed.add((index, key))
                        came += was == absent
                if len(old) > len(new) - came:  # some keys went: no union of the key sets
                    changed.update((index, key) for key in old if key not in new)
        return changed

    # -- the state after -------------------------------------------------------------
    def after(self, state_parts: Parts, outcome: Outcome, intern: Callable[[Any], Any]) -> Parts:
        """``state_parts`` with ``outcome``'s changes made (each new part interned)."""
        new = list(state_parts)
        for index, change in outcome.changes:
            part = new[index]
            if isinstance(change, tuple):
                part = self._part(part)
                key = (id(part), id(change))  # both kept alive: the part here, the change in the tree
                found = self._after.get(key)
                if found is None:
                    found = self._after[key] = self._part(intern(self._changed(index, part, change)))
                new[index] = found
            else:
                new[index] = change
        return tuple(new)

    def _changed(self, index: int, part: Any, changes: tuple[tuple[Any, Any], ...]) -> Any:
        if TABLES[index].is_set:
            members = set(part)
            for key, present in changes:
                (members.discard if present is ABSENT else members.add)(key)
            return frozenset(members)
        entries = dict(self._as_dict(index, part))
        for key, value in changes:
            if value is ABSENT:
                entries.pop(key, None)
            else:
                entries[key] = value
        return frozenset(entries.values() if index == DOMAINS else entries.items())
