"""The one YAML loader of spec files and `-o` values: `yaml.safe_load`'s data, within the bounds of a spec.

`safe_load` builds plain data only, but it still accepts what no spec needs and what a hostile one abuses:
a key written twice (the last one silently wins), aliases that share one node many times over (a "billion
laughs": harmless while shared, it grows without bound once the spec is dumped or copied), nesting deep
enough to exhaust Python's recursion limit, infinite and NaN numbers, integers of thousands of digits,
dates, sets and binary blobs where a spec holds numbers and strings, and bytes that are not UTF-8. Each of
those is one SpecError here, naming the field (or the line) and what was expected. The composed node graph
is checked before any Python object is built from it, and the data returned shares no object between two
places, so that an override of one of them never changes the other.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from bitfleet.errors import SpecError

MAX_BYTES = 256 << 10  # a spec file; the largest shipped one is a few KB
MAX_DEPTH = 32  # nested mappings and lists, counted through aliases
MAX_VALUES = 10_000  # nodes of the spec once every alias is expanded
MAX_INT = 2**63 - 1  # integers fit in 64 bits
_TAG = "tag:yaml.org,2002:"
_SCALARS = {f"{_TAG}{name}" for name in ("str", "int", "float", "bool", "null")}
_COLLECTIONS = {yaml.SequenceNode: f"{_TAG}seq", yaml.MappingNode: f"{_TAG}map"}


def load_file(path: str | Path) -> Any:
    """The data of a spec file (None for an empty one)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise SpecError(f"{path}: larger than {MAX_BYTES:,} bytes: not a spec")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8: byte {exc.start} (0x{data[exc.start]:02x}) {exc.reason}; "
                        "save the spec as UTF-8") from None
    return load_text(text, source=str(path))


def load_text(text: str, source: str, field: str = "", lines: bool = True) -> Any:
    """The data of YAML `text`. Errors name `source` (syntax) or the field, under `field` for a `-o` value;
    `lines`: say on which line a value is (not for a one-line `-o` value)."""
    if len(text) > MAX_BYTES:
        raise SpecError(f"{source}: larger than {MAX_BYTES:,} characters")
    try:
        loader = _Loader(text, field, lines)  # its reader refuses control characters here
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise SpecError(f"{source}: line {line}: invalid YAML: character {chr(exc.character)!r} is not allowed "
                        "(no control characters in a spec)") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _Checks(lines).walk(node, field, 0)
        return _unshared(loader.construct_document(node))
    except yaml.MarkedYAMLError as exc:
        where = _where(exc.problem_mark) if lines else f"cannot parse value {text[:60]!r}: "
        raise SpecError(f"{source}: {where}invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""


def _error(path: str, mark, problem: str, lines: bool) -> SpecError:
    line = f" (line {mark.line + 1})" if lines and mark else ""
    return SpecError(f"{path or '<top level>'}: {problem}{line}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Loader(yaml.SafeLoader):
    """SafeLoader that stops composing at MAX_DEPTH, before Python's recursion limit does, and at MAX_VALUES
    nodes, before a long list has been parsed to its end; either error names the field it is in."""

    def __init__(self, text: str, field: str, lines: bool):
        super().__init__(text)
        self.path, self.lines, self.nodes = [field] if field else [], lines, 0

    def compose_node(self, parent, index):
        if parent is not None:  # `index`: the key node of a mapping's value, a list position, None for a key
            self.path.append("?" if index is None else str(getattr(index, "value", index)))
        self.nodes += 1
        try:
            if len(self.path) > MAX_DEPTH or self.nodes > MAX_VALUES:
                problem = (f"nested deeper than {MAX_DEPTH} levels" if len(self.path) > MAX_DEPTH
                           else f"more than {MAX_VALUES:,} values")
                shown = ".".join(self.path[:8]) + (".…" if len(self.path) > 8 else "")
                raise _error(shown, self.peek_event().start_mark, problem, self.lines)
            return super().compose_node(parent, index)
        finally:
            if parent is not None:
                self.path.pop()


class _Checks:
    """One walk over the composed node graph: keys (names, written once), the scalars' types and values,
    and the size and depth of the data once aliases are expanded (each node measured once)."""

    def __init__(self, lines: bool):
        self.lines = lines
        self.measured: dict[int, tuple[int, int] | None] = {}  # node id -> (values, height); None: being measured

    def fail(self, path: str, node, problem: str):
        raise _error(path, node.start_mark, problem, self.lines)

    def walk(self, node, path: str, depth: int) -> tuple[int, int]:
        """(values, height) of the data `node` expands to; `depth`: where it sits."""
        key = id(node)
        if key in self.measured:
            if self.measured[key] is None:
                self.fail(path, node, "an alias inside its own anchor (recursive data)")
        else:
            self.measured[key] = None
            self.measured[key] = self._measure(node, path, depth)
        values, height = self.measured[key]
        if depth + height > MAX_DEPTH:
            self.fail(path, node, f"nested deeper than {MAX_DEPTH} levels (counting what aliases expand to)")
        return values, height

    def _measure(self, node, path: str, depth: int) -> tuple[int, int]:
        if isinstance(node, yaml.ScalarNode):
            self._scalar(node, path)
            return 1, 0
        if node.tag != _COLLECTIONS[type(node)]:
            self.fail(path, node, f"a YAML {node.tag.removeprefix(_TAG)}, which a spec does not hold")
        if isinstance(node, yaml.SequenceNode):
            children = [(_join(path, str(i)), child) for i, child in enumerate(node.value)]
        else:
            children = self._mapping_children(node, path)
        values, height = 1, 0
        for child_path, child in children:
            child_values, child_height = self.walk(child, child_path, depth + 1)
            values, height = values + child_values, max(height, child_height + 1)
            if values > MAX_VALUES:
                self.fail(path, node, f"more than {MAX_VALUES:,} values once its aliases are expanded")
        return values, height

    def _mapping_children(self, node, path: str) -> list:
        seen: dict[str, yaml.Mark] = {}
        children = []
        for key_node, value_node in node.value:
            if key_node.tag == f"{_TAG}merge":  # `<<: *base`: the merged mapping's keys join this one
                children.append((path, value_node))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(path, key_node, "a key is a name, not a list or a mapping")
            name = key_node.value
            if key_node.tag != f"{_TAG}str":
                self.fail(_join(path, name), key_node, f"this key reads as a YAML "
                          f"{key_node.tag.removeprefix(_TAG)}, not a name (quote it: {name!r})")
            if name in seen:
                first, again = seen[name], key_node.start_mark
                where = (f"lines {first.line + 1} and {again.line + 1}" if first.line != again.line else
                         f"line {first.line + 1}, columns {first.column + 1} and {again.column + 1}")
                raise SpecError(f"{_join(path, name)}: duplicate key {name!r} on {where} (a key is written once)")
            seen[name] = key_node.start_mark
            if "\0" in name:
                self.fail(path, key_node, "a key holds a NUL character")
            children += [(path, key_node), (_join(path, name), value_node)]
        return children

    def _scalar(self, node, path: str) -> None:
        if node.tag not in _SCALARS:
            kind = node.tag.removeprefix(_TAG)
            self.fail(path, node, f"{node.value!r} reads as a YAML {kind}, which a spec does not hold "
                                  "(quote it to make it a string)")
        if node.tag == f"{_TAG}float":
            value = yaml.SafeLoader.construct_yaml_float(_CONSTRUCTOR, node)
            if not math.isfinite(value):
                self.fail(path, node, f"{node.value} is not a finite number")
        elif node.tag == f"{_TAG}int":
            if len(node.value) > 32 or abs(yaml.SafeLoader.construct_yaml_int(_CONSTRUCTOR, node)) > MAX_INT:
                self.fail(path, node, f"{node.value[:32]}{'...' if len(node.value) > 32 else ''} does not fit "
                                      "in 64 bits")
        elif "\0" in node.value:
            self.fail(path, node, "a NUL character in a string (no path or name holds one)")


_CONSTRUCTOR = yaml.SafeLoader("")  # its scalar constructors are pure functions of a node


def _unshared(data: Any) -> Any:
    """A copy in which no mapping or list appears twice (aliases made separate values; size already bounded)."""
    if isinstance(data, dict):
        return {key: _unshared(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_unshared(item) for item in data]
    return data
