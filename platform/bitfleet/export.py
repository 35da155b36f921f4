"""`bitfleet export RUN_DIR` and `bitfleet eval --engine FILE`: a trained model as its workload's engine, and
that engine evaluated on a split of its data set without the run folder.

The run's recorded spec (config.json) rebuilds the model; the weights are the checkpoint's EMA when the
run evaluated one (`train.ema.evaluate`), else the model's; the best checkpoint unless another is named.
The run folder and the checkpoint may be local or in object storage (s3://, gs://, file://). The engine
file (`deploy`) holds the workload's arrays, the table that normalises pixel codes as the loader does, and
a header naming the workload and the data section, which is all `evaluate_engine` needs.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from bitfleet import deploy, registry, storage
from bitfleet.data import check_available, info, raw_split
from bitfleet.data.transforms import input_lut
from bitfleet.engine import checkpoint as ckpt
from bitfleet.errors import SpecError
from bitfleet.resolve import apply_data_overrides, recorded_spec
from bitfleet.spec import DataSpec, RunSpec
from bitfleet.workload import parse_section

EVAL_BATCH = 1000  # images per engine call: bounds the engine's memory


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
    return write_engine(workload, model, spec.model, spec.data, out, {"run": spec.name, "source": str(run_dir)})


def write_engine(workload, model, model_config, data: DataSpec, path: str | Path, source: dict | None = None) -> dict:
    """Export `model` (eval mode) with its workload's exporter into the engine file `path`; returns a summary."""
    data_info = info(data)
    arrays = workload.export(model.eval(), model_config, data_info)
    arrays["input_lut"] = input_lut(data_info.mean, data_info.std).numpy()
    header = {"workload": workload.name, "data": data.model_dump(mode="json"), **(source or {})}
    size = deploy.save(path, arrays, header)
    return {"path": str(path), "workload": workload.name, "bytes": size,
            "weights_bytes": sum(a.nbytes for name, a in arrays.items() if name != "input_lut")}


def load_engine(path: str | Path):
    """(engine, header) of an engine file."""
    header, arrays = deploy.load(path)
    lut = arrays.pop("input_lut")
    return registry.get(header["workload"]).load_engine(arrays, lut), header


def evaluate_engine(path: str | Path, split: str = "test", overrides: list[str] = (), out: str | Path | None = None
                    ) -> dict:
    """Accuracy of an engine file on `split` of the data set its header names (`data.*` overrides, e.g.
    data.root=DIR on another machine); writes eval.json (next to the engine unless `out`), returns the metrics."""
    engine, header = load_engine(path)
    raw = {"data": header["data"]}
    apply_data_overrides(raw, overrides, "an engine's evaluation")
    data = parse_section(DataSpec, raw["data"], "data")
    missing = check_available(data.model_copy(update={"loader": "torchvision"}))  # decoded here, not by DALI
    if missing:
        raise SpecError(missing)
    images, labels = raw_split(data, split)
    images, labels = images.numpy(), labels.numpy()
    start = time.perf_counter()
    logits = np.concatenate([engine.logits(images[i: i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)])
    seconds = time.perf_counter() - start
    metrics = {f"{split}/acc": 100.0 * float((logits.argmax(1) == labels).mean()), f"{split}/n": len(labels)}
    if logits.shape[1] > 10:  # as training reports it: top-5 past 10 classes
        top5 = np.argpartition(-logits, 5, axis=1)[:, :5]
        metrics[f"{split}/acc5"] = 100.0 * float((top5 == labels[:, None]).any(1).mean())
    result = {"engine": str(path), "workload": header["workload"], "split": split, **metrics,
              "images_per_s": len(labels) / seconds}
    target = Path(out) if out else Path(path).with_name("eval.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1))
    return {**result, "written": str(target)}
