"""The LBPNet engine's loops over pixels, compiled with numba: one pass each where numpy needs several
(a shifted copy per bit, a gather per channel row, a temporary per pool tap cost more than the work).
Maps are (C, H, W, B), batch last; every inner loop runs along the contiguous batch axis, so the
comparisons, popcounts and selects compile to vector instructions.

A block's fused value of channel i at a pixel is computed from the pixel's key: with `count` (RP fusion)
the key is the pixel's code and the value follows from popcount(key & masks[i]) and thresholds[i] by
arithmetic or a select (vectorised: no table lookup); otherwise the key indexes tables[i], the fusion of
the batch's distinct codes. Output rows are given (`rows`), so a stage fills its channels in place.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange
from numba.extending import intrinsic

PARALLEL_WORK = 1 << 20  # elements below which one thread beats waking the pool (batch-1 latency)


def _both(f):
    """The loop compiled twice — one thread and numba's pool — called as `kernel(work, *args)`."""
    serial, parallel = numba.njit(cache=True)(f), numba.njit(cache=True, parallel=True)(f)
    return lambda work, *args: (parallel if work >= PARALLEL_WORK else serial)(*args)


@intrinsic
def _popcount(typingctx, x):
    """LLVM's ctpop: one instruction per lane where the CPU has a vector popcount."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return x(x), codegen


@_both
def lbp_codes(values, channel, dy, dx, bits, out):
    """out[y, x, b] |= bits[u] (2^u) where values[c_u, y + dy_u, x + dx_u, b] > values[c_u, y, x, b] (edges
    replicated)."""
    _, height, width, batch = values.shape
    for y in prange(height):
        for x in range(width):
            dst = out[y, x]
            for u in range(len(channel)):
                c = channel[u]
                yy, xx = min(max(y + dy[u], 0), height - 1), min(max(x + dx[u], 0), width - 1)
                far, here, bit = values[c, yy, xx], values[c, y, x], bits[u]
                for b in range(batch):
                    dst[b] |= bit if far[b] > here[b] else 0


@_both
def fuse(keys, masks, thresholds, count, tables, rows, out, pool):
    """out[rows[i]] = channel i's MAC-free value at each pixel — with `count` the shifted ReLU of the RP count,
    max(popcount(key & masks[i]) - thresholds[i] + 1, 0), else tables[i, key] — or, with `pool`, its 2x2
    max (odd edges dropped; the ReLU is monotone, so RP pools the counts)."""
    _, height, width, batch = out.shape
    for i in prange(len(rows)):
        mask, base, table, dst = masks[i], thresholds[i] - 1, tables[i], out[rows[i]]
        for y in range(height):
            for x in range(width):
                if not pool:
                    k = keys[y, x]
                    if count:
                        for b in range(batch):
                            dst[y, x, b] = max(np.int64(_popcount(k[b] & mask)) - base, 0)
                    else:
                        for b in range(batch):
                            dst[y, x, b] = table[k[b]]
                    continue
                k00, k01, k10, k11 = keys[2 * y, 2 * x], keys[2 * y, 2 * x + 1], keys[2 * y + 1, 2 * x], keys[
                    2 * y + 1, 2 * x + 1]
                if count:
                    for b in range(batch):
                        n = max(max(_popcount(k00[b] & mask), _popcount(k01[b] & mask)),
                                max(_popcount(k10[b] & mask), _popcount(k11[b] & mask)))
                        dst[y, x, b] = max(np.int64(n) - base, 0)
                else:
                    for b in range(batch):
                        dst[y, x, b] = max(max(table[k00[b]], table[k01[b]]), max(table[k10[b]], table[k11[b]]))


@numba.njit(inline="always")
def _fused(key, mask, threshold, count, lo, hi, table):
    """A residual block's fused float32 value: BN of the gated RP bit (lo or hi, scalars held in registers:
    a load from the table inside the loop could alias the output and keep it scalar) or table[key]."""
    if count:
        return hi if _popcount(key & mask) >= threshold else lo
    return table[key]


@_both
def residual(keys, masks, thresholds, count, tables, rows, out, previous, previous_rows, pool):
    """out[rows[i]] = fused value + previous[previous_rows[i]] (one float32 addition), then, with `pool`, the
    2x2 average as torch's CPU kernel takes it: ((top left + top right) + bottom left) + bottom right, / 4."""
    _, height, width, batch = out.shape
    four = np.float32(4)
    for i in prange(len(rows)):
        mask, t, table = masks[i], thresholds[i], tables[i]
        lo, hi = table[0], table[len(table) - 1]
        dst, src = out[rows[i]], previous[previous_rows[i]]
        for y in range(height):
            for x in range(width):
                if not pool:
                    k, s = keys[y, x], src[y, x]
                    for b in range(batch):
                        dst[y, x, b] = _fused(k[b], mask, t, count, lo, hi, table) + s[b]
                    continue
                y0, x0 = 2 * y, 2 * x
                k00, k01, k10, k11 = keys[y0, x0], keys[y0, x0 + 1], keys[y0 + 1, x0], keys[y0 + 1, x0 + 1]
                s00, s01, s10, s11 = src[y0, x0], src[y0, x0 + 1], src[y0 + 1, x0], src[y0 + 1, x0 + 1]
                for b in range(batch):
                    total = (_fused(k00[b], mask, t, count, lo, hi, table) + s00[b]) + (
                        _fused(k01[b], mask, t, count, lo, hi, table) + s01[b])
                    total = total + (_fused(k10[b], mask, t, count, lo, hi, table) + s10[b])
                    total = total + (_fused(k11[b], mask, t, count, lo, hi, table) + s11[b])
                    dst[y, x, b] = total / four


@_both
def sums(keys, masks, thresholds, tables, out):
    """out[i, b] = Σ over the pixels of keys of RP channel i's value, BN of its gated bit (float64): what a
    mean pools. Counts the fired pixels (integers, many lanes a vector) and weighs BN's two values by them."""
    height, width, batch = keys.shape
    for i in prange(len(tables)):
        mask, t, dst = masks[i], thresholds[i], out[i]
        lo, hi = np.float64(tables[i, 0]), np.float64(tables[i, 1])
        fired = np.zeros(batch, np.int32)
        for y in range(height):
            for x in range(width):
                k = keys[y, x]
                for b in range(batch):
                    fired[b] += np.int32(_popcount(k[b] & mask) >= t)
        for b in range(batch):
            dst[b] = lo * (height * width - fired[b]) + hi * fired[b]


@_both
def table_sums(keys, columns, out):
    """out[b, :] = Σ over the pixels of image b of columns[key] (float64, (distinct codes, C)): the sums of
    every channel at once, one contiguous row added per pixel (vector adds, no gathers)."""
    height, width, batch = keys.shape
    for b in prange(batch):
        dst = out[b]
        for y in range(height):
            for x in range(width):
                row = columns[keys[y, x, b]]
                for c in range(len(dst)):
                    dst[c] += row[c]


@_both
def max_pool(values, rows, out, out_rows):
    """out[out_rows[i]] = the 2x2 max pool of values[rows[i]] (odd edges dropped)."""
    _, height, width, batch = out.shape
    for i in prange(len(rows)):
        src, dst = values[rows[i]], out[out_rows[i]]
        for y in range(height):
            for x in range(width):
                a, b_, c, d = src[2 * y, 2 * x], src[2 * y, 2 * x + 1], src[2 * y + 1, 2 * x], src[2 * y + 1, 2 * x + 1]
                for b in range(batch):
                    dst[y, x, b] = max(max(a[b], b_[b]), max(c[b], d[b]))


@_both
def lookup(tables, values, rows, out):
    """out[rows[i]] = tables[i, values[rows[i]]] on (C, pixels) arrays: each channel through its own table
    (ranks, pixel codes -> floats)."""
    for i in prange(len(rows)):
        table, src, dst = tables[i], values[rows[i]], out[rows[i]]
        for j in range(len(src)):
            dst[j] = table[src[j]]
