"""Workload name -> Workload: the built-ins and any package's entry points in group `bitfleet.workloads`."""
from __future__ import annotations

import difflib
from functools import cache
from importlib.metadata import entry_points

from bitfleet.spec import SpecError

GROUP = "bitfleet.workloads"


@cache
def _entries() -> dict[str, str]:
    """Every workload is registered by entry point, the built-ins by bitfleet's own pyproject.toml."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def names() -> list[str]:
    return sorted(_entries())


@cache
def get(name: str):
    """The Workload instance registered as `name`, or a SpecError naming the close match."""
    entries = _entries()
    if name not in entries:
        close = difflib.get_close_matches(name, entries, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(names())}"
        raise SpecError(f"workload: unknown workload {name!r}; {hint}")
    module_name, _, attr = entries[name].partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)()
