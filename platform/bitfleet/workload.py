"""The Workload protocol: what a paper's workload family gives the platform.

A workload owns its config (the `model:` section and its own top-level section), builds its model
from that config and the data's shape, and may add callbacks or override the training step. The engine
never reads `spec.model.*` itself.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from bitfleet.data import DataInfo
from bitfleet.engine.callbacks import Callback
from bitfleet.spec import RunSpec, SpecError
from bitfleet.spec_errors import format_validation_error


class NoOptions(BaseModel):
    model_config = {"extra": "forbid"}


class Workload:
    """Base class of every workload; subclasses set `name`, `ModelConfig` and implement `build_model`."""

    name: ClassVar[str]
    ModelConfig: ClassVar[type[BaseModel]]
    Options: ClassVar[type[BaseModel]] = NoOptions  # the workload's own top-level spec section
    datasets: ClassVar[tuple[str, ...] | None] = None  # the data sets its models take; None: any

    # ---- configuration (driver side, before Ray)
    def model_config(self, spec: RunSpec) -> BaseModel:
        return _parse(self.ModelConfig, spec.model, "model")

    def options(self, spec: RunSpec) -> BaseModel:
        return _parse(self.Options, spec.options, self.name)

    def validate(self, spec: RunSpec) -> None:
        """Raise SpecError for anything wrong in this workload's sections."""
        if self.datasets and spec.data.dataset not in self.datasets:
            raise SpecError(f"data.dataset: workload {self.name} takes {' or '.join(self.datasets)} "
                            f"(got {spec.data.dataset!r})")
        self.model_config(spec)
        self.options(spec)

    # ---- inside each worker
    def prepare(self, spec: RunSpec) -> None:
        """Called once in each worker before anything is built: keep what `train_step` needs."""

    def build_model(self, config: BaseModel, data: DataInfo) -> nn.Module:
        raise NotImplementedError

    def load_initial_weights(self, model: nn.Module, weights: dict) -> None:
        """`train.init_from`'s weights into a freshly built model. Override when the model's layout differs
        from the checkpoint's (a quantization-prepared copy of a float network)."""
        model.load_state_dict(weights)

    def callbacks(self, spec: RunSpec) -> list[Callback]:
        return []

    def train_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, criterion) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass and loss; returns (loss, logits). Override for distillation, PPO, ..."""
        logits = model(images)
        return criterion(logits, labels), logits

    # ---- pipeline stages that are not training runs (driver side, on the cluster)
    def tasks(self) -> dict[str, Callable[[RunSpec], dict]]:
        """Stage tasks by name: each gets the stage's spec (its `inputs` name the needed stages' folders),
        writes its files under `spec.run_dir` and returns a JSON-able summary."""
        return {}

    def export(self, model: nn.Module, config: BaseModel, data: DataInfo, path) -> dict:
        """Write a trained model in the workload's deployment format; returns what was written."""
        raise SpecError(f"workload {self.name!r} has no exporter")


def _parse(model: type[BaseModel], raw: dict[str, Any], section: str) -> BaseModel:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, model, prefix=section)) from None
