"""`bitfleet eval RUN_DIR|CHECKPOINT`: a checkpoint evaluated again, in this process, on a split of its data.

The run's recorded spec rebuilds everything the run's evaluation used: the model (`export.load_checkpoint`:
the EMA's weights when the run evaluated its EMA), the data section's loader and evaluation transforms
(`-o data.*` may move the data: another root on this machine), the workload's objective, and the loop's own
evaluation (engine/evaluate.py) over the whole split. What is measured is the workload's to say
(`Workload.eval_model`): the model itself by default; tap_ppo's QAT stage measures its INT8 network.
BatchNorm statistics are the checkpoint's: the workloads that recalibrate them (rbnn, lbpnet) do so before
each evaluation, and the checkpoint is written after it. So on the test split of an epoch's checkpoint the
accuracy equals what the run reported there (with several workers too: the counts are summed); the loss
may differ in its last bits (its sum is added in another order).
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path, PurePosixPath

import torch

from bitfleet import storage
from bitfleet.data import check_available, info, loaders
from bitfleet.engine.evaluate import evaluate
from bitfleet.engine.strategy import autocast_dtype
from bitfleet.errors import SpecError
from bitfleet.export import load_checkpoint
from bitfleet.resolve import CONFIG_FILE, recorded_spec

log = logging.getLogger(__name__)
SPLITS = ("test", "val", "train")
EVAL_FILE = "eval.json"


def evaluate_run(path: str, split: str = "test", overrides: list[str] = (), out: str | None = None) -> dict:
    """Evaluate the checkpoint `path` names (a checkpoint, or a run folder: its best one) on `split`; write
    `eval.json` into the run's folder (or `out`) and return what it holds."""
    path = str(path)
    run_dir = run_folder(path)
    spec = recorded_spec(run_dir, overrides)
    missing = check_available(spec.data)
    if missing:
        raise SpecError(missing)
    loaded = load_checkpoint(spec, path)
    state = loaded.state
    if spec.train.max_eval_steps:
        log.warning("bitfleet: run %s evaluated %d batches per worker only (train.max_eval_steps); this "
                    "evaluates the whole %s split", spec.name, spec.train.max_eval_steps, split)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.workload.eval_model(loaded.model.to(device))
    deployed = model is not loaded.model  # another form than the run evaluated: no reported figure to compare
    device = next(model.parameters(), torch.empty(0)).device  # a quantized network runs on the CPU
    dtype = autocast_dtype(spec.train, device)
    start = time.perf_counter()
    metrics = evaluate(model, loaders.split_loader(spec.data, split, spec.train.eval_batch_size, device),
                       loaded.workload.Objective(spec.train, info(spec.data)), split, device,
                       autocast=lambda: torch.autocast(device.type, dtype=dtype) if dtype else nullcontext())
    result = {
        "run": spec.name, "workload": spec.workload, "checkpoint": loaded.checkpoint, "epoch": state["epoch"],
        "global_step": state["global_step"], "weights": "ema" if loaded.ema else "model", "split": split,
        "measured": "deployed form" if deployed else "model", **metrics,
        "reported": None if deployed else reported(state, split, loaded.ema), "device": str(device),
        "seconds": round(time.perf_counter() - start, 3),
    }
    target = out or storage.join(run_dir, EVAL_FILE)
    storage.write_text(str(target), json.dumps(result, indent=1))
    return {**result, "written": str(target)}


def run_folder(path: str) -> str:
    """The run folder `path` names: itself, or the one that holds it (a checkpoint)."""
    parent = path.rstrip("/").rsplit("/", 1)[0] if storage.is_uri(path) else str(Path(path).parent)
    try:
        for candidate in (path, parent):
            if storage.exists(storage.join(candidate, CONFIG_FILE)):
                return candidate
    except OSError as exc:  # an object store this machine cannot read
        raise SpecError(f"{path}: cannot read: {exc}") from None
    raise SpecError(f"{path}: neither a bitfleet run folder ({CONFIG_FILE}) nor a checkpoint inside one")


def reported(state: dict, split: str, ema: bool) -> dict[str, float] | None:
    """What the run's evaluation reported on `split` at this checkpoint for the weights evaluated here (the
    EMA's are reported as `ema/<split>/...`), as `<split>/...`: its epoch's metrics, when it was written at
    an epoch's end (a mid-epoch one holds weights no evaluation has seen). None for the training split: its
    figures are running averages over the epoch's training steps, not an evaluation."""
    if split == "train" or state.get("step_in_epoch") or not state.get("history"):
        return None
    source = f"ema/{split}/" if ema else f"{split}/"
    last = state["history"][-1]
    return {key.removeprefix("ema/"): value for key, value in last.items() if key.startswith(source)} or None


def describe(result: dict) -> str:
    """`[run] checkpoint_000003 (epoch 3, EMA weights) test: loss 0.0712 acc 97.9 acc5 99.9 (the run reported
    acc 97.9)` and where the result was written."""
    split = result["split"]
    figures = " ".join(f"{key.split('/', 1)[1]} {value:.6g}" for key, value in result.items()
                       if key.startswith(f"{split}/"))
    weights = (", EMA weights" if result["weights"] == "ema" else "") + (
        ", as deployed" if result["measured"] != "model" else "")
    line = (f"[{result['run']}] {PurePosixPath(result['checkpoint']).name} (epoch {result['epoch']}{weights}) "
            f"{split}: {figures}")
    if result["reported"]:
        line += " (the run reported " + " ".join(f"{key.split('/', 1)[1]} {value:.6g}"
                                                 for key, value in result["reported"].items()) + ")"
    return f"{line}\nwrote {result['written']}"
