"""`bitfleet export RUN_DIR`: a finished run's weights handed to its workload's exporter.

The run's recorded spec (config.json) rebuilds the model; the weights are the checkpoint's EMA when the
run kept one (what it evaluated), else the model's; the best checkpoint unless another is named.
"""
from __future__ import annotations

import json
from pathlib import Path

from bitfleet import registry
from bitfleet.data import info
from bitfleet.engine import checkpoint as ckpt
from bitfleet.errors import SpecError
from bitfleet.spec import RunSpec


def load_model(run_dir: str | Path, checkpoint: str | Path | None = None):
    """(spec, workload, model in eval mode on the CPU) of a run, from `checkpoint` or its best one."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise SpecError(f"{run_dir}: not a bitfleet run folder (no config.json)")
    raw = RunSpec.model_validate(json.loads((run_dir / "config.json").read_text())["spec"])
    spec = registry.workload_class(raw.workload).resolve_sections(raw)
    try:
        directory = ckpt.find(checkpoint or run_dir)
    except FileNotFoundError as exc:
        raise SpecError(str(exc)) from None
    workload = registry.get(spec.workload, spec.options)
    model = workload.build_model(spec.model, info(spec.data))
    model.load_state_dict(ckpt.weights(directory))
    return spec, workload, model.eval()


def export(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> dict:
    spec, workload, model = load_model(run_dir, checkpoint)
    return workload.export(model, spec.model, info(spec.data), Path(out))
