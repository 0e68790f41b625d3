"""YAML loading that remembers where every value came from, for error messages."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Any, TypeVar

import pydantic
import yaml

from pciguard.errors import InputError

Path = tuple[str | int, ...]
KEY = "<key>"  # positions[(*path, KEY)] is where the key itself is written


MAX_DEPTH = 64  # nesting of mappings and lists; pciguard's formats need fewer than 10
MAX_INPUT = 4 << 20  # bytes of a platform, scenario or policy file


class _Loader(yaml.SafeLoader):
    """YAML without the parts that let a small file grow without bound or run code
    paths nobody needs: no anchors or aliases (a 1 KB "billion laughs" file expands to
    gigabytes), no nesting deeper than MAX_DEPTH, and dates left as text."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None,
                None,
                "anchors and aliases (& and *) are not accepted in pciguard files",
                event.start_mark,
            )
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self.depth -= 1


# Dates stay text: YAML 1.1 would build datetime objects, and raise on 2024-02-30.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load(text: str, source: str) -> tuple[Any, dict[Path, tuple[int, int]]]:
    """Parse ``text``; return the data and a map from key path to (line, column)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        raise InputError(source, f"not valid YAML: {exc.problem}", line=line, column=col) from None
    except yaml.reader.ReaderError as exc:
        line, col = _place(text, exc.position)
        raise InputError(
            source,
            f"not valid YAML: character U+{_code(exc.character):04X} is not allowed",
            line=line,
            column=col,
        ) from None
    except yaml.YAMLError as exc:
        raise InputError(source, f"not valid YAML: {exc}") from None
    positions: dict[Path, tuple[int, int]] = {}
    if node is None:
        raise InputError(source, "the file is empty")
    constructor = yaml.constructor.SafeConstructor()

    def scalar(n: yaml.Node, path: Path) -> Any:
        if ":" in str(n.value) and n.tag != "tag:yaml.org,2002:str":
            return n.value  # a PCI address, not YAML 1.1's base-60 number
        try:
            return constructor.construct_object(n, deep=True)
        except yaml.constructor.ConstructorError as exc:
            problem = str(exc.problem)
        except (ValueError, OverflowError) as exc:  # integers over 4,300 digits among them
            problem = f"{str(n.value)[:40]!r} is not a value pciguard can use ({str(exc)[:80]})"
        raise InputError(source, problem, key_path=render(path), line=n.start_mark.line + 1)

    def convert(n: yaml.Node, path: Path) -> Any:
        positions[path] = (n.start_mark.line + 1, n.start_mark.column + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                key = scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
                positions[(*path, str(key), KEY)] = (
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                )
                if not isinstance(key, str | int) or isinstance(key, bool):
                    raise InputError(
                        source,
                        "keys must be plain words",
                        key_path=render(path),
                        line=key_node.start_mark.line + 1,
                    )
                if key in out:
                    raise InputError(
                        source,
                        f"key '{key}' appears twice",
                        key_path=render(path),
                        line=key_node.start_mark.line + 1,
                        column=key_node.start_mark.column + 1,
                    )
                out[key] = convert(value_node, (*path, key))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [convert(item, (*path, i)) for i, item in enumerate(n.value)]
        return scalar(n, path)

    return convert(node, ()), positions


def _code(character: str | int) -> int:
    return ord(character) if isinstance(character, str) else character


def _place(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def read_input(path: FsPath, what: str) -> str:
    """The text of an input file, or an InputError saying why it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT + 1)
    except OSError as exc:
        raise InputError(str(path), f"cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > MAX_INPUT:
        raise InputError(str(path), f"the {what} is larger than {MAX_INPUT >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(str(path), f"the {what} is not UTF-8 text") from None


def render(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


T = TypeVar("T", bound=pydantic.BaseModel)


def validate(
    model: type[T],
    data: Any,
    positions: dict[Path, tuple[int, int]],
    source: str,
    prefix: Path = (),
) -> T:
    """Validate with pydantic; turn its error into an InputError with a place."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise error_at(exc, positions, source, prefix) from None


def error_at(
    exc: pydantic.ValidationError,
    positions: dict[Path, tuple[int, int]],
    source: str,
    prefix: Path = (),
) -> InputError:
    # Union errors list every branch; the deepest location is the most specific.
    first = max(exc.errors(), key=lambda e: len(e["loc"]))
    # Keep the parts of pydantic's location that are real keys (drop union-member tags).
    loc: Path = prefix
    raw = [p for p in first["loc"] if isinstance(p, int | str)]
    for i, part in enumerate(raw):
        if (*loc, part) in positions or (i == len(raw) - 1 and first["type"] == "missing"):
            loc = (*loc, part)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key '{loc[-1]}'"
        loc = (*loc, KEY)
    elif first["type"] == "missing":
        message = f"'{loc[-1]}' is required here"
        loc = loc[:-1]
    return at(source, message, loc, positions)


def at(source: str, message: str, path: Path, positions: dict[Path, tuple[int, int]]) -> InputError:
    """An InputError placed at ``path`` (or the nearest enclosing place we know)."""
    probe = path
    while probe not in positions and probe:
        probe = probe[:-1]
    line, col = positions.get(probe, (None, None))
    shown = path[:-1] if path and path[-1] == KEY else path
    return InputError(source, message, key_path=render(shown), line=line, column=col)
