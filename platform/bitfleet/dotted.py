"""Dotted paths into nested mappings (`train.optimizer.lr`): a spec's overrides, sweeps, digests and
trackers address its fields so."""
from __future__ import annotations

from typing import Any

from bitfleet.errors import SpecError


def leaves(tree: dict[str, Any], prefix: str = ""):
    """(dotted path, value) of every leaf; an empty mapping and a list are leaves."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_path(raw: dict, key: str, value: Any, where: str) -> None:
    """raw[a][b][c] = value for the dotted key `a.b.c`, creating sections on the way."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{where}: {part!r} is not a section")
        node = child
    node[leaf] = value
