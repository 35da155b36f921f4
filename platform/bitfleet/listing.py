"""`bitfleet list`: the registered workloads, the networks each builds, and the specs shipped with them."""
from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

from bitfleet import registry


def shipped_specs(workload: str) -> list[Path]:
    """The ready-to-run specs of a built-in workload (`workloads/<name>/specs/*.yaml`); none for others."""
    try:
        folder = files("workloads") / workload / "specs"
    except ModuleNotFoundError:
        return []
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def describe() -> str:
    lines = []
    for name in registry.names():
        workload = registry.workload_class(name)
        lines.append(f"{name}: {_summary(workload)}")
        models = workload.models()
        lines.append(f"  models: {', '.join(models) if models else 'built from the model: section (see its README)'}")
        specs = shipped_specs(name)
        if specs:
            lines.append("  specs:")
            lines += [f"    {_shown(path)}" for path in specs]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """A spec's path relative to the working directory when it lies below it (a checkout), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _summary(workload: type) -> str:
    """The first paragraph of the workload's module docstring (`Workload `x`: what it is`)."""
    doc = (sys.modules[workload.__module__].__doc__ or "").strip().split("\n\n")[0]
    text = " ".join(doc.split())
    return text.split(": ", 1)[1] if text.startswith("Workload `") and ": " in text else text
