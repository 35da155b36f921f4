"""The exponential moving average of a model's weights (`train.ema`), as the seeds keep it.

The parameters are averaged, w_ema <- d·w_ema + (1 − d)·w, after every optimizer step; the buffers
(BatchNorm running statistics, rotation matrices, temperatures) are the live model's, copied at every
update: `torch.optim.swa_utils.AveragedModel(use_buffers=False)`. Averaging the buffers too would start BN
statistics at their initial values (mean 0, variance 1) and average statistics of weights long gone; a
compressed run (16 steps an epoch at d = 0.999) then evaluates a network still near its initialisation.

Warm-up (`warmup: true`): the decay of the t-th update is min(d, (1 + t) / (10 + t)), TensorFlow's
`ExponentialMovingAverage(num_updates=t)`. It needs no further setting, and its averaging window,
1 / (1 − d_t) = (10 + t) / 9 steps, is about the last ninth of the steps taken until it reaches the
window of `decay` (1,000 steps at d = 0.999, after about 9,000 updates): early in a run, or in a short one, the
average follows the trained weights instead of carrying its initialisation along.

The state (the averaged module and its update count) is in every checkpoint: a restored run continues
the same average, and the same warm-up.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from bitfleet.spec import EMASpec

IS_RESULT = "bitfleet_ema_is_result"  # in the EMA's state: whether its weights are the run's (train.ema.evaluate)


class EMA:
    """The averaged copy of `model`; `update()` after each optimizer step, `module` to evaluate it."""

    def __init__(self, model: nn.Module, spec: EMASpec):
        self.model, self.decay, self.warmup, self.is_result = model, spec.decay, spec.warmup, spec.evaluate
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=False)
        self.updates = 0  # mirrors `averaged.n_averaged` on the host: the decay is computed without a device sync

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def decay_at(self, updates: int) -> float:
        """The decay of the update that follows `updates` earlier ones."""
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _count) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay_at(self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Average the model's parameters in (the first update copies them) and copy its buffers."""
        self.averaged.update_parameters(self.model)
        self.updates += 1

    def state_dict(self) -> dict:
        return {**self.averaged.state_dict(), IS_RESULT: self.is_result}

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict({k: v for k, v in state.items() if k != IS_RESULT})
        self.updates = int(self.averaged.n_averaged)


def build(model: nn.Module, spec: EMASpec | None) -> EMA | None:
    return EMA(model, spec) if spec is not None else None
