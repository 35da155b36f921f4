"""`bitfleet export RUN_DIR`: a finished run's weights handed to its workload's exporter.

The run's recorded spec (config.json) rebuilds the model; the weights are the checkpoint's EMA when the
run evaluated one (`train.ema.evaluate`), else the model's; the best checkpoint unless another is named.
The run folder and the checkpoint may be local or in object storage (s3://, gs://, file://).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from bitfleet import registry, storage
from bitfleet.data import info
from bitfleet.engine import checkpoint as ckpt
from bitfleet.errors import SpecError
from bitfleet.resolve import recorded_spec
from bitfleet.spec import RunSpec


@dataclass
class Loaded:
    spec: RunSpec  # the run's recorded spec
    workload: Any
    model: torch.nn.Module  # in eval mode, on the CPU, with the weights the run evaluated
    state: dict  # the checkpoint's whole state (its epoch, history, ...)
    ema: bool  # the weights are the EMA's
    checkpoint: str  # where the checkpoint is: a folder or a URI


def load_checkpoint(spec: RunSpec, source: str | Path) -> Loaded:
    """The model of a run (`spec`: its recorded spec) with the weights of the checkpoint `source` names
    (a checkpoint, or the run's folder: its best one)."""
    source = str(source)
    try:
        with ckpt.fetched(source) as directory:
            state = ckpt.load(directory)
    except OSError as exc:  # FileNotFoundError naming the damage, or an object store that cannot be read
        raise SpecError(str(exc)) from None
    ema = bool(spec.train.ema and spec.train.ema.evaluate and state.get("ema"))
    workload = registry.get(spec.workload, spec.options)
    torch.manual_seed(spec.seed)  # as the run built it
    model = workload.build_model(spec.model, info(spec.data))
    model.load_state_dict(ckpt.weights_of(state, ema=ema))
    return Loaded(spec, workload, model.eval(), state, ema, _origin(source, directory))


def _origin(source: str, directory: Path) -> str:
    """Where the checkpoint `source` named lies: `directory` itself, or in object storage (of which
    `directory` was a temporary copy) `source` or its folder of that name."""
    if not storage.is_uri(source):
        return str(directory)
    return source if directory.name == PurePosixPath(source).name else storage.join(source, directory.name)


def load_model(run_dir: str | Path, checkpoint: str | Path | None = None):
    """(spec, workload, model in eval mode on the CPU) of a run, from `checkpoint` or its best one."""
    loaded = load_checkpoint(recorded_spec(str(run_dir)), checkpoint or run_dir)
    return loaded.spec, loaded.workload, loaded.model


def export(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> dict:
    spec, workload, model = load_model(run_dir, checkpoint)
    return workload.export(model, spec.model, info(spec.data), Path(out))
