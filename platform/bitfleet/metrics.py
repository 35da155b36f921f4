"""The Prometheus metrics bitfleet exports, each defined once: name, type, help, labels, the report key.

The platform's own are here; a workload declares the metrics of what its callbacks report beside its
code (`Workload.metrics`), and they join this catalogue when the workload's class is defined. A reported
key that no metric declares is not exported, and each worker warns about it once.

Metrics leave through `ray.util.metrics`: each node's Ray metrics agent serves them on the node's
`--metrics-export-port`, and Prometheus finds every node through Ray's service-discovery file
(cluster/prometheus/). No process opens a port of its own. Ray prefixes each name with `ray_` and
counters get `_total`: `bitfleet_steps` is queried as `ray_bitfleet_steps_total`.

Labels are bounded: run, workload, trial, rank, split. For a sweep's trial, `run` is the sweep's name
and `trial` the trial id; a plain run has `trial=""`.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Literal

log = logging.getLogger(__name__)
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


PLATFORM: tuple[Metric, ...] = (  # the platform's own; workloads declare theirs beside their code
    # -- an epoch's results, from rank 0 after the all-reduce
    Metric("bitfleet_loss", "gauge", "Mean loss of the last epoch (the workload's objective)", SPLIT_LABELS,
           "{split}/loss"),
    Metric("bitfleet_accuracy", "gauge", "Top-1 accuracy of the last epoch, percent", SPLIT_LABELS, "{split}/acc"),
    Metric("bitfleet_accuracy_top5", "gauge", "Top-5 accuracy of the last epoch, percent (past 10 classes, or "
           "where the workload's objective always measures it)",
           SPLIT_LABELS, "{split}/acc5"),
    Metric("bitfleet_ema_loss", "gauge", "Mean loss of the last epoch's evaluation of the weights' EMA (train.ema)",
           SPLIT_LABELS, "ema/{split}/loss"),
    Metric("bitfleet_ema_accuracy", "gauge", "Top-1 accuracy of the weights' EMA (train.ema), percent", SPLIT_LABELS,
           "ema/{split}/acc"),
    Metric("bitfleet_ema_accuracy_top5", "gauge", "Top-5 accuracy of the weights' EMA (train.ema), percent",
           SPLIT_LABELS, "ema/{split}/acc5"),
    Metric("bitfleet_uncalibrated_loss", "gauge", "Mean loss of the trained weights before BN recalibration",
           SPLIT_LABELS, "uncalibrated/{split}/loss"),
    Metric("bitfleet_uncalibrated_accuracy", "gauge", "Top-1 accuracy of the trained weights before BN "
           "recalibration, percent", SPLIT_LABELS, "uncalibrated/{split}/acc"),
    Metric("bitfleet_uncalibrated_accuracy_top5", "gauge", "Top-5 accuracy of the trained weights before BN "
           "recalibration, percent", SPLIT_LABELS, "uncalibrated/{split}/acc5"),
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
    # -- the run's plan, set by rank 0 when a worker group starts, and its position: the dashboards' % done and ETA
    Metric("bitfleet_planned_epochs", "gauge", "Epochs the run trains in all (train.epochs)"),
    Metric("bitfleet_steps_per_epoch", "gauge", "Optimizer steps per epoch of the current worker group"),
    Metric("bitfleet_global_step", "gauge", "Optimizer steps the run has taken, those before a restore included"),
    # -- checkpoints (rank 0) and the run's life (the driver)
    Metric("bitfleet_checkpoint_save_seconds", "gauge",
           "Time to write and persist the last checkpoint (its ray.train.report included)"),
    Metric("bitfleet_checkpoint_restore_seconds", "gauge", "Time to load the checkpoint a worker group restarted from"),
    Metric("bitfleet_run_state", "gauge", "State of a run: 1 running, 2 succeeded, 3 failed"),
    # -- a sweep's trials, counted by state in the driver
    Metric("bitfleet_trials_pending", "gauge", "Trials of a sweep waiting for resources"),
    Metric("bitfleet_trials_running", "gauge", "Trials of a sweep running"),
    Metric("bitfleet_trials_terminated", "gauge", "Trials of a sweep finished or stopped by the scheduler"),
    Metric("bitfleet_trials_error", "gauge", "Trials of a sweep that failed"),
    # -- what the loop and the platform's callbacks report with each epoch
    Metric("bitfleet_images_per_second", "gauge", "Training images per second of the last epoch, all ranks",
           key="images_per_s"),
    Metric("bitfleet_epoch_seconds", "gauge", "Wall time of the last epoch's training", key="epoch_time_s"),
    Metric("bitfleet_workers", "gauge", "Workers of the group that ran the last epoch", key="workers"),
    Metric("bitfleet_bn_recalibrated_batches", "gauge",
           "Training batches that re-estimated BatchNorm statistics before the last evaluation",
           key="bn/recalibrated_batches"),
)
BY_NAME: dict[str, Metric] = {}  # the platform's and, once their modules are imported, the workloads'
_KEYS: dict[str, tuple[Metric, re.Pattern]] = {}  # report key template -> its metric and matcher


def register(declared) -> None:
    """Add metrics to the catalogue (a workload's, when its class is defined). A name or report key that
    another metric already owns is a programming error: two series would fight over it."""
    for metric in declared:
        owner = BY_NAME.get(metric.name)
        assert owner is None or owner == metric, f"metric {metric.name} is declared twice, differently"
        assert metric.key is None or _KEYS.get(metric.key, (metric,))[0] == metric, (
            f"report key {metric.key} has two metrics")
        BY_NAME[metric.name] = metric
        if metric.key is not None:
            _KEYS[metric.key] = (metric, _key_pattern(metric))


def _key_pattern(metric: Metric) -> re.Pattern:
    """`{split}/acc` -> one series per split; `paper/{quantity}` -> a `quantity` label of bounded values."""
    pattern = re.escape(metric.key)
    for label in re.findall(r"\{(\w+)\}", metric.key):
        assert label in metric.labels, f"{metric.name}: key {metric.key} fills label {label!r}, which it lacks"
        values = "|".join(SPLITS) if label == "split" else r"[A-Za-z0-9_.]+"
        pattern = pattern.replace(re.escape("{" + label + "}"), f"(?P<{label}>{values})")
    return re.compile(pattern + r"\Z")


def catalogue() -> tuple[Metric, ...]:
    return tuple(BY_NAME.values())


def lookup(key: str) -> tuple[Metric, dict[str, str]] | None:
    """The metric that a report key feeds and the labels the key fills, e.g. "val/acc" -> accuracy, split=val."""
    for metric, pattern in _KEYS.values():
        match = pattern.match(key)
        if match:
            return metric, match.groupdict()
    return None


register(PLATFORM)


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
        _GAUGES.hold(name, tags, value)
    elif kind == "counter":
        recorder.inc(value, tags=tags)
    else:
        recorder.observe(value, tags=tags)


class _HeldGauges:
    """The last value of each gauge series this process set, set again every KEEP_ALIVE_S by a daemon thread.

    Ray (2.60) exports a gauge value for two report intervals after it was set, then drops the series: a value
    set once (the run's plan, an epoch's accuracy, the run's state) would reach Prometheus once, if at all, and
    `bitfleet status` would mostly show nothing. Held, a series lives as long as its process, as a gauge does.
    """

    KEEP_ALIVE_S = 1.0  # under Ray's shortest report interval (1 s): the series never lapses

    def __init__(self):
        self.values: dict[tuple[str, tuple], float] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def hold(self, name: str, tags: dict[str, str], value: float) -> None:
        with self.lock:
            self.values[name, tuple(sorted(tags.items()))] = value
            if self.thread is None or not self.thread.is_alive():  # none yet, or this is a forked child
                self.thread = threading.Thread(target=self._keep_alive, name="bitfleet-gauges", daemon=True)
                self.thread.start()

    def _keep_alive(self) -> None:
        while True:
            time.sleep(self.KEEP_ALIVE_S)
            with self.lock:
                held = list(self.values.items())
            for (name, tags), value in held:
                _recorder(name).set(value, tags=dict(tags))


_GAUGES = _HeldGauges()


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

    def __init__(self, labels: dict[str, str], rank: int):
        self.labels = {**labels, "rank": str(rank)}
        self.rank = rank
        self.global_step = 0
        self.unexported: set[str] = set()  # report keys no metric declares: warned about once each

    def plan(self, epochs: int, steps_per_epoch: int, global_step: int) -> None:
        """The run's length and where this worker group starts in it (0, or the restored step)."""
        self.global_step = global_step
        if self.rank == 0:
            record("bitfleet_planned_epochs", epochs, self.labels)
            record("bitfleet_steps_per_epoch", steps_per_epoch, self.labels)
            record("bitfleet_global_step", global_step, self.labels)

    def step(self, seconds: float, data_wait_s: float, samples: int) -> None:
        record("bitfleet_steps", 1, self.labels)
        record("bitfleet_samples", samples, self.labels)
        record("bitfleet_step_seconds", seconds, self.labels)
        record("bitfleet_data_wait_seconds", data_wait_s, self.labels)
        self.global_step += 1
        if self.rank == 0:
            record("bitfleet_global_step", self.global_step, self.labels)

    def epoch(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        for key, value in metrics.items():
            found = lookup(key)
            if found is None:
                if key not in self.unexported:
                    self.unexported.add(key)
                    log.warning("bitfleet: metric %r is reported but no metric declares it: not exported to "
                                "Prometheus (declare it in the workload's `metrics`)", key)
                continue
            metric, extra = found
            record(metric.name, float(value), {**self.labels, **extra})

    def checkpoint(self, name: Literal["save", "restore"], seconds: float) -> None:
        if self.rank == 0:
            record(f"bitfleet_checkpoint_{name}_seconds", seconds, self.labels)
