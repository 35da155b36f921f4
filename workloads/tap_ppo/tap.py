r"""TAP: the tri-segment approximation of a record point's unsigned INT8 activation codes.

A code c ∈ {0..255} is clipped to tmax, then two breakpoints 0 < b1 < b2 < tmax split [0, tmax] into three
segments with starts a = (0, b1, b2) and steps s = (s0, s1, s2), each s_i ∈ {1, 2, 4, 8, 16}:

    x      = min(max(c, 0), tmax)
    i(x)   = 0 if x < b1,  1 if b1 <= x < b2,  2 if x >= b2
    TAP(c) = a_i + floor((x - a_i) / s_i) · s_i

A code becomes the start of its segment plus its offset within the segment rounded down to a multiple of
the segment's step. TAP(c) <= x <= tmax, the map is monotone non-decreasing (within a segment trivially;
across a boundary the last value of segment i is below a_{i+1}) and idempotent (TAP(c) stays in its segment
on an s_i grid).

Its number of distinct values over c = 0..tmax (the segments' lengths are b1, b2 - b1, tmax - b2 + 1):

    levels = ceil(b1 / s0) + ceil((b2 - b1) / s1) + ceil((tmax - b2 + 1) / s2)

and `saved_fraction` = 1 - levels / (tmax + 1): the share of the tmax + 1 clipped codes that TAP removes.

tmax itself comes from calibration: the 90th percentile of a record point's non-zero codes (codes > 0;
ReLU zeros dominate every histogram and say nothing about the range of live activations) plus 10.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STEPS = (1, 2, 4, 8, 16)
MAX_CODE = 255
MIN_TMAX = 3  # 0 < b1 < b2 < tmax needs tmax >= 3
TMAX_PERCENTILE = 90
TMAX_MARGIN = 10


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TapCodes:
    """The TAP parameters of one record point, in code units (see the module docstring)."""

    tmax: int
    b1: int
    b2: int
    steps: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        if not _is_int(self.tmax) or not MIN_TMAX <= self.tmax <= MAX_CODE:
            raise ValueError(f"tmax: must be an integer in [{MIN_TMAX}, {MAX_CODE}], got {self.tmax!r}")
        if not _is_int(self.b1) or not 0 < self.b1 < self.tmax - 1:
            raise ValueError(f"b1: must be an integer with 0 < b1 < b2 < tmax={self.tmax}, got {self.b1!r}")
        if not _is_int(self.b2) or not self.b1 < self.b2 < self.tmax:
            raise ValueError(f"b2: must be an integer with b1={self.b1} < b2 < tmax={self.tmax}, got {self.b2!r}")
        if len(self.steps) != 3 or not all(_is_int(s) and s in STEPS for s in self.steps):
            raise ValueError(f"steps: must be three of {STEPS}, got {self.steps!r}")

    def to_dict(self) -> dict:
        """JSON-able form; `levels` is derived, written for readers of result files."""
        return {"tmax": self.tmax, "b1": self.b1, "b2": self.b2, "steps": list(self.steps), "levels": levels(self)}

    @classmethod
    def from_dict(cls, data: dict) -> TapCodes:
        """Inverse of `to_dict`; a `levels` that disagrees with the parameters is an error."""
        codes = cls(tmax=data["tmax"], b1=data["b1"], b2=data["b2"], steps=tuple(data["steps"]))
        if "levels" in data and data["levels"] != levels(codes):
            raise ValueError(f"levels: {data['levels']!r} does not match tmax/b1/b2/steps ({levels(codes)})")
        return codes


def tap_map(codes: torch.Tensor, c: TapCodes) -> torch.Tensor:
    """TAP(codes) elementwise (module docstring), in the input's integer dtype and device."""
    x = codes.to(torch.int64).clamp(0, c.tmax)
    upper = x >= c.b2
    middle = (x >= c.b1) & ~upper
    start = torch.where(upper, c.b2, torch.where(middle, c.b1, 0))
    step = torch.where(upper, c.steps[2], torch.where(middle, c.steps[1], c.steps[0]))
    return (start + torch.div(x - start, step, rounding_mode="floor") * step).to(codes.dtype)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def levels(c: TapCodes) -> int:
    """Distinct TAP values over codes 0..tmax: Σ_i ceil(segment length_i / s_i)."""
    lengths = (c.b1, c.b2 - c.b1, c.tmax - c.b2 + 1)
    return sum(_ceil_div(n, s) for n, s in zip(lengths, c.steps))


def saved_fraction(c: TapCodes) -> float:
    """1 - levels / (tmax + 1): the share of the clipped code range merged away."""
    return 1.0 - levels(c) / (c.tmax + 1)


def tmax_from_histogram(hist: torch.Tensor) -> int:
    """floor(P90 of the non-zero codes) + 10, clamped to [3, 255].

    P90 is numpy's default ('linear') percentile of the codes 1..255 repeated by their counts in `hist`
    (256 bins): with n non-zero codes sorted as v_0 <= ... <= v_{n-1} and h = 0.9 (n - 1),
    P90 = v_floor(h) + (h - floor(h)) (v_ceil(h) - v_floor(h)). It is computed in exact integer arithmetic
    (h = 9 (n - 1) / 10) from the cumulative counts, without expanding the codes. A histogram with no
    non-zero code gives P90 = 0."""
    counts = hist.to(torch.int64).flatten()
    if counts.numel() != MAX_CODE + 1:
        raise ValueError(f"hist: expected {MAX_CODE + 1} bins, got {counts.numel()}")
    if (counts < 0).any():
        raise ValueError("hist: counts must be non-negative")
    cumulative = counts[1:].cumsum(0)
    n = int(cumulative[-1])
    if n == 0:
        p90 = 0
    else:
        whole, rest = divmod(TMAX_PERCENTILE * (n - 1), 100)
        ranks = torch.tensor([whole, min(whole + 1, n - 1)])
        lo, hi = (torch.searchsorted(cumulative, ranks, right=True) + 1).tolist()  # code of sorted rank k
        p90 = lo + (hi - lo) * rest // 100
    return int(min(max(p90 + TMAX_MARGIN, MIN_TMAX), MAX_CODE))
