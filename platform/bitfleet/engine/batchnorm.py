"""BatchNorm recalibration: re-estimate every BN layer's running statistics from a few training batches.

During training the running statistics are an exponential average (momentum 0.1) of batch statistics
computed under weights that kept moving; when the weights move fast (binary networks, deep unclipped
shortcut streams, the start of a run) or the evaluated weights are not the trained ones (an EMA), they
trail what the current weights produce and eval-mode accuracy falls well below train-mode accuracy.
Recalibration resets them and takes the cumulative average (`momentum=None`) over `batches` training
batches under the current weights, then averages over ranks. Training batches only: never the eval set.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bitfleet.engine.callbacks import Callback, TrainState


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BN layers that keep running statistics (one without them normalises by the batch in eval mode too)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate(model: nn.Module, loader, batches: int) -> int:
    """Running mean and variance of every BN layer of `model` := the average of its per-batch mean and
    (unbiased) variance over the first `batches` batches of `loader` (`(images, labels)` pairs), pooled over
    ranks when torch.distributed is initialised. Momenta and train/eval modes are restored. Returns the
    number of batches this rank used."""
    norms = batch_norms(model)
    if not norms or batches <= 0:
        return 0
    device = next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    modes = [(m, m.training) for m in model.modules()]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
    model.train()  # BN must see batch statistics; frozen-BN callbacks may have left some in eval mode
    used = 0
    try:
        for images, _ in loader:
            if used == batches:
                break
            model(images.to(device, non_blocking=True))
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _pool_over_ranks(norms)
    return used


def _pool_over_ranks(norms: list[nn.modules.batchnorm._BatchNorm]) -> None:
    """Equal shards: pooled mean = mean of the rank means; pooled variance = mean of the rank variances plus
    the variance of the rank means (E[x²] − E[x]², so rank shards with different means are not understated).
    One all_reduce for all layers."""
    world = dist.get_world_size()
    means = torch.cat([m.running_mean for m in norms])
    flat = torch.cat([means, torch.cat([m.running_var for m in norms]) + means.square()])
    dist.all_reduce(flat)
    flat /= world
    mean, second = flat.split(len(means))
    var = second - mean.square()
    offset = 0
    for m in norms:
        n = m.running_mean.numel()
        m.running_mean.copy_(mean[offset:offset + n])
        m.running_var.copy_(var[offset:offset + n].clamp(min=0))
        offset += n


class BNRecalibration(Callback):
    """Before evaluation: recalibrate every evaluated model (the trained weights, and their EMA) on `batches`
    batches of this rank's training loader, whenever `due` (by default before every evaluation). Workloads
    narrow `due` or wrap `recalibrate` (e.g. in the forward path evaluation runs). Reports
    `bn/recalibrated_batches`: the batches used. With `report_uncalibrated`, the trained weights are first
    evaluated as they are, reported as `uncalibrated/<split>/*`: what recalibration changed is in the metrics."""

    def __init__(self, batches: int, report_uncalibrated: bool = False):
        self.batches, self.report_uncalibrated = batches, report_uncalibrated

    def due(self, state: TrainState) -> bool:
        return True

    def recalibrate(self, model: nn.Module, loader) -> int:
        return recalibrate(model, loader, self.batches)

    def on_eval_start(self, state: TrainState) -> None:
        if not self.batches or not self.due(state):
            return
        if self.report_uncalibrated and state.evaluate is not None:
            raw = state.evaluated.get("", state.model)
            state.metrics.update({f"uncalibrated/{key}": value for key, value in state.evaluate(raw).items()})
        for model in state.evaluated_models():
            used = self.recalibrate(model, state.train_loader)
        state.metrics["bn/recalibrated_batches"] = float(used)


@torch.no_grad()
def broadcast_buffers(*modules: nn.Module | None) -> None:
    """Rank 0's buffers (BN running statistics) on every rank, one broadcast per dtype.

    Training sees batch statistics, but each rank's running averages follow its own shard. Evaluating
    and checkpointing rank 0's everywhere makes the ranks agree, and makes a restore, which gives every
    rank rank 0's saved buffers, continue exactly as the uninterrupted run. DDP broadcasts them before
    each forward, which leaves the last batch's update out of step; DeepSpeed never does.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    buffers = [b for module in modules if module is not None for b in module.buffers()]
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src=0)
        for b, value in zip(group, flat.split([b.numel() for b in group])):
            b.copy_(value.view_as(b))
