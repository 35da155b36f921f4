"""A distribution of the test-only workloads, made on the fly: a folder to put on PYTHONPATH whose
`*.dist-info/entry_points.txt` registers them in group `bitfleet.workloads`, as `pip install` of a
package with that entry point would."""
from __future__ import annotations

from pathlib import Path

WORKLOADS = {"regression": "tests.workloads.regression:Regression"}


def write(folder: Path) -> Path:
    info = folder / "bitfleet_test_workloads-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bitfleet-test-workloads\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[bitfleet.workloads]\n" + "".join(f"{name} = {target}\n" for name, target in WORKLOADS.items()))
    return folder
