"""The file an exported engine lives in: named numpy arrays and a JSON header, one `.npz`.

The header says what the engine needs to run without its run folder — the workload that reads the arrays,
the data section its images come from (`data`) — and where it came from. Written atomically: a file that
is there is whole.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from bitfleet.errors import SpecError

FORMAT = 1
HEADER = "header.json"  # the array holding the header, as JSON text


def save(path: str | Path, arrays: dict[str, np.ndarray], header: dict) -> int:
    """Write `arrays` and `header` to `path` (.npz); returns its size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **{HEADER: np.array(json.dumps({"format": FORMAT, **header}))}, **arrays)
    os.replace(tmp, path)
    return path.stat().st_size


def load(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of an engine file, or a SpecError saying why it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SpecError(f"--engine: cannot read {path}: {exc}") from None
    if HEADER not in arrays:
        raise SpecError(f"--engine: {path} is not an exported engine (no {HEADER}); write one with `bitfleet export`")
    header = json.loads(str(arrays.pop(HEADER)))
    if header.get("format") != FORMAT:
        raise SpecError(f"--engine: {path} has format {header.get('format')}; this bitfleet reads format {FORMAT}")
    return header, arrays
