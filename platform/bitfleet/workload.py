"""The Workload protocol: what a paper's workload family gives the platform.

A workload owns its config — the `model:` section (`ModelConfig`) and its own top-level section
(`Options`), parsed once when the spec is resolved — its `Objective` (the loss, the metrics, and the one
that ranks its checkpoints) and the Prometheus metrics of what its callbacks report (`metrics`, merged into the
platform's catalogue when the class is defined). The registry makes a fresh instance per run, holding the
run's `Options`; each hook receives only its own part: `build_model` the model config and the data's
shape, `setup` and `callbacks` a `RunContext`. The engine never reads `spec.model.*` itself.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from bitfleet import metrics
from bitfleet.data import DataInfo
from bitfleet.engine import objective
from bitfleet.engine.callbacks import Callback, RunContext
from bitfleet.errors import SpecError, format_validation_error
from bitfleet.spec import RunSpec

PLATFORM_SECTIONS = ("data", "train", "scaling", "failure")  # what `Workload.defaults` may fill


class NoOptions(BaseModel):
    model_config = {"extra": "forbid"}


class Workload:
    """Base class of every workload; subclasses set `name`, `ModelConfig` and implement `build_model`."""

    name: ClassVar[str]
    ModelConfig: ClassVar[type[BaseModel]]
    Options: ClassVar[type[BaseModel]] = NoOptions  # the workload's own top-level spec section
    # its loss and metrics; what ranks its checkpoints
    Objective: ClassVar[type[objective.Objective]] = objective.Classification
    datasets: ClassVar[tuple[str, ...] | None] = None  # the data sets its models take; None: any
    metrics: ClassVar[tuple[metrics.Metric, ...]] = ()  # what its callbacks report, as Prometheus metrics
    # its own defaults for platform sections — its seed's command-line defaults, e.g. {"train": {"epochs": 400}}
    # — under the spec as written: a value the spec (or an override) gives wins (`resolve.with_workload_defaults`)
    defaults: ClassVar[dict[str, dict]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        assert set(cls.defaults) <= set(PLATFORM_SECTIONS), f"{cls.__name__}.defaults: platform sections only"
        metrics.register(cls.metrics)

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.Options()

    # ---- configuration (driver side, before Ray)
    @classmethod
    def models(cls) -> tuple[str, ...]:
        """The networks `model.arch` names (`bitfleet list`); a workload built from parts lists none."""
        arch = cls.ModelConfig.model_fields.get("arch")
        return tuple(getattr(arch.annotation, "__args__", ())) if arch is not None else ()

    @classmethod
    def resolve_sections(cls, spec: RunSpec) -> RunSpec:
        """The spec with `model:` and this workload's section parsed into `ModelConfig` and `Options`."""
        model = parse_section(cls.ModelConfig, spec.model, "model")
        options = parse_section(cls.Options, spec.options, cls.name)
        return spec.model_copy(update={"model": model, cls.name: options})

    def validate(self, spec: RunSpec) -> None:
        """Raise SpecError for what this workload's typed sections cannot take together with the rest."""
        if self.datasets and spec.data.dataset not in self.datasets:
            raise SpecError(f"data.dataset: workload {self.name} takes {' or '.join(self.datasets)} "
                            f"(got {spec.data.dataset!r})")

    # ---- inside each worker
    def setup(self, run: RunContext) -> None:
        """Called once in each worker before anything is built: load what `train_step` needs (a teacher)."""

    def build_model(self, config: BaseModel, data: DataInfo) -> nn.Module:
        raise NotImplementedError

    def load_initial_weights(self, model: nn.Module, weights: dict) -> None:
        """`train.init_from`'s weights into a freshly built model. Override when the model's layout differs
        from the checkpoint's (a quantization-prepared copy of a float network)."""
        model.load_state_dict(weights)

    def callbacks(self, run: RunContext) -> list[Callback]:
        return []

    def train_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   loss) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass and loss (`loss`: the objective's); returns (loss, outputs). Override for
        distillation, mixup, regularisers."""
        outputs = model(images)
        return loss(outputs, labels), outputs

    def eval_model(self, model: nn.Module) -> nn.Module:
        """What `bitfleet eval` measures, given the model a run evaluated (its EMA when it kept and evaluated
        one) with a checkpoint's weights, in eval mode: by default that model, as the run's evaluation ran
        it; a workload whose trained model is deployed in another form returns that form (an INT8 network).
        Batches go to the device of its parameters; one without any (a quantized network) runs on the CPU."""
        return model

    # ---- pipeline stages that are not training runs (driver side, on the cluster)
    def tasks(self) -> dict[str, Callable[[RunSpec], dict]]:
        """Stage tasks by name: each gets the stage's resolved spec (its `inputs` name the needed stages'
        folders), writes its files under `spec.run_dir` and returns a JSON-able summary."""
        return {}

    def export(self, model: nn.Module, config: BaseModel, data: DataInfo) -> dict[str, np.ndarray]:
        """A trained model (eval mode, CPU) as the named arrays its engine runs on (`bitfleet export`)."""
        raise SpecError(f"workload {self.name!r} has no exporter")

    def load_engine(self, arrays: dict[str, np.ndarray], input_lut: np.ndarray) -> Engine:
        """The engine of arrays `export` wrote; `input_lut` (channels, 256) normalises pixel codes as the
        data loader does."""
        raise SpecError(f"workload {self.name!r} has no engine")


class Engine(Protocol):
    """An exported model: uint8 images (N, C, H, W), as the data set stores them, in; logits out."""

    def logits(self, images: np.ndarray) -> np.ndarray: ...


def parse_section(model: type[BaseModel], raw: Any, section: str) -> BaseModel:
    """A typed section from what the spec holds (a mapping, or the model already), or a SpecError."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, model, prefix=section)) from None
