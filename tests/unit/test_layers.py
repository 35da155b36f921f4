"""The platform's imports run one way: no circle, and no arrow from a lower layer back up (../shared/DESIGN.md).

Every `import` counts, those inside functions too: an import moved into a function to dodge a circle is
still a circle.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "platform" / "bitfleet"
LAYERS = [  # bottom to top; a module may import from its own layer or below, never above
    {"errors", "strict_yaml", "paths", "dotted"},
    {"spec"},
    {"run_identity"},
    {"registry", "storage", "schedules", "data", "metrics", "sweeps", "progress", "console", "tracking", "deploy",
     "address"},
    {"engine"},
    {"workload"},
    {"resolve", "report", "export", "evaluation", "status", "listing"},
    {"scheduler"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The bitfleet modules `path` imports (`from bitfleet.x import y` names x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if MODULES.get(f"{node.module}.{alias.name}") else node.module
                      for alias in node.names}
    return {name for name in found if name.startswith("bitfleet.") and name in MODULES}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    assert len(MODULES) > 30
    for module in MODULES:
        if module != "bitfleet":
            layer(module)


def test_no_import_circle():
    try:
        tuple(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None


def test_no_import_runs_back_up():
    upward = [f"{module} -> {target}" for module, targets in GRAPH.items() if module != "bitfleet"
              for target in targets if target != "bitfleet" and layer(target) > layer(module)]
    assert upward == []
