"""Workload name -> a fresh Workload: every workload is registered by entry point in group `bitfleet.workloads`
(the built-ins by bitfleet's own pyproject.toml, any other package by its own)."""
from __future__ import annotations

import difflib
from functools import cache
from importlib.metadata import entry_points

from bitfleet.errors import SpecError

GROUP = "bitfleet.workloads"


@cache
def _entries() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def names() -> list[str]:
    return sorted(_entries())


@cache
def workload_class(name: str) -> type:
    """The Workload class registered as `name` (importing it registers its metrics), or a SpecError
    naming the close match."""
    entries = _entries()
    if name not in entries:
        close = difflib.get_close_matches(name, entries, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(names())}"
        raise SpecError(f"workload: unknown workload {name!r}; {hint}")
    module_name, _, attr = entries[name].partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def get(name: str, options=None):
    """A new instance of workload `name`, holding a run's typed `Options` (default options without)."""
    return workload_class(name)(options)


def load_all() -> None:
    """Import every registered workload, so that the metric catalogue holds all their metrics."""
    for name in names():
        workload_class(name)
