"""A sweep -> `ray.tune.Tuner` whose function trainable runs each trial as a full bitfleet run.

Each trial is the spec with the trial's values set at their dotted paths, run by its own TorchTrainer
(its own worker group and failure handling), as Ray Train V2 recommends for Tune. A Train callback
forwards every epoch's metrics and checkpoint path to the trial, which reports them to Tune with a copy
of the checkpoint (the run keeps only its best few, and a PBT donor runs on); Tune's schedulers (ASHA
stops, PBT exploits) work on those. When a trial starts from a Tune checkpoint — PBT copying a donor, or
a resumed sweep — its new run continues from that checkpoint (`train.resume_from`) with the trial's
current values: a mutated temperature schedule applies from the restored epoch on.

Folders: `storage_path/<sweep name>/` is Tune's experiment (resumable with the same command), and each
trial's runs live in `storage_path/<sweep name>/runs/<trial>-<start>/`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

from bitfleet import console, metrics, storage, sweeps
from bitfleet.engine import checkpoint, loop, preemption
from bitfleet.resolve import validate_spec
from bitfleet.scheduler import launch
from bitfleet.scheduler.tune_objects import concurrent_trials, kept_checkpoints, param_space, tune_config
from bitfleet.scheduler.watch import Watch
from bitfleet.spec import RunSpec
from bitfleet.sweeps import SweepSpec

log = logging.getLogger("bitfleet.run")

RUNS = "runs"
# A trial only waits on its run, whose Train workers hold the real resources; Tune needs a non-empty
# request, and a fraction of a CPU would keep a worker from fitting beside it: one byte of memory.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}


class TrialCounts(tune.Callback):
    """Runs in the sweep's driver: the number of trials in each state, as the `bitfleet_trials_*` gauges."""

    STATES = {"PENDING": "pending", "PAUSED": "pending", "RUNNING": "running", "TERMINATED": "terminated",
              "ERROR": "error"}

    def __init__(self, labels: dict[str, str]):
        self.labels = labels

    def on_step(self, iteration, trials, **info):
        self.record(trials)

    def on_experiment_end(self, trials, **info):
        self.record(trials)

    def record(self, trials) -> None:
        counts = dict.fromkeys(self.STATES.values(), 0)
        for trial in trials:
            counts[self.STATES.get(trial.status, "pending")] += 1
        for state, count in counts.items():
            metrics.record(f"bitfleet_trials_{state}", count, self.labels)


class EndWhenStopped(tune.Callback):
    """Runs in the sweep's driver: once it was asked to stop (SIGTERM) and no trial runs any more — each has
    checkpointed and ended — the experiment ends as on Ctrl+C (Tune's SIGINT), its state saved for the rerun.
    Tune's own stop (`Stopper.stop_all`) would instead mark the trials not yet run as finished."""

    def __init__(self):
        self.ended = False

    def on_step(self, iteration, trials, **info):
        if preemption.STOP_REQUESTED.is_set() and not self.ended and all(t.status != "RUNNING" for t in trials):
            self.ended = True
            os.kill(os.getpid(), signal.SIGINT)


class ForwardToTrial(UserCallback):
    """Runs in the Train controller: hands each report (rank 0's metrics, checkpoint path) to the trial."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({"metrics": metrics[0], "checkpoint": checkpoint.path if checkpoint else None})


def trial_spec(base: dict, config: dict, sweep_dir: Path, trial_id: str, resume_from: str | None) -> RunSpec:
    raw = sweeps.apply_config(base, config)
    raw.pop("sweep", None)
    raw.update(name=f"{trial_id}-{uuid.uuid4().hex[:6]}", storage_path=str(sweep_dir / RUNS),
               trial_of={"sweep": base["name"], "trial": trial_id})
    if resume_from:
        raw.setdefault("train", {})["resume_from"] = resume_from
    return validate_spec(raw)


def run_trial(config: dict, base: dict, sweep_dir: str, events=None) -> None:
    """Tune's function trainable: one bitfleet run per start of the trial, its epochs reported to Tune, what
    its workers tell the driver sent to the sweep's driver (`events`: its Watch's queue)."""
    sweep_stop = storage.join(sweep_dir, preemption.STOP_FILE)
    if storage.exists(sweep_stop):
        raise preemption.Stopped("the sweep is stopping: this trial starts when it is rerun")
    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(base, config, Path(sweep_dir), trial_id, start_point(Path(sweep_dir), trial_id))
    launch.record_config(spec)
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = launch.build_trainer(spec, callbacks=(ForwardToTrial(queue),), events=events)
    outcome: dict = {}
    fit = threading.Thread(target=_fit, args=(trainer, outcome), daemon=True)
    passed_on = False  # the sweep's stop request, handed to this trial's run
    with metrics.run_state(metrics.run_labels(spec)):
        fit.start()
        while fit.is_alive() or not queue.empty():
            try:
                item = queue.get(timeout=preemption.LOOK_EVERY_S)
            except Empty:
                item = None
            if not passed_on and storage.exists(sweep_stop):
                storage.write_text(storage.join(storage.run_path(spec), preemption.STOP_FILE), "the sweep stops\n")
                passed_on = True
            if item is not None:
                _report(item, spec)
        if "error" in outcome:
            raise outcome["error"]
    if passed_on and (outcome["result"].metrics or {}).get(loop.STEP_CHECKPOINT):
        raise preemption.Stopped(f"trial {trial_id} stopped at a checkpoint of {spec.name}")


def start_point(sweep_dir: Path, trial_id: str) -> str | None:
    """Where this start of the trial continues: Tune's checkpoint for it (the trial's last epoch, or a PBT
    donor's), or, when that checkpoint is the trial's own and its last run went on past it (a stopped
    sweep, a trial that died mid-epoch), that run's newest complete checkpoint, a step inside an epoch
    included. A donor's checkpoint lives in the donor's trial folder (named after its id) and is taken as
    it is."""
    start = tune.get_checkpoint()
    own = start is None or trial_id in Path(start.path).parent.name
    runs = sorted((sweep_dir / RUNS).glob(f"{trial_id}-*"), key=lambda run: (run / "config.json").stat().st_mtime)
    if not own or not runs:
        return start.path if start is not None else None
    newest = checkpoint.newest([*runs[-1].glob("checkpoint_*"), *([start.path] if start is not None else [])])
    return str(newest) if newest is not None else None


def _fit(trainer, outcome: dict) -> None:
    try:
        outcome["result"] = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - re-raised in the trial's thread, where Tune sees it
        outcome["error"] = exc


def _report(item: dict, spec: RunSpec) -> None:
    if item["metrics"].get(loop.STEP_CHECKPOINT):  # a mid-epoch checkpoint is not a Tune iteration
        return
    metrics = {**item["metrics"], "run": spec.name}
    if item["checkpoint"] is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(item["checkpoint"], tmp, dirs_exist_ok=True)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_sweep(spec: RunSpec, address: str | None = None) -> dict:
    """Run (or resume) the sweep of `spec`; returns the results summary written next to it."""
    launch.connect(address)
    launch.record_config(spec)  # a rerun under this name must keep the base spec and the sweep section
    sweep, sweep_dir = spec.sweep, Path(spec.storage_path) / spec.name
    base = spec.model_dump(mode="json", exclude={"sweep"})  # resolved: a trial's spec is this plus its values
    # SIGTERM: each trial passes the request on to its run; the trials' progress and epochs come to this
    # driver's console and trackers (scheduler/watch.py)
    with preemption.driving(str(sweep_dir)), Watch(spec.tracking) as watch:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, sweep_dir=str(sweep_dir), events=watch.queue), TRIAL_RESOURCES)
        results = _tuner(spec, sweep, sweep_dir, trainable).fit()
    if preemption.STOP_REQUESTED.is_set():
        raise preemption.Stopped(f"sweep {spec.name} stopped: its running trials at checkpoints; rerun the same "
                                 "command to continue")
    return summarize(spec, base, results, sweep_dir)


def _tuner(spec: RunSpec, sweep: SweepSpec, sweep_dir: Path, trainable) -> tune.Tuner:
    verbosity = console.verbosity()
    """A new Tuner of the sweep, or the one that resumes its experiment."""
    if tune.Tuner.can_restore(str(sweep_dir)):
        log.info(f"[{spec.name}] resuming the sweep in {sweep_dir}")
        return tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    per_trial = {"CPU": spec.scaling.max_workers * spec.scaling.cpus_per_worker,
                 "GPU": spec.scaling.max_workers * spec.scaling.use_gpu}
    max_concurrent = concurrent_trials(sweep, ray.cluster_resources(), per_trial)
    kept = tune.CheckpointConfig(num_to_keep=kept_checkpoints(sweep, spec.failure.checkpoint_every))
    return tune.Tuner(trainable, param_space=param_space(sweep),
                      tune_config=tune_config(sweep, spec.train.epochs, max_concurrent),
                      run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_path, checkpoint_config=kept,
                                                verbose={console.QUIET: 0, console.NORMAL: 1}.get(verbosity, 2),
                                                callbacks=[TrialCounts(metrics.run_labels(spec)), EndWhenStopped()]))


# --------------------------------------------------------------------------- results


def summarize(spec: RunSpec, raw: dict, results, sweep_dir: Path) -> dict:
    """trials.json/.csv (one row per trial), the best trial's spec as YAML, a table on stdout."""
    sweep = spec.sweep
    ids = _trial_ids(sweep_dir)
    rows = [_trial_row(result, ids, sweep, spec.train.epochs, sweep_dir) for result in results]
    rows.sort(key=lambda r: (r[sweep.metric] is None,
                             -(r[sweep.metric] or 0) if sweep.mode == "max" else (r[sweep.metric] or 0)))
    best = results.get_best_result(sweep.metric, sweep.mode, scope="last", filter_nan_and_inf=True)
    best_raw = sweeps.apply_config(raw, best.config)
    best_raw.pop("sweep", None)
    best_raw["name"] = f"{spec.name}-best"
    storage.write_text(str(sweep_dir / "best_spec.yaml"), yaml.safe_dump(best_raw, sort_keys=False))
    storage.write_text(str(sweep_dir / "trials.json"), json.dumps(rows, indent=1, default=str))
    storage.write_text(str(sweep_dir / "sweep.json"), json.dumps({"metric": sweep.metric, "mode": sweep.mode,
                                                       "paths": _paths(sweep)}, indent=1))
    columns = ["trial", "state", "epochs", sweep.metric, *_paths(sweep)]
    with open(sweep_dir / "trials.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(_table(rows, columns))
    summary = {"sweep_dir": str(sweep_dir), "best_trial": ids[Path(best.path).name], "best_config": best.config,
               sweep.metric: best.metrics.get(sweep.metric), "best_spec": str(sweep_dir / "best_spec.yaml")}
    print(f"best: trial {summary['best_trial']} {sweep.metric} {summary[sweep.metric]} -> {summary['best_spec']}")
    from bitfleet import report

    report.write_sweep(sweep_dir)
    return summary


def _paths(sweep: SweepSpec) -> list[str]:
    return list(dict.fromkeys(path for _, path, _ in sweep.swept()))


def _trial_ids(sweep_dir: Path) -> dict[str, str]:
    """Trial folder name -> trial id, from Tune's experiment state. Neither the folder's name (a resumed
    trial may get a new one) nor the trial's last result (a PBT donor's until the trial reports again)
    is a reliable source of it."""
    from ray.tune import ExperimentAnalysis

    return {Path(trial.path).name: trial.trial_id for trial in ExperimentAnalysis(str(sweep_dir)).trials}


def _trial_row(result, ids: dict[str, str], sweep, epochs: int, sweep_dir: Path) -> dict:
    """A trial's row: its state, epochs, last metric, values, runs and history. A trial has a run for each
    start (PBT pauses and exploits); the last run's metrics hold the whole lineage of its weights, a
    donor's epochs included, because a run restored from a checkpoint carries that checkpoint's history."""
    trial = ids[Path(result.path).name]
    runs = sorted((sweep_dir / RUNS).glob(f"{trial}-*"), key=lambda run: (run / "config.json").stat().st_mtime)
    reported = [run / "metrics.json" for run in runs if (run / "metrics.json").is_file()]
    history = [{"epoch": m["epoch"], sweep.metric: m.get(sweep.metric), "restores": m.get("restores", 0)}
               for m in (json.loads(reported[-1].read_text()) if reported else [])]  # a run resumed at its
    #                                                                   last epoch reports nothing more
    last = history[-1] if history else {}
    done = last.get("epoch", 0)
    state = "ERROR" if result.error else ("COMPLETED" if done >= epochs else "STOPPED")
    return {"trial": trial, "state": state, "epochs": done, sweep.metric: last.get(sweep.metric),
            **{path: result.config.get(path) for path in _paths(sweep)},
            "runs": [run.name for run in runs], "history": history}


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = ([max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)] if cells
              else [len(c) for c in columns])
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
