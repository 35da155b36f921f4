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
    """`[run] epoch 3/8  train loss 0.41 acc 87.5  test loss 0.38 acc 88.9  ema/test loss 0.36 acc 89.2
    lr 0.05  530 img/s`: every split's objective metrics, whatever the workload's objective measures."""
    splits = "  ".join(f"{group} {values}" for group, values in metric_groups(metrics))
    return (f"[{run}] epoch {metrics['epoch']}/{epochs}  {splits}  lr {metrics['lr']:.4g}  "
            f"{metrics['images_per_s']:.0f} img/s")


def metric_groups(metrics: dict) -> list[tuple[str, str]]:
    """The evaluated metrics as (group, `loss 0.38 acc 88.9`) in split order: a split's own (`test`), then
    the same split of another model or moment (`ema/test`, `uncalibrated/test`); workloads' telemetry
    (`rbnn/...`, `lbp/...`) is not a split and stays out."""
    groups: dict[str, list[str]] = {}
    for key, value in metrics.items():
        group, _, name = key.rpartition("/")
        if group.rpartition("/")[2] in SPLITS and isinstance(value, (int, float)) and not isinstance(value, bool):
            groups.setdefault(group, []).append(f"{name} {value:.4g}")
    order = sorted(groups, key=lambda g: (SPLITS.index(g.rpartition("/")[2]), "/" in g, g))
    return [(group, " ".join(groups[group])) for group in order]
