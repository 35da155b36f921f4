"""The LBPNet engine's loops over pixels, compiled with numba: one pass each where numpy needs several
(a shifted copy per bit and a gather per channel row cost more than the comparisons themselves).
Maps are (C, H, W, B), batch last; every loop runs along the contiguous batch axis."""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

PARALLEL_WORK = 1 << 20  # elements below which one thread beats waking the pool (batch-1 latency)


def _both(f):
    """The loop compiled twice — one thread and numba's pool — called as `kernel(work, *args)`."""
    serial, parallel = numba.njit(cache=True)(f), numba.njit(cache=True, parallel=True)(f)
    return lambda work, *args: (parallel if work >= PARALLEL_WORK else serial)(*args)


@_both
def lbp_codes(values, channel, dy, dx, out):
    """out[y, x, b] |= 2^u where values[c_u, y + dy_u, x + dx_u, b] > values[c_u, y, x, b] (edges replicated)."""
    _, height, width, batch = values.shape
    for y in prange(height):
        for x in range(width):
            for u in range(len(channel)):
                c = channel[u]
                yy, xx = min(max(y + dy[u], 0), height - 1), min(max(x + dx[u], 0), width - 1)
                bit = np.uint64(1) << np.uint64(u)
                for b in range(batch):
                    if values[c, yy, xx, b] > values[c, y, x, b]:
                        out[y, x, b] |= bit


@_both
def gather(table, index, out):
    """out[c, i] = table[c, index[i]]: each pixel's fusion value from its code's column."""
    for c in prange(table.shape[0]):
        row, dst = table[c], out[c]
        for i in range(len(index)):
            dst[i] = row[index[i]]


@_both
def gather_max_pool(table, index, out):
    """out[c, y, x, b] = max over the 2x2 window at (2y, 2x) of table[c, index[., ., b]]: gathered and pooled."""
    _, height, width, batch = out.shape
    for c in prange(table.shape[0]):
        row = table[c]
        for y in range(height):
            for x in range(width):
                for b in range(batch):
                    top = max(row[index[2 * y, 2 * x, b]], row[index[2 * y, 2 * x + 1, b]])
                    bottom = max(row[index[2 * y + 1, 2 * x, b]], row[index[2 * y + 1, 2 * x + 1, b]])
                    out[c, y, x, b] = max(top, bottom)


@_both
def lookup(tables, values, out):
    """out[c, i] = tables[c, values[c, i]]: each channel through its own table (ranks, pixel codes -> floats)."""
    for c in prange(tables.shape[0]):
        row, src, dst = tables[c], values[c], out[c]
        for i in range(len(src)):
            dst[i] = row[src[i]]
