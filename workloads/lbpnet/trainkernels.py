"""Training-time loops of the LBP layer and RP fusion, compiled with numba: one pass over a batch where
torch needs one operator (and, with several threads, one pool wake-up) per routed bit or per output channel.

Every floating-point sum is taken in the order the torch expressions they replace took it, so the losses
stay bit for bit what they were (`tests/unit/test_reference_losses.py`; the orders are tested against
autograd in `tests/unit/test_lbpnet.py`). Parallel over the batch only: no sum crosses samples, so the
thread count does not change a result. Arrays are float32 and flat per sample: (B, planes·pixels).
The LBP loops read the unpadded input through indices clamped to its edges (what replication padding
copies there), so no padded copy of the input is made.
"""
from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
import torch
from numba import prange

_jit = numba.njit(cache=True, parallel=True)


@_jit
def _compare(x, sample, centre, d, bits):
    """d[b, t] = x[b, sample[t]] - x[b, centre[t]] and bits = 1[d > 0]: the LBP comparisons."""
    for b in prange(x.shape[0]):
        src = x[b]
        for t in range(len(sample)):
            d[b, t] = src[sample[t]] - src[centre[t]]
            bits[b, t] = 1.0 if d[b, t] > 0 else 0.0


@_jit
def _fuse(bits, routes, pixels, values, gates, count, out, nonzero):
    """count[b, o] = Σ_j bits[b, routes[o, j]] (exact: 0/1 bits, small integers, added as bytes);
    out = values[count]·gates[o]; nonzero[b, o]: how many of out[b, o]'s pixels are not 0."""
    for b in prange(bits.shape[0]):
        planes = np.empty(bits.shape[1], dtype=np.uint8)
        for i in range(bits.shape[1]):
            planes[i] = np.uint8(bits[b, i])
        total = np.empty(pixels, dtype=np.uint8)
        for o in range(routes.shape[0]):
            total[:] = planes[routes[o, 0] * pixels:(routes[o, 0] + 1) * pixels]
            for j in range(1, routes.shape[1]):
                src = planes[routes[o, j] * pixels:(routes[o, j] + 1) * pixels]
                for n in range(pixels):
                    total[n] += src[n]
            count[b, o * pixels:(o + 1) * pixels] = total
            dst = out[b, o * pixels:(o + 1) * pixels]
            gate = gates[o]
            set_pixels = 0
            for n in range(pixels):
                dst[n] = values[total[n]] * gate
                set_pixels += np.int64(dst[n] != 0)
            nonzero[b, o] = set_pixels


@_jit
def _fuse_backward(grad, count, values, slopes, scale, gates, pointers, sources, k, pixels, planes, out, gate_terms):
    """The gradients of `_fuse`: gate_terms = grad·values[count] (the gates' gradient before torch sums it);
    each count's gradient ((grad·gate)·slopes[count])·scale (the gate's, then the activation's backward),
    summed onto the bits as autograd summed `Σ_j bits.index_select(1, routes[:, j])`: each route column j
    an index_add (from zero, outputs in ascending order: `sources[pointers[j·planes + p]:...]` lists the
    outputs that column j routes to plane p), the columns accumulated last column first."""
    outputs = len(gates)
    for b in prange(grad.shape[0]):
        g = np.empty(grad.shape[1], dtype=np.float32)
        for o in range(outputs):
            gate, span = gates[o], slice(o * pixels, (o + 1) * pixels)
            grads, counts, terms, gs = grad[b, span], count[b, span], gate_terms[b, span], g[span]
            for n in range(pixels):
                c = np.int32(counts[n])
                terms[n] = grads[n] * values[c]
                gs[n] = grads[n] * gate * slopes[c] * scale
        column = np.empty(pixels, dtype=np.float32)
        for p in range(planes):
            dst = out[b, p * pixels:(p + 1) * pixels]
            for j in range(k - 1, -1, -1):
                first, last = pointers[j * planes + p], pointers[j * planes + p + 1]
                if first == last:
                    column[:] = 0
                else:  # 0 + g: the index_add's zeros, so a -0 becomes +0 as it did there
                    src = g[sources[first] * pixels:(sources[first] + 1) * pixels]
                    for n in range(pixels):
                        column[n] = src[n] + np.float32(0)
                    for i in range(first + 1, last):
                        src = g[sources[i] * pixels:(sources[i] + 1) * pixels]
                        for n in range(pixels):
                            column[n] += src[n]
                if j == k - 1:
                    dst[:] = column
                else:
                    for n in range(pixels):
                        dst[n] += column[n]


@_jit
def _compare_backward(grad, zt, tanh, half_scale, d, x, below, above, right, left, scale_terms, dy_terms, dx_terms,
                      wants_x, slot_sample, slot_centre, slot_channels, height, width, pad, grad_x):
    """The elementwise terms of `_LBPCompare.operators`, each product in its order there: slope = 1 - t·t
    (t = tanh(z), torch's) or 1[|z| <= 1]; g = (grad·slope)·(scale/2); ((grad·slope)·d)/2; g·dy and g·dx
    with dy, dx the central differences (a - b)/2 at the sampling point (`below`... index its neighbours).
    With `wants_x`, x's gradient: each g[t] added at its sampling point and subtracted at its centre of the
    padded planes (only the sampled channels' planes: `slot_*` index a scratch of those), in index_add's
    order, then the padding folded back onto the edges in replication_pad2d_backward's order."""
    one, two = np.float32(1), np.float32(2)
    hp, wp = height + 2 * pad, width + 2 * pad
    for b in prange(grad.shape[0]):
        src = x[b]
        g = np.empty(len(below), dtype=np.float32)
        for t in range(len(below)):
            if tanh:
                slope = one - zt[b, t] * zt[b, t]
            else:
                slope = one if abs(zt[b, t]) <= one else np.float32(0)
            gs = grad[b, t] * slope
            g[t] = gs * half_scale
            scale_terms[b, t] = gs * d[b, t] / two
            dy_terms[b, t] = g[t] * ((src[below[t]] - src[above[t]]) / two)
            dx_terms[b, t] = g[t] * ((src[right[t]] - src[left[t]]) / two)
        if not wants_x:
            continue
        padded = np.zeros(len(slot_channels) * hp * wp, dtype=np.float32)
        for t in range(len(g)):
            padded[slot_sample[t]] += g[t]
        for t in range(len(g)):
            padded[slot_centre[t]] += -g[t]
        out = grad_x[b]
        out[:] = 0
        for s in range(len(slot_channels)):
            base = slot_channels[s] * height * width
            for y in range(hp):
                row = base + min(max(y - pad, 0), height - 1) * width
                for i in range(wp):
                    out[row + min(max(i - pad, 0), width - 1)] += padded[(s * hp + y) * wp + i]


@_jit
def _residual(y, x, pool, out):
    """out = avg_pool(y + x's channels repeated to y's, pool) (pool 1: the sum), as torch's 2-D average pool
    sums a window: from zero, row by row, then divides by its size. Maps (B, channels, H, W)."""
    channels = x.shape[1]
    size = np.float32(pool * pool)
    for b in prange(y.shape[0]):
        for o in range(y.shape[1]):
            c = o % channels
            if pool == 1:
                for iy in range(out.shape[2]):
                    for ix in range(out.shape[3]):
                        out[b, o, iy, ix] = y[b, o, iy, ix] + x[b, c, iy, ix]
                continue
            for oy in range(out.shape[2]):
                for ox in range(out.shape[3]):
                    total = np.float32(0)
                    for iy in range(oy * pool, oy * pool + pool):
                        for ix in range(ox * pool, ox * pool + pool):
                            total += y[b, o, iy, ix] + x[b, c, iy, ix]
                    out[b, o, oy, ox] = total / size


@_jit
def _residual_table(count, table, x, pool, out):
    """`_residual` of y[b, o] = table[o, count[b, o]]: the block's BN output read from its count."""
    channels = x.shape[1]
    size = np.float32(pool * pool)
    for b in prange(count.shape[0]):
        for o in range(count.shape[1]):
            c, row = o % channels, table[o]
            for oy in range(out.shape[2]):
                orow = out[b, o, oy]
                if pool == 1:
                    counts, xs = count[b, o, oy], x[b, c, oy]
                    for ox in range(out.shape[3]):
                        orow[ox] = row[np.int32(counts[ox])] + xs[ox]
                elif pool == 2:  # the 2x2 window spelled out (same order): rows as slices
                    c0, c1, x0, x1 = count[b, o, 2 * oy], count[b, o, 2 * oy + 1], x[b, c, 2 * oy], x[b, c, 2 * oy + 1]
                    for ox in range(out.shape[3]):
                        i = 2 * ox
                        total = np.float32(0)
                        total += row[np.int32(c0[i])] + x0[i]
                        total += row[np.int32(c0[i + 1])] + x0[i + 1]
                        total += row[np.int32(c1[i])] + x1[i]
                        total += row[np.int32(c1[i + 1])] + x1[i + 1]
                        orow[ox] = total / size
                else:
                    for ox in range(out.shape[3]):
                        total = np.float32(0)
                        for iy in range(oy * pool, oy * pool + pool):
                            for ix in range(ox * pool, ox * pool + pool):
                                total += row[np.int32(count[b, o, iy, ix])] + x[b, c, iy, ix]
                        orow[ox] = total / size


@numba.njit(cache=True)
def _square_sum(count, o, squares):
    """Σ squares[count[b, o, i]] over (b, i) in that order, each float32 term added to a float64 sum: how
    torch's BatchNorm sums a channel's squared deviations."""
    total = np.float64(0)
    for b in range(count.shape[0]):
        for i in range(count.shape[2]):
            total += np.float64(squares[count[b, o, i]])
    return total


@_jit
def _residual_backward(grad, pool, grad_y, grad_x):
    """The gradients of `_residual`: grad_y = grad / pool² spread over each window (zero outside every
    window), grad_x = Σ over the repeats of grad_y's channels, first repeat first (index_add's order);
    zero on channels no output repeats."""
    channels, outputs = grad_x.shape[1], grad_y.shape[1]
    size = np.float32(pool * pool)
    covered_y, covered_x = grad.shape[2] * pool, grad.shape[3] * pool
    for b in prange(grad.shape[0]):
        if pool > 1:
            for o in range(outputs):
                grad_y[b, o, covered_y:, :] = 0
                grad_y[b, o, :, covered_x:] = 0
                for oy in range(grad.shape[2]):
                    grads = grad[b, o, oy]
                    for iy in range(oy * pool, oy * pool + pool):
                        dst = grad_y[b, o, iy]
                        for ox in range(grad.shape[3]):
                            share = grads[ox] / size
                            for ix in range(ox * pool, ox * pool + pool):
                                dst[ix] = share
        for c in range(channels):
            if c < outputs:
                grad_x[b, c] = grad_y[b, c]
            else:
                grad_x[b, c] = 0
        for o in range(channels, outputs):
            for iy in range(grad_x.shape[2]):
                dst, src = grad_x[b, o % channels, iy], grad_y[b, o, iy]
                for ix in range(grad_x.shape[3]):
                    dst[ix] += src[ix]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _run(kernel, *args) -> None:
    """`kernel(*args)` on as many threads as torch's pool (one when pinned). numba's OpenMP layer sets the
    calling thread's OpenMP thread count to its own pool's on first use, which would change torch's (and
    with it the order of torch's parallel sums): torch's count is put back after the call."""
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        kernel(*args)
    finally:
        torch.set_num_threads(threads)


def unpadded(index: np.ndarray, height: int, width: int, pad: int) -> np.ndarray:
    """Flat indices into planes padded by `pad` on each side -> the indices into the unpadded planes that
    replication padding copied them from (clamped to the edges)."""
    hp, wp = height + 2 * pad, width + 2 * pad
    channel, rest = np.divmod(index, hp * wp)
    row, col = np.divmod(rest, wp)
    return channel * (height * width) + np.clip(row - pad, 0, height - 1) * width + np.clip(col - pad, 0, width - 1)


def compare(x: torch.Tensor, sample: torch.Tensor, centre: torch.Tensor, pad: int) -> tuple[torch.Tensor, ...]:
    """(d, bits), each (B, len(sample)): differences xp[:, sample] - xp[:, centre] and 1[d > 0], xp being x
    (B, C, H, W) replication-padded by `pad` and flattened (indices into it), read from x itself."""
    b, _, h, w = x.shape
    d, bits = torch.empty(b, len(sample)), torch.empty(b, len(sample))
    _run(_compare, _numpy(x).reshape(b, -1), unpadded(_numpy(sample), h, w, pad), unpadded(_numpy(centre), h, w, pad),
         d.numpy(), bits.numpy())
    return d, bits


def compare_backward(grad, zt, tanh: bool, half_scale: float, d, x, sample, centre, pad: int,
                     wants_x: bool) -> tuple[torch.Tensor | None, ...]:
    """(x's gradient (like x, None unless `wants_x`), scale terms, dy terms, dx terms (each like d)): see
    `_compare_backward`; `sample`, `centre` index x padded by `pad` as in `compare`."""
    b, c, h, w = x.shape
    wp, plane = w + 2 * pad, (h + 2 * pad) * (w + 2 * pad)
    s, ctr = _numpy(sample), _numpy(centre)
    near = [unpadded(s + step, h, w, pad) for step in (wp, -wp, 1, -1)]
    channels = np.unique(s // plane)  # the sampled channels, in order: each gets a padded scratch plane
    slot = np.zeros(c, dtype=np.int64)
    slot[channels] = np.arange(len(channels))
    slot_sample, slot_centre = slot[s // plane] * plane + s % plane, slot[ctr // plane] * plane + ctr % plane
    terms = [torch.empty(d.shape) for _ in range(3)]
    grad_x = torch.empty(x.shape) if wants_x else torch.empty(1, 1)
    _run(_compare_backward, _numpy(grad), _numpy(zt), tanh, np.float32(half_scale), _numpy(d),
         _numpy(x).reshape(b, -1), *near, *(t.numpy() for t in terms), wants_x, slot_sample, slot_centre, channels,
         h, w, pad, grad_x.numpy().reshape(len(grad_x), -1))
    return (grad_x if wants_x else None, *terms)


def fuse(bits: torch.Tensor, routes: torch.Tensor, values: torch.Tensor,
         gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values[count]·gates[o], count, nonzero) of the counts Σ_j bits[:, routes[o, j]], (B, O, H, W), count as
    uint8; nonzero: per output channel, how many of its values are not 0."""
    b, _, h, w = bits.shape
    out = torch.empty(b, len(routes), h, w)
    count = torch.empty(b, len(routes), h, w, dtype=torch.uint8)
    nonzero = np.empty((b, len(routes)), dtype=np.int64)
    _run(_fuse, _numpy(bits).reshape(b, -1), _numpy(routes), h * w, _numpy(values), _numpy(gates),
         count.numpy().reshape(b, -1), out.numpy().reshape(b, -1), nonzero)
    return out, count, torch.from_numpy(nonzero.sum(0))


def fuse_backward(grad, count, values, slopes, scale: float, gates, routes, planes: int) -> tuple[torch.Tensor, ...]:
    """(the bits' gradient (B, planes, H, W), the gates' terms grad·values[count] (B, O, H, W)) of `fuse`."""
    b, _, h, w = grad.shape
    routes = _numpy(routes)
    k = routes.shape[1]
    keys = (np.arange(k) * planes + routes).T.ravel()  # (column j, plane p) of each route, column by column
    sources = np.argsort(keys, kind="stable") % len(routes)  # outputs by (j, p), ascending within each
    pointers = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=k * planes))])
    out, gate_terms = torch.empty(b, planes, h, w), torch.empty(grad.shape)
    _run(_fuse_backward, _numpy(grad).reshape(b, -1), _numpy(count).reshape(b, -1), _numpy(values), _numpy(slopes),
         np.float32(scale), _numpy(gates), pointers, sources, k, h * w, planes, out.numpy().reshape(b, -1),
         gate_terms.numpy().reshape(b, -1))
    return out, gate_terms


def residual(y: torch.Tensor, x: torch.Tensor, pool: int) -> torch.Tensor:
    """avg_pool2d(y + x's channels repeated to y's, pool) (pool 1: no pooling), (B, O, H // pool, W // pool)."""
    b, o, h, w = y.shape
    out = torch.empty(b, o, h // pool, w // pool)
    _run(_residual, _numpy(y), _numpy(x), pool, out.numpy())
    return out


def residual_table(count: torch.Tensor, table: np.ndarray, x: torch.Tensor, pool: int) -> torch.Tensor:
    """`residual` of the maps table[o, count[:, o]] (count uint8 (B, O, H, W), table float32 (O, k + 1))."""
    b, o, h, w = count.shape
    out = torch.empty(b, o, h // pool, w // pool)
    _run(_residual_table, _numpy(count), table, _numpy(x), pool, out.numpy())
    return out


def square_sum(count: torch.Tensor, o: int, squares: np.ndarray) -> float:
    """Σ squares[count[:, o]] in torch's BatchNorm order (float64 sum of float32 terms, sample by sample)."""
    return _square_sum(_numpy(count).reshape(count.shape[0], count.shape[1], -1), o, squares)


def residual_backward(grad: torch.Tensor, pool: int, y_shape, x_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y, grad_x) of `residual` (without pooling grad_y is grad itself)."""
    grad = grad.detach().contiguous()
    grad_y, grad_x = grad if pool == 1 else torch.empty(y_shape), torch.empty(x_shape)
    _run(_residual_backward, grad.numpy(), pool, grad_y.numpy(), grad_x.numpy())
    return grad_y, grad_x


_enabled = True


def applies(t: torch.Tensor) -> bool:
    """The kernels serve float32 CPU tensors in eager mode; others (CUDA, half precision, a TorchScript
    trace, which cannot record a numba call) keep torch's operators."""
    return _enabled and t.device.type == "cpu" and t.dtype == torch.float32 and not torch.jit.is_tracing()


@contextmanager
def torch_operators():
    """Inside: every layer takes torch's operators, as before the kernels (the same numbers, slower).
    Benchmarks measure against that path too (bench/binary_inference.py)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved
