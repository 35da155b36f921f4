"""The random streams of a worker: seeded per epoch from the spec, saved and restored mid-epoch.

Each epoch starts from (seed, epoch, rank), so an epoch's randomness is reproducible on its own; a
mid-epoch checkpoint saves the streams as they are after its step (the training step's draws: dropout,
mixup), and a restore puts them back.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Seed python, numpy and torch from (seed, epoch, rank): each epoch's randomness is reproducible alone."""
    value = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def rng_states() -> dict:
    """This process's random streams: torch (CPU and each CUDA device), numpy, python."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])
