"""The hook protocol workloads plug into: temperature schedules, rotation updates, freezes.

A callback sees the `TrainState` at epoch start, after each optimizer step, before and after evaluation
and at epoch end. `on_epoch_start` runs again when a run resumes mid-epoch: what a callback does once an
epoch (a rotation update) must record in its state that it was done. Whatever it writes into `state.metrics` is reported
with the epoch's metrics. Its `state_dict` is saved in every checkpoint, so a restored run continues its
schedules exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bitfleet.data import DataInfo
from bitfleet.spec import DataSpec


@dataclass(frozen=True)
class RunContext:
    """What a workload's worker-side hooks (`setup`, `callbacks`) may know of the run besides the workload's
    own config."""

    epochs: int
    run_path: str  # the run's folder or URI (bitfleet.storage writes to both)
    data: DataSpec
    info: DataInfo
    rank: int = 0
    world_size: int = 1


@dataclass
class TrainState:
    """What the loop shares with callbacks. `model` is the bare module (not the DDP wrapper)."""

    model: nn.Module
    optimizer: Any
    epoch: int = 0  # the epoch being run, 0-based; equals the number of completed epochs between epochs
    epochs: int = 1
    global_step: int = 0
    step_in_epoch: int = 0  # steps done in the epoch being run
    steps_per_epoch: int = 1
    rank: int = 0
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)  # extra telemetry for this epoch
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)  # values to histogram this epoch (rank 0)
    eval_model: nn.Module | None = None  # what evaluation runs: the EMA's module or `model`
    train_loader: Any = None  # this rank's training batches (BN recalibration reads a few)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1], at step resolution."""
        return min(1.0, self.global_step / max(1, self.epochs * self.steps_per_epoch))


class Callback:
    """Override what you need; every hook defaults to nothing."""

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def on_eval_start(self, state: TrainState) -> None: ...

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callbacks(Callback):
    """Several callbacks called in order, saved and restored as one list."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def on_epoch_start(self, state):
        for cb in self.callbacks:
            cb.on_epoch_start(state)

    def on_step_end(self, state):
        for cb in self.callbacks:
            cb.on_step_end(state)

    def on_eval_start(self, state):
        for cb in self.callbacks:
            cb.on_eval_start(state)

    def on_eval_end(self, state, metrics):
        for cb in self.callbacks:
            cb.on_eval_end(state, metrics)

    def on_epoch_end(self, state, metrics):
        for cb in self.callbacks:
            cb.on_epoch_end(state, metrics)

    def state_dict(self):
        return {"callbacks": [cb.state_dict() for cb in self.callbacks]}

    def load_state_dict(self, state):
        saved = state.get("callbacks", [])
        assert len(saved) == len(self.callbacks), "checkpoint was written with other callbacks"
        for cb, sd in zip(self.callbacks, saved):
            cb.load_state_dict(sd)


class HoldParameters(Callback):
    """Keeps the parameters `held(state)` names (at each epoch start) at their values: they are put back
    after every optimizer step — which works under DDP and with any optimizer, unlike toggling
    `requires_grad` — and one let go has its optimizer state cleared, so no momentum from the held epochs
    carries over."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}
        self.epoch = -1  # the epoch `values` were taken at

    def held(self, state: TrainState) -> set[str]:
        return set()

    def on_epoch_start(self, state):
        if self.epoch == state.epoch:  # resumed mid-epoch: hold what the epoch's start held, and put it back
            self.on_step_end(state)  # where the callbacks before this one (a temperature schedule) moved it
            return
        self.epoch = state.epoch
        names = self.held(state)
        params = dict(state.model.named_parameters())
        for name in set(self.values) - names:
            state.optimizer.state.pop(params[name], None)
        self.values = {name: params[name].detach().clone() for name in names}

    def on_step_end(self, state):
        if not self.values:
            return
        params = dict(state.model.named_parameters())
        with torch.no_grad():
            for name, value in self.values.items():
                params[name].copy_(value)

    def state_dict(self):
        return {"held_epoch": self.epoch, "held": self.values}

    def load_state_dict(self, state):
        self.epoch, self.values = state.get("held_epoch", -1), state.get("held", {})  # older runs saved none
