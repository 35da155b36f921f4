"""Training-time loops of the LBP layer and RP fusion, compiled with numba: one pass over a batch where
torch needs one operator (and, with several threads, one pool wake-up) per routed bit or per output channel.

Every floating-point sum is taken in the order the torch expressions they replace took it, so the losses
stay bit for bit what they were (`tests/unit/test_reference_losses.py`; the orders are tested against
autograd in `tests/unit/test_lbpnet.py`). Parallel over the batch only: no sum crosses samples, so the
thread count does not change a result. Arrays are float32 and flat per sample: (B, planes·pixels).
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

_jit = numba.njit(cache=True, parallel=True)


@_jit
def _compare(xp, sample, centre, d, bits):
    """d[b, t] = xp[b, sample[t]] - xp[b, centre[t]] and bits = 1[d > 0]: the LBP comparisons."""
    for b in prange(xp.shape[0]):
        src = xp[b]
        for t in range(len(sample)):
            d[b, t] = src[sample[t]] - src[centre[t]]
            bits[b, t] = 1.0 if d[b, t] > 0 else 0.0


@_jit
def _fuse(bits, routes, pixels, values, gates, count, out):
    """count[b, o] = Σ_j bits[b, routes[o, j]] (exact: 0/1 bits, small integers); out = values[count]·gates[o]."""
    for b in prange(bits.shape[0]):
        total = np.zeros(pixels, dtype=np.uint8)
        for o in range(routes.shape[0]):
            total[:] = 0
            for j in range(routes.shape[1]):
                src = bits[b, routes[o, j] * pixels:(routes[o, j] + 1) * pixels]
                for n in range(pixels):
                    total[n] += np.uint8(src[n])
            count[b, o * pixels:(o + 1) * pixels] = total
            dst = out[b, o * pixels:(o + 1) * pixels]
            for n in range(pixels):
                dst[n] = values[total[n]] * gates[o]


@_jit
def _fuse_backward(grad, count, values, slopes, scale, gates, routes, pixels, planes, out, gate_terms):
    """The gradients of `_fuse`: gate_terms = grad·values[count] (the gates' gradient before torch sums it);
    each count's gradient ((grad·gate)·slopes[count])·scale (the gate's, then the activation's backward),
    summed onto the bits as autograd summed `Σ_j bits.index_select(1, routes[:, j])`: each route column j
    an index_add (outputs in ascending order, from zero), the columns accumulated last column first."""
    k = routes.shape[1]
    for b in prange(grad.shape[0]):
        g = np.empty(grad.shape[1], dtype=np.float32)
        for o in range(routes.shape[0]):
            for n in range(o * pixels, (o + 1) * pixels):
                c = count[b, n]
                gate_terms[b, n] = grad[b, n] * values[c]
                g[n] = grad[b, n] * gates[o] * slopes[c] * scale
        column = np.empty(planes * pixels, dtype=np.float32)
        for j in range(k - 1, -1, -1):
            column[:] = 0
            for o in range(routes.shape[0]):
                src = g[o * pixels:(o + 1) * pixels]
                dst = column[routes[o, j] * pixels:(routes[o, j] + 1) * pixels]
                for n in range(pixels):
                    dst[n] += src[n]
            if j == k - 1:
                out[b, :] = column
            else:
                for n in range(planes * pixels):
                    out[b, n] += column[n]


@_jit
def _compare_backward(grad, zt, tanh, half_scale, d, xp, sample, wp, g, scale_terms, dy_terms, dx_terms):
    """The elementwise terms of `_LBPCompare.operators`, each product in its order there: slope = 1 - t·t
    (t = tanh(z), torch's) or 1[|z| <= 1]; g = (grad·slope)·(scale/2); ((grad·slope)·d)/2; g·dy and g·dx
    with dy, dx the central differences (a - b)/2 at the sampling point."""
    one, two = np.float32(1), np.float32(2)
    for b in prange(grad.shape[0]):
        src = xp[b]
        for t in range(len(sample)):
            if tanh:
                slope = one - zt[b, t] * zt[b, t]
            else:
                slope = one if abs(zt[b, t]) <= one else np.float32(0)
            gs = grad[b, t] * slope
            g[b, t] = gs * half_scale
            scale_terms[b, t] = gs * d[b, t] / two
            s = sample[t]
            dy_terms[b, t] = g[b, t] * ((src[s + wp] - src[s - wp]) / two)
            dx_terms[b, t] = g[b, t] * ((src[s + 1] - src[s - 1]) / two)


@_jit
def _scatter_unpad(grad, sample, centre, channels, height, width, pad, out):
    """x's gradient: each grad[b, t] added at sample[t] and subtracted at centre[t] of the padded plane, in
    index_add's order, then the padding folded back onto the edges in replication_pad2d_backward's order."""
    hp, wp = height + 2 * pad, width + 2 * pad
    for b in prange(grad.shape[0]):
        padded = np.zeros(channels * hp * wp, dtype=np.float32)
        g = grad[b]
        for t in range(len(sample)):
            padded[sample[t]] += g[t]
        for t in range(len(centre)):
            padded[centre[t]] += -g[t]
        for c in range(channels):
            for y in range(hp):
                iy = min(max(y - pad, 0), height - 1)
                for x in range(wp):
                    ix = min(max(x - pad, 0), width - 1)
                    out[b, (c * height + iy) * width + ix] += padded[(c * hp + y) * wp + x]


@_jit
def _residual(y, x, pool, out):
    """out = avg_pool(y + x's channels repeated to y's, pool) (pool 1: the sum), as torch's 2-D average pool
    sums a window: from zero, row by row, then divides by its size. Maps (B, channels, H, W)."""
    channels = x.shape[1]
    size = np.float32(pool * pool)
    for b in prange(y.shape[0]):
        for o in range(y.shape[1]):
            c = o % channels
            for oy in range(out.shape[2]):
                for ox in range(out.shape[3]):
                    if pool == 1:
                        out[b, o, oy, ox] = y[b, o, oy, ox] + x[b, c, oy, ox]
                        continue
                    total = np.float32(0)
                    for iy in range(oy * pool, oy * pool + pool):
                        for ix in range(ox * pool, ox * pool + pool):
                            total += y[b, o, iy, ix] + x[b, c, iy, ix]
                    out[b, o, oy, ox] = total / size


@_jit
def _residual_backward(grad, pool, grad_y, grad_x):
    """The gradients of `_residual`: grad_y = grad / pool² spread over each window (zero outside every
    window), grad_x = Σ over the repeats of grad_y's channels, first repeat first (index_add's order)."""
    channels, outputs = grad_x.shape[1], grad_y.shape[1]
    size = np.float32(pool * pool)
    for b in prange(grad.shape[0]):
        for o in range(outputs):
            for oy in range(grad.shape[2]):
                for ox in range(grad.shape[3]):
                    share = grad[b, o, oy, ox] if pool == 1 else grad[b, o, oy, ox] / size
                    for iy in range(oy * pool, oy * pool + pool):
                        for ix in range(ox * pool, ox * pool + pool):
                            grad_y[b, o, iy, ix] = share
        for c in range(min(channels, outputs)):
            grad_x[b, c] = grad_y[b, c]
        for o in range(channels, outputs):
            grad_x[b, o % channels] += grad_y[b, o]


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


def compare(xp: torch.Tensor, sample: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, bits), each (B, len(sample)): differences xp[:, sample] - xp[:, centre] and 1[d > 0]."""
    d, bits = torch.empty(len(xp), len(sample)), torch.empty(len(xp), len(sample))
    _run(_compare, _numpy(xp), _numpy(sample), _numpy(centre), d.numpy(), bits.numpy())
    return d, bits


def compare_backward(grad, zt, tanh: bool, half_scale: float, d, xp, sample, wp: int) -> tuple[torch.Tensor, ...]:
    """(g, scale terms, dy terms, dx terms), each like d: see `_compare_backward`."""
    terms = [torch.empty(d.shape) for _ in range(4)]
    _run(_compare_backward, _numpy(grad), _numpy(zt), tanh, np.float32(half_scale), _numpy(d), _numpy(xp),
         _numpy(sample), wp, *(t.numpy() for t in terms))
    return tuple(terms)


def scatter_unpad(grad: torch.Tensor, sample: torch.Tensor, centre: torch.Tensor, shape, pad: int) -> torch.Tensor:
    """The gradient (shape: B, C, H, W) of x through `compare` of its replication-padded planes."""
    b, c, h, w = shape
    out = torch.zeros(b, c * h * w)
    _run(_scatter_unpad, _numpy(grad), _numpy(sample), _numpy(centre), c, h, w, pad, out.numpy())
    return out.view(shape)


def fuse(bits: torch.Tensor, routes: torch.Tensor, values: torch.Tensor,
         gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values[count]·gates[o], count) of the counts Σ_j bits[:, routes[o, j]], (B, O, H, W), count as uint8."""
    b, _, h, w = bits.shape
    out = torch.empty(b, len(routes), h, w)
    count = torch.empty(b, len(routes), h, w, dtype=torch.uint8)
    _run(_fuse, _numpy(bits).reshape(b, -1), _numpy(routes), h * w, _numpy(values), _numpy(gates),
         count.numpy().reshape(b, -1), out.numpy().reshape(b, -1))
    return out, count


def fuse_backward(grad, count, values, slopes, scale: float, gates, routes, planes: int) -> tuple[torch.Tensor, ...]:
    """(the bits' gradient (B, planes, H, W), the gates' terms grad·values[count] (B, O, H, W)) of `fuse`."""
    b, _, h, w = grad.shape
    out, gate_terms = torch.empty(b, planes, h, w), torch.empty(grad.shape)
    _run(_fuse_backward, _numpy(grad).reshape(b, -1), _numpy(count).reshape(b, -1), _numpy(values), _numpy(slopes),
         np.float32(scale), _numpy(gates), _numpy(routes), h * w, planes, out.numpy().reshape(b, -1),
         gate_terms.numpy().reshape(b, -1))
    return out, gate_terms


def residual(y: torch.Tensor, x: torch.Tensor, pool: int) -> torch.Tensor:
    """avg_pool2d(y + x's channels repeated to y's, pool) (pool 1: no pooling), (B, O, H // pool, W // pool)."""
    b, o, h, w = y.shape
    out = torch.empty(b, o, h // pool, w // pool)
    _run(_residual, _numpy(y), _numpy(x), pool, out.numpy())
    return out


def residual_backward(grad: torch.Tensor, pool: int, y_shape, x_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y, grad_x) of `residual`."""
    grad_y, grad_x = torch.zeros(y_shape), torch.empty(x_shape)
    _run(_residual_backward, _numpy(grad), pool, grad_y.numpy(), grad_x.numpy())
    return grad_y, grad_x


def applies(t: torch.Tensor) -> bool:
    """The kernels serve float32 CPU tensors in eager mode; others (CUDA, half precision, a TorchScript
    trace, which cannot record a numba call) keep torch's operators."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and not torch.jit.is_tracing()
