"""One checkpoint format: a directory with `state.pt` holding every stateful piece of a run.

model, optimizer, lr scheduler, AMP grad scaler, EMA, callbacks, the epoch/step counters and the metric
history. A sharded strategy (DeepSpeed ZeRO) keeps the optimizer in per-rank shards beside it
(engine/strategy.py); `state.pt` still holds the full weights. Randomness needs no saved generator
state: the loop reseeds every epoch from (seed, epoch, rank), and the samplers derive their order from
(seed, epoch), so a run restored at an epoch boundary draws exactly what the uninterrupted run would
have drawn.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

FILE = "state.pt"
SHARDS = "deepspeed"  # the sub-folder of a sharded strategy's per-rank files (DeepSpeed ZeRO)
TAG = "state"  # their DeepSpeed tag: one checkpoint per Ray checkpoint folder
NO_SHARDS = (f"no DeepSpeed shards ({SHARDS}/{TAG}); a DeepSpeed run resumes only a DeepSpeed checkpoint "
             "(train.init_from takes the weights of any checkpoint)")


def has_shards(directory: str | Path) -> bool:
    return (Path(directory) / SHARDS / TAG).is_dir()


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / FILE
    torch.save(state, path)
    return path


def load(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / FILE, map_location="cpu", weights_only=True)


@contextmanager
def to_ray(state: dict[str, Any] | None, write_shard=None) -> Iterator[ray.train.Checkpoint]:  # noqa: F821
    """A `ray.train.Checkpoint` in a temporary directory, valid inside the `with`: `state` (rank 0's; None on
    the other ranks) and what `write_shard(directory)` writes. Ray merges the ranks' files into one folder."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="bitfleet-ckpt-") as tmp:
        if state is not None:
            save(tmp, state)
        if write_shard is not None:
            write_shard(Path(tmp))
        yield ray.train.Checkpoint.from_directory(tmp)


def weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The weights a user wants from a checkpoint: the EMA's when the run kept one, else the model's."""
    state = load(directory)
    ema = state.get("ema")
    if ema:
        return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    return state["model"]


def find(path: str | Path) -> Path:
    """The checkpoint folder `path` names: itself, or a run folder's best (else latest) checkpoint."""
    path = Path(path)
    if (path / FILE).is_file():
        return path
    result = path / "result.json"
    if result.is_file():
        summary = json.loads(result.read_text())
        for key in ("best_checkpoint", "last_checkpoint"):
            if summary.get(key) and (Path(summary[key]) / FILE).is_file():
                return Path(summary[key])
    found = sorted(path.glob(f"checkpoint_*/{FILE}"))
    if not found:
        raise FileNotFoundError(f"{path}: neither a checkpoint ({FILE}) nor a run folder with checkpoints")
    return found[-1].parent
