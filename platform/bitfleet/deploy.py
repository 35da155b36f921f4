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


# ---- exact float parts: an exporter verifies that its engine repeats torch's rounding
def batchnorm_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) float32 of an eval-mode BatchNorm2d as torch's CPU kernel holds them (y = x·scale +
    shift), read from the layer itself: shift = BN(0); scale = BN(2^40) / 2^40 (the shift is lost in rounding)."""
    channels = np.full((bn.num_features, 2), 2.0**40, np.float32)
    channels[:, 0] = 0
    out = batchnorm(bn, channels)
    return (out[:, 1] / np.float32(2.0**40)).astype(np.float32), out[:, 0].astype(np.float32)


def batchnorm(bn, x: np.ndarray) -> np.ndarray:
    """torch's eval-mode BatchNorm2d of x (channels, n), laid out as a map (1, C, n, 1) as in a network."""
    import torch

    with torch.no_grad():
        return bn(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, :, :, None])[0, :, :, 0].numpy()


def affine(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, rounding: str) -> np.ndarray:
    """x·scale + shift in float32, channels on the last axis, rounded as `rounding` says torch does: once
    ("fma": float64 holds the product exactly) or after the product and again after the sum ("mul_add")."""
    if rounding == "fma":
        return (x.astype(np.float64) * scale + shift).astype(np.float32)
    return x.astype(np.float32) * scale + shift


def batchnorm_rounding(bn, x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> str | None:
    """Which rounding of `affine` gives torch's BN on every input in `x` (channels, n); None if neither."""
    expected = batchnorm(bn, x)
    return next((r for r in ("fma", "mul_add") if np.array_equal(affine(x.T, scale, shift, r).T, expected)), None)
