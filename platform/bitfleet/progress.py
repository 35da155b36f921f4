"""What a run's progress looks like as text: the in-epoch progress line, the epoch line, durations.

Pure formatting of the events a run's workers send (engine/events.py), shared by the driver's console
(bitfleet.console) and by a worker that has no driver to send them to (Ray Train's local mode).
"""
from __future__ import annotations

import math

from bitfleet.metrics import SPLITS


def duration(seconds: float | None) -> str:
    """`42s`, `7m05s`, `3h02m`, `2d04h`; `?` when not known yet."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def progress_line(event: dict) -> str:
    """`[run] epoch 3/120 step 500/5005  loss 2.31  lr 0.0987  812 img/s  data 4%  ETA epoch 1h02m run 5d03h`"""
    return (f"[{event['run']}] epoch {event['epoch']}/{event['epochs']} step {event['step']}/{event['steps']}  "
            f"loss {event['loss']:.4g}  lr {event['lr']:.4g}  {event['images_per_s']:.0f} img/s  "
            f"data {100 * event['data_wait']:.0f}%  ETA epoch {duration(event['eta_epoch_s'])} "
            f"run {duration(event['eta_run_s'])}")


def epoch_line(run: str, metrics: dict, epochs: int) -> str:
    """`[run] epoch 3/8  train loss 0.41 acc 87.5  test loss 0.38 acc 88.9  lr 0.05  530 img/s`: every
    split's objective metrics, whatever the workload's objective measures."""
    splits = "  ".join(
        f"{split} " + " ".join(f"{key.split('/', 1)[1]} {value:.4g}" for key, value in metrics.items()
                              if key.startswith(split + "/") and isinstance(value, (int, float)))
        for split in SPLITS if f"{split}/loss" in metrics
    )
    return (f"[{run}] epoch {metrics['epoch']}/{epochs}  {splits}  lr {metrics['lr']:.4g}  "
            f"{metrics['images_per_s']:.0f} img/s")
