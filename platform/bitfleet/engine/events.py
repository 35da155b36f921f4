"""What a run's workers tell its driver while they train, and the account behind the progress lines.

Rank 0 sends events — `start` (the plan: epochs, steps, where it resumed), `progress` every
`train.print_freq` steps (epoch, step, running loss, lr, images/s, data-wait share, ETA of the epoch and
of the run), `epoch` (the epoch's metrics, and histograms a workload offers), `restored` — and every rank
its warnings (`log`), through the `ray.util.queue.Queue` its driver made (scheduler/watch.py renders them
once, on the driver's console, and feeds the trackers). Workers print nothing themselves: Ray would
forward every line, twice. Without a queue (Ray Train's local mode) the events are logged where the
worker runs, as the same lines.
"""
from __future__ import annotations

import logging
import os
import time

from bitfleet import progress

log = logging.getLogger("bitfleet.run")


class Events:
    """One worker's sender: `emit(kind, **fields)`; a queue that has gone (its driver ended) is dropped."""

    def __init__(self, queue, run: str, rank: int):
        self.queue, self.run, self.rank = queue, run, rank
        self._forwarder: _Forward | None = None

    def emit(self, kind: str, **fields) -> None:
        event = {"kind": kind, "run": self.run, "rank": self.rank, "pid": os.getpid(), **fields}
        if self.queue is not None:
            try:
                self.queue.put_nowait(event)
                return
            except Exception:  # noqa: BLE001 - the driver's queue is gone: training goes on, logging here
                self.queue = None
        local(event)

    def forward_warnings(self) -> None:
        """This worker's warnings of bitfleet and the workloads go to the driver too (its console shows
        them once, with the rank); Ray no longer forwards worker output by default."""
        self._forwarder = _Forward(self)
        for name in ("bitfleet", "workloads"):
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if isinstance(h, _Forward)]:
                logger.removeHandler(handler)  # an earlier Trainer of this process (local mode)
            logger.addHandler(self._forwarder)


class _Forward(logging.Handler):
    def __init__(self, events: Events):
        super().__init__(level=logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        if self.events.queue is not None:
            self.events.emit("log", level=record.levelno, text=record.getMessage())


def local(event: dict) -> None:
    """An event logged where the worker runs (no driver to send it to)."""
    kind = event["kind"]
    if kind == "progress":
        log.info(progress.progress_line(event))
    elif kind == "epoch":
        log.info(progress.epoch_line(event["run"], event["metrics"], event["epochs"]))
    elif kind == "restored":
        log.info(restored_line(event))


def restored_line(event: dict) -> str:
    where = f", step {event['step_in_epoch']} of epoch {event['epoch'] + 1}" if event["step_in_epoch"] else ""
    return f"[{event['run']}] restored from checkpoint at epoch {event['epoch']}{where} (pid {event['pid']})"


class Meter:
    """Rank 0's account of an epoch for the progress lines: the steps timed since the epoch (or its rest,
    after a restore) began, the data wait and images of the last interval, and the last evaluation's time
    (the run's ETA counts one per remaining epoch)."""

    def __init__(self, every: int, steps_per_epoch: int, epochs: int):
        self.every, self.steps_per_epoch, self.epochs = every, steps_per_epoch, epochs
        self.eval_s = 0.0
        self.start_epoch()

    def start_epoch(self) -> None:
        self.trained_s, self.steps = 0.0, 0
        self.window_s, self.window_wait_s, self.window_images = 0.0, 0.0, 0

    def step(self, step_in_epoch: int, seconds: float, data_wait_s: float, images: int) -> bool:
        """Account one step; True when a progress line is due (every `every` steps of the epoch)."""
        self.trained_s += seconds
        self.steps += 1
        self.window_s += seconds
        self.window_wait_s += data_wait_s
        self.window_images += images
        return step_in_epoch % self.every == 0 and step_in_epoch < self.steps_per_epoch

    def evaluated(self, seconds: float) -> None:
        self.eval_s = seconds

    def snapshot(self, epoch: int, step_in_epoch: int, global_step: int, loss: float, lr: float) -> dict:
        """The fields of a `progress` event (`epoch` 0-based, as the loop counts); starts a new interval."""
        per_step = self.trained_s / max(self.steps, 1)
        eta_epoch = (self.steps_per_epoch - step_in_epoch) * per_step
        later_epochs = self.epochs - epoch - 1
        fields = {
            "epoch": epoch + 1, "epochs": self.epochs, "step": step_in_epoch, "steps": self.steps_per_epoch,
            "global_step": global_step, "loss": loss, "lr": lr,
            "images_per_s": self.window_images / max(self.window_s, 1e-9),
            "data_wait": self.window_wait_s / max(self.window_s, 1e-9), "eta_epoch_s": eta_epoch,
            "eta_run_s": eta_epoch + self.eval_s + later_epochs * (self.steps_per_epoch * per_step + self.eval_s),
            "time": time.time(),
        }
        self.window_s, self.window_wait_s, self.window_images = 0.0, 0.0, 0
        return fields
