"""The driver's view of the runs it drives: their workers' events rendered once, tracked, summed up.

A `Watch` owns a `ray.util.queue.Queue` whose handle travels to every worker of its runs (a single run,
a pipeline stage, each trial of a sweep); their rank 0 puts events there (engine/events.py). A thread of
the driver drains it: progress bars or lines and epoch lines on the console (bitfleet.console), the same
values to each run's trackers (bitfleet.tracking), warnings of any rank logged once with their rank.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from ray.util.queue import Empty, Queue

from bitfleet import console, progress, storage
from bitfleet.engine.events import restored_line
from bitfleet.report import against_targets
from bitfleet.spec import RunSpec, TrackingSpec
from bitfleet.tracking import Tracker

log = logging.getLogger("bitfleet.run")

# The drain thread waits on the queue actor in long calls, and `__exit__` wakes it with this event: each
# call is an actor task, and polling twice a second cost the cores a training worker runs on ~1-2% of a
# core (measured with a 1-worker run on this 2-core machine).
_CLOSED = {"kind": "closed", "run": None}
_WAIT_S = 60.0


class Watch:
    def __init__(self, tracking: TrackingSpec):
        self.tracking = tracking
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.trackers: dict[str, Tracker] = {}
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="bitfleet-watch", daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, kind, exc, trace) -> None:
        self._done.set()
        try:
            self.queue.put_nowait(_CLOSED)  # after every worker's event: their puts return once queued
        except Exception:  # noqa: BLE001 - a queue actor that is gone: the thread ends on its own wait's end
            pass
        self._thread.join(timeout=30)
        status = "FINISHED" if kind is None else ("KILLED" if kind.__name__ == "Stopped" else "FAILED")
        for tracker in self.trackers.values():
            tracker.close(status)
        self.queue.shutdown()

    def _drain(self) -> None:
        while True:
            try:
                event = self.queue.get(timeout=_WAIT_S)
            except Empty:
                if self._done.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue actor has gone: nothing more can arrive
                return
            if event == _CLOSED:
                return
            try:
                self.handle(event)
            except Exception:  # noqa: BLE001 - a tracker that fails must not stop the console or the run
                log.exception("bitfleet: could not handle the %s event of %s", event.get("kind"), event.get("run"))

    def handle(self, event: dict) -> None:
        kind, run = event["kind"], event["run"]
        if kind == "start":
            self._start(event)
        elif kind == "progress":
            console.show_progress(event)
            if run in self.trackers:
                self.trackers[run].progress(event)
        elif kind == "epoch":
            console.end_progress(run)
            log.info(progress.epoch_line(run, event["metrics"], event["epochs"]))
            if run in self.trackers:
                self.trackers[run].epoch(event)
        elif kind == "restored":
            log.info(restored_line(event))
        elif kind == "log":
            log.log(event["level"], "[%s] rank %d: %s", run, event["rank"], event["text"])

    def _start(self, event: dict) -> None:
        if event["run"] not in self.trackers:
            self.trackers[event["run"]] = Tracker(self.tracking, event["run_path"], event["run"])
        resumed = event["epoch"] or event["step_in_epoch"]
        where = (f"from epoch {event['epoch'] + 1}, step {event['step_in_epoch']}" if resumed else "from the start")
        log.info("[%s] %d worker(s), %d epochs of %d steps, %s", event["run"], event["workers"], event["epochs"],
                 event["steps_per_epoch"], where)


def show_summary(spec: RunSpec, summary: dict, wall_s: float, metric: str) -> None:
    """The end of a run as a compact table: final and best metrics, each target with its gap, wall time,
    mean images/s, restores, best and last checkpoint (`result.json` holds the same, for machines)."""
    try:
        history = json.loads(storage.read_text(storage.join(summary["run_dir"], "metrics.json")))
    except (OSError, ValueError):
        history = []
    final = history[-1] if history else {}
    rows = [("epochs", f"{final.get('epoch', 0)}/{spec.train.epochs}"),
            ("wall time", progress.duration(wall_s)),
            ("images/s (mean)", f"{sum(m['images_per_s'] for m in history) / max(len(history), 1):.0f}"),
            ("restores", str(final.get("restores", 0)))]
    rows += [(f"final {group}", values) for group, values in progress.metric_groups(final)]
    best = summary.get("best") or {}
    if metric in best:
        rows.append(("best", f"{metric} {best[metric]:.4g} at epoch {best.get('epoch')}"))
    rows += [(f"target {key}", _against(row)) for key, row in against_targets(final, spec.targets).items()]
    rows += [("best checkpoint", str(summary.get("best_checkpoint"))),
             ("last checkpoint", str(summary.get("last_checkpoint")))]
    console.print_table(console.summary_table(spec.name, rows))


def _against(row: dict) -> str:
    """A value beside its target: the paper's number and the gap, the expected range, or no figure."""
    if "expected" in row:
        low, high = row["expected"]
        return f"{row['value']:.4g} vs expected [{low:g}, {high:g}] ({'within' if row['within'] else 'outside'})"
    if row["paper"] is None:
        return f"{row['value']:.4g} (no published figure)"
    return f"{row['value']:.4g} vs paper {row['paper']} (gap {row['gap']:+.2f})"
