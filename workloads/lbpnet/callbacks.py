"""LBPNet's training schedules as engine callbacks: temperatures, freezes, hard fine-tune, BN
recalibration, the collapse guard and the per-epoch telemetry. Each saves its state in the checkpoint.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from bitfleet import schedules
from bitfleet.engine import batchnorm
from bitfleet.engine.callbacks import Callback, HoldParameters, TrainState
from workloads.lbpnet import paper_metrics
from workloads.lbpnet.models import lbp_layers, rp_layers


class Temperatures(Callback):
    """alpha (LBP comparisons) and tau (gates) follow their schedules at step resolution; the collapse
    guard may multiply alpha by a softening factor until a given epoch. The schedule sets each layer's
    `alpha_base`: a layer that learns alpha (`learn_alpha`) keeps its learned factor on top of it."""

    def __init__(self, spec):
        self.spec = spec  # TempSchedule
        self.soften_factor, self.soften_until = 1.0, -1

    def apply(self, state: TrainState) -> None:
        soften = self.soften_factor if state.epoch < self.soften_until else 1.0
        with torch.no_grad():
            if self.spec.alpha is not None:
                alpha = schedules.value(self.spec.alpha, state.progress) * soften
                for layer in lbp_layers(state.model):
                    layer.alpha_base.fill_(alpha)
            if self.spec.tau is not None:
                tau = schedules.value(self.spec.tau, state.progress)
                for layer in rp_layers(state.model):
                    layer.tau.fill_(tau)

    on_epoch_start = apply
    on_step_end = apply

    def state_dict(self):
        return {"soften_factor": self.soften_factor, "soften_until": self.soften_until}

    def load_state_dict(self, state):
        self.soften_factor, self.soften_until = state["soften_factor"], state["soften_until"]


class Freeze(HoldParameters):
    """Offsets and alpha held for the first epochs, gates longer (and alpha again when the collapse guard
    softens it)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec  # FreezeSchedule
        self.alpha_until = -1  # the collapse guard extends alpha's freeze

    def held(self, state: TrainState) -> set[str]:
        epoch, spec = state.epoch, self.spec
        until = {"offsets": spec.freeze_offsets_epochs, "gate_logits": spec.gate_epochs,
                 "alpha_scale": max(spec.freeze_offsets_epochs, self.alpha_until)}
        return {name for name, _ in state.model.named_parameters() if epoch < until.get(name.rsplit(".", 1)[-1], -1)}

    def on_epoch_start(self, state):
        super().on_epoch_start(state)
        state.metrics["freeze/frozen_tensors"] = float(len(self.values))

    def state_dict(self):
        return {**super().state_dict(), "alpha_until": self.alpha_until}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.alpha_until = state["alpha_until"]


class HardFinetune(Callback):
    """From `start_epoch`: learning rates times `lr_mult` (once), hard forward passes, BN tracked or frozen."""

    def __init__(self, spec):
        self.spec = spec
        self.applied = False

    def active(self, epoch: int) -> bool:
        return self.spec.enable and epoch >= self.spec.start_epoch

    def on_epoch_start(self, state):
        if not self.active(state.epoch):
            return
        if not self.applied:  # the lr schedulers are multiplicative, so the factor persists
            for group in state.optimizer.param_groups:
                group["lr"] *= self.spec.lr_mult
            self.applied = True
        for layer in lbp_layers(state.model):
            layer.soft_forward = layer.soft_forward and not self.spec.hard_forward_bits
        for layer in rp_layers(state.model):
            layer.soft_forward = layer.soft_forward and not self.spec.hard_forward_gates
        if self.spec.bn_mode == "frozen":
            for module in state.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        state.metrics["hard_finetune/active"] = 1.0

    def state_dict(self):
        return {"applied": self.applied}

    def load_state_dict(self, state):
        self.applied = state["applied"]


class BNRecalibration(batchnorm.BNRecalibration):
    """Re-estimate BatchNorm statistics of the evaluated model on `batches` training batches, hard path,
    before evaluation — every time, or during the hard fine-tune and before the final evaluation."""

    def __init__(self, batches: int, every_eval: bool, hard_finetune: HardFinetune):
        super().__init__(batches)
        self.every_eval, self.hard_finetune = every_eval, hard_finetune

    def due(self, state):
        return self.every_eval or state.epoch + 1 == state.epochs or self.hard_finetune.active(state.epoch)

    def recalibrate(self, model, loader):
        return recalibrate_bn(model, loader, self.batches)


@contextmanager
def hard_path(model: nn.Module):
    """Hard comparisons and gates inside the block (what evaluation runs), each layer's own mode after."""
    soft = [(layer, layer.soft_forward) for layer in [*lbp_layers(model), *rp_layers(model)]]
    for layer, _ in soft:
        layer.soft_forward = False
    try:
        yield model
    finally:
        for layer, was_soft in soft:
            layer.soft_forward = was_soft


def recalibrate_bn(model: nn.Module, loader, batches: int) -> int:
    """Cumulative BN statistics over `batches` batches with hard comparisons, pooled over ranks."""
    with hard_path(model):
        return batchnorm.recalibrate(model, loader, batches)


class CollapseGuard(Callback):
    """After each evaluation: if the accuracy of the model the run is judged by (the EMA when it is the
    result; on val when held out) fell more than `acc_drop_thr` below the best of the last `window`
    epochs while the hard alive ratio is above `alive_upper`, restore the best weights, soften alpha and
    hold it frozen for `soften_epochs`."""

    def __init__(self, spec, temperatures: Temperatures, freeze: Freeze):
        self.spec, self.temperatures, self.freeze = spec, temperatures, freeze
        self.recent: list[float] = []
        self.best_acc, self.best_state, self.events = -1.0, None, 0

    def on_eval_end(self, state, metrics):
        acc = state.result(metrics)  # of the model the run is judged by: the EMA's when it is the result
        peak = max(self.recent[-self.spec.window:], default=acc)
        alive = alive_ratios(state.model)[1]
        if peak - acc > 100 * self.spec.acc_drop_thr and alive > self.spec.alive_upper and self.best_state is not None:
            self._restore(state)
            self.events += 1
        elif acc > self.best_acc:
            self.best_acc, self.best_state = acc, copy.deepcopy(state.eval_model.state_dict())
        self.recent.append(acc)
        state.metrics["guard/collapse_events"] = float(self.events)

    def _restore(self, state):
        state.model.load_state_dict(self.best_state)
        if state.eval_model is not state.model:
            state.eval_model.load_state_dict(self.best_state)
        until = state.epoch + 1 + self.spec.soften_epochs
        self.temperatures.soften_factor, self.temperatures.soften_until = self.spec.soften_factor, until
        self.freeze.alpha_until = until

    def state_dict(self):
        return {"recent": self.recent, "best_acc": self.best_acc, "best_state": self.best_state, "events": self.events}

    def load_state_dict(self, state):
        self.recent, self.best_acc, self.best_state, self.events = (
            state["recent"], state["best_acc"], state["best_state"], state["events"]
        )


class Telemetry(Callback):
    """Per-epoch alpha, tau, gate alive ratios and the paper's Size/#Ops, reported with the epoch's metrics."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.paper: dict[str, float] | None = None

    def on_epoch_end(self, state, metrics):
        model = state.model
        lbps, rps = lbp_layers(model), rp_layers(model)
        if lbps:
            state.metrics["lbp/alpha"] = sum(layer.alpha.item() for layer in lbps) / len(lbps)
        if rps:
            state.metrics["rp/tau"] = sum(layer.tau.item() for layer in rps) / len(rps)
            state.metrics["rp/alive_soft"], state.metrics["rp/alive_hard"] = alive_ratios(model)
        if self.paper is None:
            self.paper = {f"paper/{k}": float(v) for k, v in paper_metrics.measure(model, self.image_size).items()}
        state.metrics.update(self.paper)


def alive_ratios(model: nn.Module) -> tuple[float, float]:
    """(soft, hard) fraction of open RP gates over the whole network (1.0 without gates)."""
    layers = rp_layers(model)
    if not layers:
        return 1.0, 1.0
    logits = torch.cat([layer.gate_logits.detach() for layer in layers])
    taus = torch.cat([layer.tau.expand(layer.out_channels) for layer in layers])
    return torch.sigmoid(logits / taus).mean().item(), (logits > 0).float().mean().item()
