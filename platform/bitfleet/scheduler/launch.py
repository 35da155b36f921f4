"""One run -> `ray.train.torch.TorchTrainer` (ScalingConfig, RunConfig, FailureConfig, CheckpointConfig).

The run's name is the spec's name and its directory is `storage_path/name`: a driver started again with
the same spec finds the run there and resumes it from its latest checkpoint (Ray Train V2 semantics).
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import bitfleet
from bitfleet import metrics, storage
from bitfleet.engine import loop
from bitfleet.spec import RunSpec

SCORE = "test/acc"  # checkpoints kept: the best `failure.keep` by this metric, and always the latest


def build_trainer(spec: RunSpec, callbacks: tuple = ()) -> TorchTrainer:
    """The TorchTrainer of a run; `callbacks`: Ray Train user callbacks (a sweep's bridge to Tune)."""
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        loop.run,
        train_loop_config=spec.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=scaling.resize_check_s),
        run_config=RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.failure.keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
        ),
    )


def run(spec: RunSpec, address: str | None = None):
    """Run `spec` to completion on the cluster at `address` (or RAY_ADDRESS, or a new local Ray)."""
    if not ray.is_initialized():
        ray.init(address=address)
    storage.check_shared(spec.storage_path)
    record_config(spec)
    with metrics.run_state(metrics.run_labels(spec)):
        result = build_trainer(spec).fit()
    best = max(result.best_checkpoints or [], key=lambda cm: cm[1].get(SCORE, float("-inf")), default=None)
    summary = {
        "run_dir": spec.run_path,
        "final": result.metrics,
        "last_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": best[0].path if best else None,
        "best": best[1] if best else None,
    }
    storage.write_text(storage.join(spec.run_path, "result.json"), json.dumps(summary, indent=1, default=str))
    return summary


def record_config(spec: RunSpec) -> None:
    """config.json: the resolved spec, the versions and the git revision this run was started from."""
    import torch

    record = {
        "spec": spec.model_dump(mode="json"),
        "versions": {
            "bitfleet": bitfleet.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "ray": ray.__version__, "platform": platform.platform(),
        },
        "git_revision": _git_revision(),
    }
    storage.write_text(storage.join(spec.run_path, "config.json"), json.dumps(record, indent=1))


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(bitfleet.__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
