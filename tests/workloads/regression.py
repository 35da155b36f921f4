"""Workload `regression` (tests only): a small MLP that reads a digit's value off the image, as a real number.

What it proves: a workload outside bitfleet's tree, registered by entry point, chooses its own loss (MSE)
and its own metrics (`{split}/mse`, `{split}/mae`, declared for Prometheus here), and its checkpoints are
ranked by its own metric (val/mse, lower is better) — with no edit to the platform.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitfleet.engine.objective import Objective
from bitfleet.metrics import SPLIT_LABELS, Metric
from bitfleet.workload import Workload


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(32, ge=1)


class MeanSquaredError(Objective):
    """MSE between the network's single output and the label read as a number."""

    score = "mse"
    modes = {"mse": "min", "mae": "min", "loss": "min"}
    sums = ("squared_error", "absolute_error")

    def loss(self, outputs, targets):
        return F.mse_loss(outputs, targets.float())

    def batch_sums(self, outputs, targets, train):
        error = outputs.detach().float() - targets.float()
        return torch.stack([error.square().sum(), error.abs().sum()])

    def eval_loss_sum(self, outputs, targets):
        return F.mse_loss(outputs, targets.float(), reduction="sum")

    def metrics(self, split, loss_sum, seen, sums, train):
        squared, absolute = sums
        return {f"{split}/loss": loss_sum / seen, f"{split}/mse": squared / seen, f"{split}/mae": absolute / seen}


class Regression(Workload):
    name = "regression"
    ModelConfig = ModelConfig
    Objective = MeanSquaredError
    datasets = ("mnist_sample", "mnist")
    metrics = (
        Metric("bitfleet_regression_mse", "gauge", "Mean squared error of the last epoch", SPLIT_LABELS, "{split}/mse"),
        Metric("bitfleet_regression_mae", "gauge", "Mean absolute error of the last epoch", SPLIT_LABELS,
               "{split}/mae"),
    )

    def build_model(self, config: ModelConfig, data):
        return nn.Sequential(nn.Flatten(), nn.Linear(data.in_channels * data.image_size**2, config.hidden), nn.ReLU(),
                             nn.Linear(config.hidden, 1), nn.Flatten(0))
