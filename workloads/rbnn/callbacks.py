"""RBNN's schedules as engine callbacks: the t/k annealing, rotation updates, the BN-only stage and
telemetry (sign flips, |sin θ|, t, k, rotation error, weight histograms). State is checkpointed."""
from __future__ import annotations

import io
import math
import time

import torch
from torch import nn

from bitfleet import schedules, storage
from bitfleet.engine.callbacks import Callback, HoldParameters, TrainState
from workloads.rbnn.layers import binary_convs


class Temperature(Callback):
    """t = 10^(log Tmin + (log Tmax − log Tmin)·epoch/epochs) (the official Log_UP), k = max(1/t, 1)."""

    def __init__(self, tmin: float, tmax: float):
        self.spec = schedules.ScheduleSpec(type="geometric", start=tmin, end=tmax)

    def on_epoch_start(self, state: TrainState) -> None:
        t = schedules.value(self.spec, state.epoch / state.epochs)
        for conv in binary_convs(state.model):
            conv.t.fill_(t)
            conv.k.fill_(max(1.0 / t, 1.0))
        state.metrics.update({"rbnn/t": t, "rbnn/k": max(1.0 / t, 1.0)})


class Rotation(Callback):
    """Re-fit every layer's R1, R2 before the first batch of every `every`-th epoch (not in the BN-only stage)."""

    def __init__(self, every: int, iterations: int, svd_device: str, bn_only_from: int):
        self.every, self.iterations, self.svd_device, self.bn_only_from = every, iterations, svd_device, bn_only_from
        self.updated_epoch = -1  # a run resumed mid-epoch does not update that epoch's rotation again

    def on_epoch_start(self, state):
        if not self.every or state.epoch % self.every or state.epoch >= self.bn_only_from:
            return
        if self.updated_epoch == state.epoch:
            return
        self.updated_epoch = state.epoch
        start = time.perf_counter()
        errors = [conv.update_rotation(self.iterations, self.svd_device) for conv in binary_convs(state.model)]
        state.metrics.update({
            "rbnn/rotation_error_before": sum(e[0] for e in errors) / len(errors),
            "rbnn/rotation_error_after": sum(e[1] for e in errors) / len(errors),
            "rbnn/rotation_time_s": time.perf_counter() - start,
        })

    def state_dict(self):
        return {"updated_epoch": self.updated_epoch}

    def load_state_dict(self, state):
        self.updated_epoch = state.get("updated_epoch", -1)  # checkpoints of older runs have none


class BNOnly(HoldParameters):
    """From `start`: every parameter but BatchNorm's held, so the binary weights (and their scales and
    angles) stay fixed and only BN learns — the paper's final epoch."""

    def __init__(self, start: int):
        super().__init__()
        self.start = start

    def held(self, state: TrainState) -> set[str]:
        if state.epoch < self.start:
            return set()
        bn = {id(p) for m in state.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters()}
        return {name for name, p in state.model.named_parameters() if id(p) not in bn}

    def on_epoch_start(self, state):
        super().on_epoch_start(state)
        if self.values:
            state.metrics["rbnn/bn_only"] = 1.0


class Telemetry(Callback):
    """Per epoch: the share of binary weights whose sign flipped since the last epoch, mean |sin θ|; every
    `hist_every` epochs a histogram of the pre-sign weights (PNG on rank 0) and its near-zero share."""

    def __init__(self, hist_every: int, run_path: str):
        self.hist_every, self.run_path = hist_every, run_path  # a folder or a URI (bitfleet.storage)
        self.signs: list[torch.Tensor] = []

    @torch.no_grad()
    def on_epoch_end(self, state, metrics):
        convs = binary_convs(state.model)
        weights = [conv.rotated_weight() for conv in convs]
        signs = [w > 0 for w in weights]
        if self.signs:
            flipped = sum((a != b.to(a.device)).sum().item() for a, b in zip(signs, self.signs))
            state.metrics["rbnn/flip_ratio"] = flipped / sum(s.numel() for s in signs)
        self.signs = [s.cpu() for s in signs]
        state.metrics["rbnn/sin_theta"] = torch.cat([torch.sin(c.rotate).abs().flatten() for c in convs]).mean().item()
        if self.hist_every and state.epoch % self.hist_every == 0:
            values = torch.cat([w.flatten() for w in weights]).float().cpu()
            state.metrics["rbnn/weight_near_zero"] = (values.abs() < 0.1).float().mean().item()
            if state.rank == 0:
                self._plot(values, state.epoch)
                state.histograms["rbnn/rotated_weights"] = values  # to TensorBoard, through the driver

    def _plot(self, values: torch.Tensor, epoch: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(values.numpy(), bins=101, range=(-math.e, math.e))
        ax.set_xlabel("rotated, standardised weight (before sign)")
        ax.set_ylabel("count")
        ax.set_title(f"epoch {epoch}")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        storage.write_bytes(storage.join(self.run_path, "weight_hist", f"epoch_{epoch:04d}.png"), png.getvalue())
        plt.close(fig)

    def state_dict(self):
        return {"signs": self.signs}

    def load_state_dict(self, state):
        self.signs = state["signs"]
