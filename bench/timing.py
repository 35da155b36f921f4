"""The one way the benchmarks time a training step: median seconds of forward, backward and update."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step (cross-entropy): forward, backward, update."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 steps: int) -> float:
    """Median seconds of a full training step over `steps`, after one warm-up step."""
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        train_step(model, optimizer, x, y)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[steps // 2]
