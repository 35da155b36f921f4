"""What a run trains for and how its results are measured: the workload's to choose.

An objective gives the training loss and, per batch, a few sums (loss, correct, squared error, ...) that
the loop adds up over the epoch on each rank, all-reduces once and turns into `{split}/<name>` metrics.
`modes` says which direction is better for each metric name: it ranks checkpoints
(`failure.checkpoint_metric`) when the spec gives no mode.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from bitfleet.data import DataInfo
from bitfleet.spec import TrainSpec


class Objective:
    """Built in each worker from the run's `train:` section and the data's shape."""

    score: ClassVar[str]  # the metric name that ranks checkpoints by default ("acc": val/acc or test/acc)
    modes: ClassVar[dict[str, str]]  # metric name -> "max" | "min"
    sums: ClassVar[tuple[str, ...]]  # names of what `batch_sums` adds up, besides the loss and the count

    def __init__(self, train: TrainSpec, info: DataInfo):
        """Built from the run's `train:` section and the data's shape; take what the objective needs."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean training loss of a batch."""
        raise NotImplementedError

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor, train: bool) -> torch.Tensor:
        """One value per name of `sums`, summed over the batch."""
        raise NotImplementedError

    def eval_loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The evaluation loss summed over the batch (no training-only terms such as label smoothing)."""
        raise NotImplementedError

    def metrics(self, split: str, loss_sum: float, seen: float, sums: list[float], train: bool) -> dict[str, float]:
        raise NotImplementedError


class Classification(Objective):
    """Cross-entropy (label smoothing in training only) and top-1 accuracy; top-5 too past 10 classes (or
    always, for a workload whose paper's code prints it on 10 classes too)."""

    score = "acc"
    modes = {"acc": "max", "acc5": "max", "loss": "min"}
    sums = ("correct", "correct5")
    always_top5: ClassVar[bool] = False

    def __init__(self, train: TrainSpec, info: DataInfo):
        self.label_smoothing = train.label_smoothing
        self.top5 = info.num_classes > 5 and (self.always_top5 or info.num_classes > 10)

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)

    def batch_sums(self, outputs, targets, train):
        correct = (outputs.argmax(1) == targets).sum().float()
        if train or not self.top5:  # top-5 is an evaluation figure: no topk on the training hot path
            return torch.stack([correct, torch.zeros_like(correct)])
        top5 = outputs.topk(min(5, outputs.shape[1]), 1).indices
        return torch.stack([correct, (top5 == targets[:, None]).any(1).sum().float()])

    def eval_loss_sum(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="sum")

    def metrics(self, split, loss_sum, seen, sums, train):
        correct, correct5 = sums
        out = {f"{split}/loss": loss_sum / seen, f"{split}/acc": 100.0 * correct / seen}
        if self.top5 and not train:
            out[f"{split}/acc5"] = 100.0 * correct5 / seen
        return out
