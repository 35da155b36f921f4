"""Pipelines: a spec's `stages:` run in dependency order, each as its own run under the pipeline's folder.

A stage is the pipeline's spec with the stage's `overrides`, named after the stage and stored under
`storage_path/<pipeline>/<stage>/`; it receives the folders of the stages it `needs` as `inputs` (and,
with `init_from`, a needed stage's best checkpoint as its initial weights). A stage is a Ray Train run,
or a task: `report`, or one the workload offers (`Workload.tasks`). Stages whose needs are met start
together while the cluster has CPUs for them. A finished stage leaves `stage.json`; a rerun of the
pipeline skips those and resumes the rest (a training stage from its own latest checkpoint). SIGTERM to
the driver stops the running stages at a checkpoint (engine/preemption.py) and starts no other; the same
command continues.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from bitfleet import registry, report, storage
from bitfleet.engine import preemption
from bitfleet.resolve import resolve_stage
from bitfleet.scheduler import launch
from bitfleet.spec import RunSpec, ScalingSpec, StageSpec

log = logging.getLogger("bitfleet.run")

STAGE_FILE = "stage.json"  # written when a stage has completed


class StageFailed(RuntimeError):
    """A pipeline stage failed; the message names it."""


def completed(spec: RunSpec, stage: StageSpec) -> dict | None:
    path = Path(spec.storage_path) / spec.name / stage.name / STAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise StageFailed(f"pipeline {spec.name}: {path} is unreadable (truncated by an older bitfleet?): delete it "
                          f"to run stage {stage.name!r} again") from None


def run_pipeline(spec: RunSpec, address: str | None = None) -> dict[str, dict]:
    """Run the pipeline's stages; returns {stage: record}. Raises StageFailed naming the first failure."""
    import ray

    launch.connect(address)
    records = {s.name: {**completed(spec, s), "state": "skipped"} for s in spec.stages if completed(spec, s)}
    pending = [s for s in spec.stages if s.name not in records]
    capacity = ray.cluster_resources().get("CPU", 1.0)
    running: dict[Future, StageSpec] = {}
    failure, stopped = None, []
    with ThreadPoolExecutor(max(1, len(pending))) as pool:
        while True:
            starting = failure is None and not preemption.STOP_REQUESTED.is_set()
            for stage in _ready(pending, records) if starting else ():
                if running and _cpus(spec, running.values()) + _cpus(spec, [stage]) > capacity:
                    break  # wait for room; the first stage always starts, whatever it asks for
                pending.remove(stage)
                running[pool.submit(_run_stage, spec, stage)] = stage
                log.info(f"[{spec.name}] stage {stage.name} started")
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                if isinstance(future.exception(), preemption.Stopped):
                    stopped.append(stage.name)
                    log.info(f"[{spec.name}] stage {stage.name} stopped at a checkpoint")
                elif future.exception() is not None:
                    failure = failure or (stage.name, future.exception())
                    log.info(f"[{spec.name}] stage {stage.name} failed: {future.exception()}")
                else:
                    records[stage.name] = future.result()
                    log.info(f"[{spec.name}] stage {stage.name} completed")
    if failure is not None:
        name, exc = failure
        raise StageFailed(f"pipeline {spec.name}: stage {name!r} failed: {exc}") from exc
    if preemption.STOP_REQUESTED.is_set() and (stopped or pending):
        raise preemption.Stopped(f"pipeline {spec.name} stopped: stage(s) {', '.join(stopped) or 'none'} at a "
                                 f"checkpoint, {len(pending)} not started; rerun the same command to continue")
    if pending:
        raise StageFailed(f"pipeline {spec.name}: stages {[s.name for s in pending]} could not start")
    return {s.name: records[s.name] for s in spec.stages}


def _ready(pending: list[StageSpec], records: dict) -> list[StageSpec]:
    return [s for s in pending if all(need in records for need in s.needs)]


def _cpus(spec: RunSpec, stages) -> float:
    """CPUs a stage holds: its workers (a training run) or its actors (a task), from its scaling section."""
    total = 0.0
    for stage in stages:
        scaling = ScalingSpec(**{**spec.scaling.model_dump(), **_scaling_overrides(stage)})
        total += scaling.max_workers * scaling.cpus_per_worker
    return total


def _scaling_overrides(stage: StageSpec) -> dict:
    return {k.split(".", 1)[1]: v for k, v in stage.overrides.items() if k.startswith("scaling.")}


def _run_stage(spec: RunSpec, stage: StageSpec) -> dict:
    resolved = resolve_stage(spec, stage)
    resolved.run_dir.mkdir(parents=True, exist_ok=True)
    if stage.task is None:
        summary = launch.run_training(resolved)
    elif stage.task == "report":
        summary = {"report": str(report.write(list(resolved.inputs.values()), resolved.run_dir))}
    else:
        launch.record_config(resolved)
        summary = registry.get(resolved.workload, resolved.options).tasks()[stage.task](resolved)
    record = {"stage": stage.name, "state": "completed", "run_dir": str(resolved.run_dir), "summary": summary}
    storage.write_text(str(resolved.run_dir / STAGE_FILE), json.dumps(record, indent=1, default=str))
    return record
