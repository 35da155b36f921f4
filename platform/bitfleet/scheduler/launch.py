"""One run -> `ray.train.torch.TorchTrainer` (ScalingConfig, RunConfig, FailureConfig, CheckpointConfig).

The run's name is the spec's name and its directory is `storage_path/name`: a driver started again with
the same spec finds the run there and resumes it from its latest checkpoint (Ray Train V2 semantics).
"""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import bitfleet
from bitfleet import console, metrics, registry, storage
from bitfleet.engine import loop, preemption
from bitfleet.resolve import CONFIG_FILE
from bitfleet.scheduler.watch import Watch, show_summary
from bitfleet.spec import RunSpec


def checkpoint_score(spec: RunSpec) -> tuple[str, str]:
    """(metric, "max" | "min") that ranks the run's checkpoints: `failure.checkpoint_metric`, else the
    workload objective's own on the validation split when one is held out, else on the test split."""
    objective = registry.workload_class(spec.workload).Objective
    metric = spec.failure.checkpoint_metric or f"{'val' if spec.data.val_size else 'test'}/{objective.score}"
    return metric, spec.failure.checkpoint_mode or objective.modes[metric.split("/", 1)[1]]


def build_trainer(spec: RunSpec, callbacks: tuple = (), events=None) -> TorchTrainer:
    """The TorchTrainer of a run; `callbacks`: Ray Train user callbacks (a sweep's bridge to Tune);
    `events`: the driver's queue for what the workers tell it (scheduler/watch.py)."""
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    metric, mode = checkpoint_score(spec)
    return TorchTrainer(
        loop.train_worker,
        train_loop_config={"spec": spec, "checkpoint_score": (metric, mode), "events": events},  # typed
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=scaling.resize_check_s),
        run_config=RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.failure.keep, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
        ),
    )


def connect(address: str | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, or a new local Ray), once per driver process."""
    if not ray.is_initialized():
        # the workers' output reaches the console through their events (scheduler/watch.py); Ray's own
        # forwarding of every process's output, and its info lines, only with -v
        verbose = console.verbose()
        ray.init(address=address, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
        preemption.claim_sigterm()  # Ray's core took SIGTERM over


def run_training(spec: RunSpec, address: str | None = None):
    """Run `spec` to completion on the cluster at `address` (or RAY_ADDRESS, or a new local Ray)."""
    connect(address)
    storage.check_shared(spec.storage_path)
    record_config(spec)
    metric, mode = checkpoint_score(spec)
    with metrics.run_state(metrics.run_labels(spec)), preemption.driving(storage.run_path(spec)), \
            Watch(spec.tracking) as watch:
        result = build_trainer(spec, events=watch.queue).fit()
        at = result.metrics or {}
        if preemption.STOP_REQUESTED.is_set() and at.get(loop.STEP_CHECKPOINT):  # else it finished before it heard
            raise preemption.Stopped(f"run {spec.name} stopped at a checkpoint in epoch {at['epoch'] + 1}, after "
                                     f"step {at['step_in_epoch']}; rerun the same command to continue")
    scored = [(ckpt, values) for ckpt, values in result.best_checkpoints or []
              if not values.get(loop.STEP_CHECKPOINT) and metric in values]
    sign = 1 if mode == "max" else -1  # a tie goes to the later checkpoint: trained longer for the same score
    best = max(scored, key=lambda pair: (sign * pair[1][metric], pair[1].get("epoch", 0)), default=None)
    summary = {
        "run_dir": storage.run_path(spec),
        "final": result.metrics,
        "last_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": best[0].path if best else None,
        "best": best[1] if best else None,
        "wall_s": time.monotonic() - watch.started,
    }
    storage.write_text(storage.join(storage.run_path(spec), "result.json"), json.dumps(summary, indent=1, default=str))
    show_summary(spec, summary, summary["wall_s"], metric)
    return summary


def record_config(spec: RunSpec) -> None:
    """config.json: the resolved spec, the versions and the git revision this run was started from, and
    below `history` each earlier start's (resolution has refused any rerun whose spec changes the result)."""
    import torch

    path = storage.join(storage.run_path(spec), CONFIG_FILE)
    earlier = json.loads(storage.read_text(path)) if storage.exists(path) else None
    history = (earlier.pop("history", []) + [earlier]) if earlier else []
    record = {
        "spec": spec.model_dump(mode="json"),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "bitfleet": bitfleet.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "ray": ray.__version__, "platform": platform.platform(),
        },
        "git_revision": _git_revision(),
        "history": history,
    }
    storage.write_text(path, json.dumps(record, indent=1))


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(bitfleet.__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
