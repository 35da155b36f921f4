"""Every Prometheus metric bitfleet exports, defined once: name, type, help, labels.

Metrics leave through `ray.util.metrics`: each node's Ray metrics agent serves them on the node's
`--metrics-export-port`, and Prometheus finds every node through Ray's service-discovery file
(cluster/prometheus/). No process opens a port of its own. Ray prefixes each name with `ray_` and
counters get `_total`: `bitfleet_steps` is queried as `ray_bitfleet_steps_total`.

Labels are bounded: run, workload, trial, rank, split. For a sweep's trial, `run` is the sweep's name
and `trial` the trial id; a plain run has `trial=""`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Literal

RUN_LABELS = ("run", "workload", "trial")
RANK_LABELS = (*RUN_LABELS, "rank")
SPLIT_LABELS = (*RUN_LABELS, "split")
SPLITS = ("train", "val", "test")
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RunState:
    """Values of `bitfleet_run_state` (a gauge: its value is the state)."""

    RUNNING, SUCCEEDED, FAILED = 1, 2, 3


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["gauge", "counter", "histogram"]
    help: str
    labels: tuple[str, ...] = RUN_LABELS
    key: str | None = None  # the epoch-metrics key it mirrors; "{split}/..." for one series per split

    @property
    def query_name(self) -> str:
        """The name Prometheus stores: Ray's prefix, and `_total` on counters."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


CATALOGUE: tuple[Metric, ...] = (
    # -- an epoch's results, from rank 0 after the all-reduce
    Metric("bitfleet_loss", "gauge", "Mean cross-entropy loss of the last epoch", SPLIT_LABELS, "{split}/loss"),
    Metric("bitfleet_accuracy", "gauge", "Top-1 accuracy of the last epoch, percent", SPLIT_LABELS, "{split}/acc"),
    Metric("bitfleet_accuracy_top5", "gauge", "Top-5 accuracy of the last epoch, percent (past 10 classes)",
           SPLIT_LABELS, "{split}/acc5"),
    Metric("bitfleet_learning_rate", "gauge", "Learning rate of the first parameter group", key="lr"),
    Metric("bitfleet_epoch", "gauge", "Epochs completed", key="epoch"),
    Metric("bitfleet_worker_restarts", "gauge", "Times the run's workers were restored from a checkpoint",
           key="restores"),
    # -- every step, on every rank
    Metric("bitfleet_steps", "counter", "Optimizer steps taken", RANK_LABELS),
    Metric("bitfleet_samples", "counter", "Training samples processed", RANK_LABELS),
    Metric("bitfleet_step_seconds", "histogram", "Wall time of one training step, data wait included",
           RANK_LABELS),
    Metric("bitfleet_data_wait_seconds", "counter",
           "Time spent waiting for the next batch; its rate is the share of wall time lost to data", RANK_LABELS),
    # -- checkpoints (rank 0) and the run's life (the driver)
    Metric("bitfleet_checkpoint_save_seconds", "gauge", "Time to write and persist the last checkpoint (its ray.train.report included)"),
    Metric("bitfleet_checkpoint_restore_seconds", "gauge", "Time to load the checkpoint a worker group restarted from"),
    Metric("bitfleet_run_state", "gauge", "State of a run: 1 running, 2 succeeded, 3 failed"),
    # -- a sweep's trials, counted by state in the driver
    Metric("bitfleet_trials_pending", "gauge", "Trials of a sweep waiting for resources"),
    Metric("bitfleet_trials_running", "gauge", "Trials of a sweep running"),
    Metric("bitfleet_trials_terminated", "gauge", "Trials of a sweep finished or stopped by the scheduler"),
    Metric("bitfleet_trials_error", "gauge", "Trials of a sweep that failed"),
    # -- the workloads' telemetry, reported by their callbacks each epoch
    Metric("bitfleet_temperature", "gauge", "RBNN: temperature t of the sign approximation", key="rbnn/t"),
    Metric("bitfleet_temperature_k", "gauge", "RBNN: the approximation's k = max(1/t, 1)", key="rbnn/k"),
    Metric("bitfleet_sign_flip_ratio", "gauge", "RBNN: share of binary weights whose sign flipped in the epoch",
           key="rbnn/flip_ratio"),
    Metric("bitfleet_rotation_sin_theta", "gauge", "RBNN: mean |sin theta| of the adjustable rotation",
           key="rbnn/sin_theta"),
    Metric("bitfleet_rotation_error_before", "gauge",
           "RBNN: quantization error ||sign(R1'XR2) - R1'XR2|| before the last rotation update",
           key="rbnn/rotation_error_before"),
    Metric("bitfleet_rotation_error_after", "gauge", "RBNN: the same error after the last rotation update",
           key="rbnn/rotation_error_after"),
    Metric("bitfleet_lbp_alpha", "gauge", "LBPNet: mean comparison temperature alpha", key="lbp/alpha"),
    Metric("bitfleet_rp_tau", "gauge", "LBPNet: mean gate temperature tau of the RP fusion", key="rp/tau"),
    Metric("bitfleet_gate_alive_ratio", "gauge", "LBPNet: share of RP gates open on the hard path",
           key="rp/alive_hard"),
    Metric("bitfleet_gate_alive_ratio_soft", "gauge", "LBPNet: mean soft opening of the RP gates",
           key="rp/alive_soft"),
    Metric("bitfleet_collapse_guard_events", "gauge", "LBPNet: times the collapse guard restored the best weights",
           key="guard/collapse_events"),
)
BY_NAME = {metric.name: metric for metric in CATALOGUE}


def keyed() -> dict[str, tuple[Metric, dict[str, str]]]:
    """Epoch-metrics key -> (metric, the extra labels of that key), e.g. "val/acc" -> accuracy, split=val."""
    table = {}
    for metric in CATALOGUE:
        if metric.key is None:
            continue
        if "{split}" in metric.key:
            table.update({metric.key.format(split=s): (metric, {"split": s}) for s in SPLITS})
        else:
            table[metric.key] = (metric, {})
    return table


def run_labels(spec) -> dict[str, str]:
    """run, workload, trial of a RunSpec: a sweep's trial is labelled by its sweep and trial id."""
    of = spec.trial_of
    return {"run": of.sweep if of else spec.name, "workload": spec.workload, "trial": of.trial if of else ""}


@cache
def _recorder(name: str):
    """The `ray.util.metrics` object of a catalogue metric, one per process (Ray keys series by tags)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    metric = BY_NAME[name]
    if metric.kind == "histogram":
        return Histogram(metric.name, metric.help, boundaries=list(STEP_SECONDS_BUCKETS), tag_keys=metric.labels)
    return (Counter if metric.kind == "counter" else Gauge)(metric.name, metric.help, tag_keys=metric.labels)


def record(name: str, value: float, labels: dict[str, str]) -> None:
    """Set a gauge, add to a counter or observe a histogram sample, by catalogue name."""
    recorder, kind = _recorder(name), BY_NAME[name].kind
    tags = {key: labels[key] for key in BY_NAME[name].labels}
    if kind == "gauge":
        recorder.set(value, tags=tags)
    elif kind == "counter":
        recorder.inc(value, tags=tags)
    else:
        recorder.observe(value, tags=tags)


@contextmanager
def run_state(labels: dict[str, str]):
    """`bitfleet_run_state` of the run driven inside the `with`: running, then succeeded or failed."""
    record("bitfleet_run_state", RunState.RUNNING, labels)
    try:
        yield
    except BaseException:
        record("bitfleet_run_state", RunState.FAILED, labels)
        raise
    record("bitfleet_run_state", RunState.SUCCEEDED, labels)


class WorkerMetrics:
    """What one Ray Train worker exports: its steps on every rank, the epoch's results on rank 0."""

    def __init__(self, spec, rank: int):
        self.labels = {**run_labels(spec), "rank": str(rank)}
        self.rank = rank
        self.keys = keyed()

    def step(self, seconds: float, data_wait_s: float, samples: int) -> None:
        record("bitfleet_steps", 1, self.labels)
        record("bitfleet_samples", samples, self.labels)
        record("bitfleet_step_seconds", seconds, self.labels)
        record("bitfleet_data_wait_seconds", data_wait_s, self.labels)

    def epoch(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        for key, value in metrics.items():
            if key in self.keys:
                metric, extra = self.keys[key]
                record(metric.name, float(value), {**self.labels, **extra})

    def checkpoint(self, name: Literal["save", "restore"], seconds: float) -> None:
        if self.rank == 0:
            record(f"bitfleet_checkpoint_{name}_seconds", seconds, self.labels)
