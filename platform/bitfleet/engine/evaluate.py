"""Evaluation of a model on a split: the objective's per-batch sums, added up over the batches and the
ranks, turned into `{split}/<name>` metrics.

One function for the loop's evaluation after every epoch (each rank its shard, summed over ranks) and for
`bitfleet eval` (one process, the whole split): the figures come from the same sums, so a checkpoint
evaluated again gives the accuracy its run reported. The counts (correct, seen) are exact in float32 up to
2^24 images; the loss sum is added in another order when the split is cut into other shards or batches,
so it may differ in its last bits.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import nn

from bitfleet.engine.objective import Objective


def batch_sums(objective: Objective, loss_sum: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor,
               train: bool) -> torch.Tensor:
    """[loss sum, images, the objective's sums] of one batch, float32."""
    seen = loss_sum.new_tensor(len(labels), dtype=torch.float32)
    return torch.cat([torch.stack([loss_sum.float(), seen]), objective.batch_sums(outputs, labels, train)])


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, objective: Objective, split: str, device: torch.device, *,
             autocast: Callable = nullcontext, max_steps: int | None = None,
             reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> dict[str, float]:
    """The objective's metrics of `model` (put in eval mode) over `loader`'s (images, labels) batches, its
    first `max_steps` only when given; `reduce` adds up the sums of every rank (an all-reduce)."""
    model.eval()
    sums = torch.zeros(2 + len(objective.sums), device=device)
    for step, (images, labels) in enumerate(loader):
        if step == max_steps:
            break
        images, labels = images.to(device), labels.to(device)
        with autocast():
            outputs = model(images).float()
        sums += batch_sums(objective, objective.eval_loss_sum(outputs, labels), outputs, labels, train=False)
    loss_sum, seen, *rest = reduce(sums).tolist()
    return objective.metrics(split, loss_sum, max(seen, 1), rest, train=False)
