"""The residual block's BatchNorm2d (training mode) and shortcut on maps of 0s and 1s, from counts.

An RP output with the threshold activation and hard gates is 0 or 1, so BatchNorm's statistics follow
from how many ones each channel holds, and its output takes two values per channel. torch computes them
(aten/src/ATen/native/cpu/batch_norm_kernel.cpp, Normalization.cpp) as: mean = float(Σx / N), the sum in
float64; var_sum = Σ float((x - mean)²) in float64, sample by sample; invstd = float(1 / sqrt(float(var_sum
/ N) + eps)) in float64; alpha = invstd·w, beta = b - mean·alpha (one fused multiply-add where torch's
kernels are built for AVX2/AVX-512, two roundings in the portable `default` build); out = x·alpha + beta.
Here the sums are closed forms n₀·t₀ + n₁·t₁ where every partial sum is exact in float64 (then the
order torch added in cannot matter), else the sequential sum over the channel (`trainkernels.square_sum`).
The output is never materialised: the shortcut kernel reads each pixel's value from its count.

The first use in a process is checked against torch's own BatchNorm on the same batch (outputs, saved
statistics, running statistics); a mismatch (another torch, another build) turns this path off for the
process, and torch's operators run as before.
"""
from __future__ import annotations

import numpy as np
import torch

from workloads.lbpnet import trainkernels

_TRUSTED: bool | None = None  # None: not checked yet in this process


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a·b + c rounded once: the product is exact in float64; the float64 sum's rounding error
    (TwoSum) settles the one case where rounding that sum to float32 could go the wrong way, a float32
    halfway point."""
    p, c = a.astype(np.float64) * b.astype(np.float64), c.astype(np.float64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    f = s.astype(np.float32)
    other = np.nextafter(f, np.where(s > f, np.float32(np.inf), np.float32(-np.inf)))
    halfway = (err != 0) & (s != f) & (s == (f.astype(np.float64) + other.astype(np.float64)) / 2)
    return np.where(halfway, np.where(err > 0, np.maximum(f, other), np.minimum(f, other)), f)


def _exact(n0: np.ndarray, t0: np.ndarray, n1: np.ndarray, t1: np.ndarray, n: int) -> np.ndarray:
    """Whether every partial sum of n0 terms t0 and n1 terms t1 (float32) is exact in float64: multiples of
    the smaller ulp, below n·max(t) < 2^53 of them."""
    ulp = np.minimum(np.where(n0 > 0, np.spacing(t0), np.inf), np.where(n1 > 0, np.spacing(t1), np.inf))
    largest = np.maximum(np.where(n0 > 0, t0, 0), np.where(n1 > 0, t1, 0)).astype(np.float64)
    return (n0 == 0) | (n1 == 0) | (largest * n < ulp.astype(np.float64) * 2.0 ** 53)


def statistics(ones: np.ndarray, count: torch.Tensor, one_table: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """(mean, var_sum) per channel, float32, as torch's BatchNorm computes them for 0/1 maps with `ones`
    ones among `n` values per channel (one_table[o, c]: whether count c gives a 1 in channel o)."""
    mean = (ones.astype(np.float64) / n).astype(np.float32)
    t0 = mean * mean  # (0 - mean)², float32
    d1 = np.float32(1) - mean
    t1 = d1 * d1
    n0 = n - ones
    var = n0 * t0.astype(np.float64) + ones * t1.astype(np.float64)
    for o in np.flatnonzero(~_exact(n0, t0, ones, t1, n)):
        var[o] = trainkernels.square_sum(count, o, np.where(one_table[o], t1[o], t0[o]).astype(np.float32))
    return mean, var.astype(np.float32)


def _constants(bn, mean: np.ndarray, var_sum: np.ndarray, n: int):
    """(save_invstd, running_mean, running_var, (z0, z1) the outputs for 0 and 1) per channel."""
    invstd = (1.0 / np.sqrt((var_sum / np.float32(n)).astype(np.float64) + bn.eps)).astype(np.float32)
    m = np.float32(bn.momentum)
    running_mean = m * mean + (np.float32(1) - m) * bn.running_mean.numpy()
    unbiased = (var_sum / np.float32(n - 1)).astype(np.float64)
    running_var = (np.float64(m) * unbiased + ((np.float32(1) - m) * bn.running_var.numpy()).astype(np.float64))
    w, b = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    alpha = invstd * w
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        beta = b - mean * alpha
    else:
        beta = _fma32(-mean, alpha, b)
    z0 = np.float32(0) * alpha + beta
    return invstd, running_mean.astype(np.float32), running_var.astype(np.float32), (z0, alpha + beta)


def applies(bn, x: torch.Tensor) -> bool:
    """BatchNorm2d in training mode with running statistics at a fixed momentum, float32 CPU tensors."""
    return (_TRUSTED is not False and bn.training and bn.track_running_stats and bn.momentum is not None
            and bn.affine and trainkernels.applies(x) and not torch.is_autocast_enabled("cpu"))


def bn_residual(bn, counted, x: torch.Tensor, one_table: np.ndarray, pool: int) -> torch.Tensor | None:
    """`_residual(bn(y), x, pool)` of the 0/1 maps y (counted: (y, count, ones) of `RPFusion.counted`);
    updates bn's running statistics as its forward does. None when the first-use check fails."""
    global _TRUSTED
    y, count, ones = counted
    n = y.numel() // y.shape[1]
    mean, var_sum = statistics(ones.numpy(), count, one_table, n)
    invstd, running_mean, running_var, (z0, z1) = _constants(bn, mean, var_sum, n)
    if _TRUSTED is None:
        expected = [bn.running_mean.clone(), bn.running_var.clone()]
        out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            y.detach(), bn.weight.detach(), bn.bias.detach(), *expected, True, bn.momentum, bn.eps)
        table = torch.from_numpy(np.stack([z0, z1], 1))
        ours = table.gather(1, y.detach().long().transpose(0, 1).reshape(len(z0), -1)).view_as(out.transpose(0, 1))
        got = [ours.transpose(0, 1), torch.from_numpy(mean), torch.from_numpy(invstd),
               torch.from_numpy(running_mean), torch.from_numpy(running_var)]
        want = [out, save_mean, save_invstd, *expected]
        _TRUSTED = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got, want, strict=True))
        if not _TRUSTED:
            return None
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    bn.running_mean.copy_(torch.from_numpy(running_mean))
    bn.running_var.copy_(torch.from_numpy(running_var))
    table = np.where(one_table, z1[:, None], z0[:, None]).astype(np.float32)
    return _BNResidual.apply(y, x, bn.weight, bn.bias, count, table, torch.from_numpy(mean), torch.from_numpy(invstd),
                             pool, bn.eps)


class _BNResidual(torch.autograd.Function):
    """Forward: the shortcut kernel on the BN outputs read from the counts. Backward: the shortcut's, then
    torch's own BatchNorm backward with the saved statistics (as autograd would call it)."""

    @staticmethod
    def forward(ctx, y, x, weight, bias, count, table, mean, invstd, pool, eps):
        ctx.save_for_backward(y, weight, mean, invstd)
        ctx.pool, ctx.eps, ctx.x_shape = pool, eps, x.shape
        return trainkernels.residual_table(count, table, x, pool)

    @staticmethod
    def backward(ctx, grad):
        y, weight, mean, invstd = ctx.saved_tensors
        grad_z, grad_x = trainkernels.residual_backward(grad, ctx.pool, y.shape, ctx.x_shape)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        grad_y, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_z, y, weight, None, None, mean, invstd, True, ctx.eps, mask)
        return (grad_y, grad_x if ctx.needs_input_grad[1] else None, grad_w, grad_b,
                None, None, None, None, None, None)

