"""Scalar schedules over training progress (temperatures, regulariser weights): one spec, one formula each.

`progress` is the fraction of training done, in [0, 1] (`TrainState.progress`, step resolution).
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from bitfleet.spec import Strict


class ScheduleSpec(Strict):
    """A value moving from `start` to `end` over training (after holding `start` for `hold` of it)."""

    type: Literal["constant", "linear", "cosine", "geometric"] = "cosine"
    start: float
    end: float
    hold: float = Field(0.0, ge=0, lt=1)  # fraction of training that keeps `start`

    @model_validator(mode="after")
    def _positive_for_geometric(self):
        if self.type == "geometric" and min(self.start, self.end) <= 0:
            raise ValueError(f"start: a geometric schedule needs start and end > 0 (got {self.start}, {self.end})")
        return self


def value(spec: ScheduleSpec, progress: float) -> float:
    """constant: start; linear; cosine: half a cosine from start to end; geometric: log-linear (start, end > 0)."""
    t = min(1.0, max(0.0, (progress - spec.hold) / (1.0 - spec.hold)))
    if spec.type == "constant":
        return spec.start
    if spec.type == "linear":
        return spec.start + (spec.end - spec.start) * t
    if spec.type == "cosine":
        return spec.end + (spec.start - spec.end) * 0.5 * (1 + math.cos(math.pi * t))
    return spec.start * (spec.end / spec.start) ** t
