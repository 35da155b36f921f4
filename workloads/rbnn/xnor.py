"""XNOR-popcount convolution on packed sign bits, and the exact float convolution of the first layer.

Signs are packed along channels, 8 to a byte (bit set = negative), a pixel's channels in ceil(C/8) bytes.
A k x k patch is its k·k pixels' bytes side by side, zero-padded to whole 64-bit words, so for ±1 values

    Σ_i a_i·w_i = K − 2·popcount(a XOR w)        (K = C_in·k·k; pad bits are 0 in both, XOR to 0)

The sum is exact, an integer. Positions outside the map read as +1 (bit 0) and are taken back out:
`conv_signs` subtracts Σ w over them per output position (a border map computed once per shape), and
over any input exactly 0 (sign 0 in torch: rare, but exact in both) from a small float pass.

Kernels are numba-compiled loops (`bench/binary_conv_kernels.py` measured numpy's vectorised
`np.bitwise_count`, numba and a C extension on one 3x3 64->64 convolution): numba compiles to the CPU's
popcount (AVX-512 VPOPCNTDQ where there is one) from a wheel, with no compiler on the user's machine.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange
from numba.core import types
from numba.extending import intrinsic

PARALLEL_WORK = 1 << 20  # operations below which one thread beats waking the pool (batch 1 stays serial)


@intrinsic
def _popcount(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once, as the CPU's fused multiply-add (oneDNN's convolutions use it)."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@numba.njit(cache=True, inline="always")
def _popcounts(src, weights_t, k, stride, b, y, x0, n, acc):
    """acc[i, o] = Σ popcount(window word XOR weight word) for the n <= 4 positions x0 + i of output row y,
    the window being the k x k pixels of src (B, Hs, Ws, words) at (y·s, x·s), each pixel's words in turn.
    Four positions at a time: each weight word loaded serves four XORs (2.2-2.5x over one at a time)."""
    words, outputs = src.shape[3], weights_t.shape[1]
    acc[:] = 0
    for t in range(k * k):
        ty, tx = y * stride + t // k, t % k
        for w in range(words):
            wrow = weights_t[t * words + w]
            if n == 4:
                a0, a1 = src[b, ty, x0 * stride + tx, w], src[b, ty, (x0 + 1) * stride + tx, w]
                a2, a3 = src[b, ty, (x0 + 2) * stride + tx, w], src[b, ty, (x0 + 3) * stride + tx, w]
                for j in range(outputs):  # vectorised over output channels
                    wj = wrow[j]
                    acc[0, j] += _popcount(a0 ^ wj)
                    acc[1, j] += _popcount(a1 ^ wj)
                    acc[2, j] += _popcount(a2 ^ wj)
                    acc[3, j] += _popcount(a3 ^ wj)
            else:  # a row's last positions
                for i in range(n):
                    a = src[b, ty, (x0 + i) * stride + tx, w]
                    for j in range(outputs):
                        acc[i, j] += _popcount(a ^ wrow[j])


def _xnor_conv(src, weights_t, k, stride, fan_in, border, out):
    """out[b, y, x, o] = fan_in − 2·Σ popcount(window word XOR weight word) − border[y, x, o]."""
    batch, height, width, outputs = out.shape
    for row in prange(batch * height):
        b, y = row // height, row % height
        acc = np.empty((4, outputs), np.uint64)
        for x0 in range(0, width, 4):
            n = min(4, width - x0)
            _popcounts(src, weights_t, k, stride, b, y, x0, n, acc)
            for i in range(n):
                for j in range(outputs):
                    out[b, y, x0 + i, j] = fan_in - 2 * np.int32(acc[i, j]) - border[y, x0 + i, j]


def _xnor_conv_signs(src, weights_t, k, stride, fan_in, border, t1, t2, increasing, packed, zeros):
    """`_xnor_conv`'s sums thresholded and packed as `_pack_thresholds` does, without writing the sums out;
    zeros[b, y]: how many of output row y's signs are exactly 0."""
    batch, height, width, nbytes = packed.shape
    outputs = weights_t.shape[1]
    for row in prange(batch * height):
        b, y = row // height, row % height
        acc = np.empty((4, outputs), np.uint64)
        found = 0
        for x0 in range(0, width, 4):
            n = min(4, width - x0)
            _popcounts(src, weights_t, k, stride, b, y, x0, n, acc)
            for i in range(n):
                for j in range(nbytes):
                    bits = 0
                    for bit in range(min(8, outputs - 8 * j)):
                        c = 8 * j + bit
                        d = fan_in - 2 * np.int32(acc[i, c]) - border[y, x0 + i, c]
                        negative = d < t1[c] if increasing[c] else d >= t2[c]
                        bits |= (1 if negative else 0) << bit
                        found += 1 if t1[c] <= d < t2[c] else 0
                    packed[b, y, x0 + i, j] = bits
        zeros[b, y] = found


def _pack_negative(x, out):
    """out[i, j] = bit b set where x[i, 8j + b] < 0 (little bit order); returns how many x are exactly 0."""
    rows, channels = x.shape
    zeros = 0
    for i in prange(rows):
        for j in range(out.shape[1]):
            bits = 0
            for b in range(min(8, channels - 8 * j)):
                v = x[i, 8 * j + b]
                bits |= (1 if v < 0 else 0) << b
                zeros += 1 if v == 0 else 0
            out[i, j] = bits
    return zeros


def _pack_thresholds(dots, t1, t2, increasing, out):
    """The signs of BN(fl(d·s)) from integer sums d, packed as `_pack_negative` packs: per channel c, negative
    where d < t1 (BN increasing in d) or d >= t2 (decreasing), 0 where t1 <= d < t2. Returns the zeros' count."""
    rows, channels = dots.shape
    zeros = 0
    for i in prange(rows):
        for j in range(out.shape[1]):
            bits = 0
            for b in range(min(8, channels - 8 * j)):
                c, d = 8 * j + b, dots[i, 8 * j + b]
                negative = d < t1[c] if increasing[c] else d >= t2[c]
                bits |= (1 if negative else 0) << b
                zeros += 1 if t1[c] <= d < t2[c] else 0
            out[i, j] = bits
    return zeros


def _affine(x, scale, shift, out):
    """out = fma(x, a, b) per channel (the last axis): eval-mode BN as torch's CPU kernel rounds it."""
    n, channels = x.shape
    for i in prange(n):
        for c in range(channels):
            out[i, c] = _fma(x[i, c], scale[c], shift[c])


def _scale_bn(dots, scale, bn_scale, bn_shift, out):
    """out = fma(fl(d·s), a, b) per channel (the last axis): the conv's scale, then BN as torch rounds it."""
    n, channels = dots.shape
    for i in prange(n):
        for c in range(channels):
            out[i, c] = _fma(np.float32(dots[i, c]) * scale[c], bn_scale[c], bn_shift[c])


def _residual_epilogue(dots, scale, bn_scale, bn_shift, shortcut, clip, out, packed):
    """out = fma(fl(d·s), a, b) + shortcut, then clipped to [-1, 1] with `clip` (scale_bn, add and hardtanh,
    each rounded as before), and its signs packed as `_pack_negative` packs them, in one pass. Returns the
    count of exact zeros."""
    rows, channels = dots.shape
    zeros = 0
    for i in prange(rows):
        for j in range(packed.shape[1]):
            bits = 0
            for b in range(min(8, channels - 8 * j)):
                c = 8 * j + b
                v = _fma(np.float32(dots[i, c]) * scale[c], bn_scale[c], bn_shift[c]) + shortcut[i, c]
                if clip:
                    v = min(max(v, np.float32(-1)), np.float32(1))
                out[i, c] = v
                bits |= (1 if v < 0 else 0) << b
                zeros += 1 if v == 0 else 0
            packed[i, j] = bits
    return zeros


def _conv_fma(x, w, stride, out):
    """out[b, y, x, o] = Σ over (ky, kx, c) in that order of fma(w[ky, kx, c, o], x[b, y·s+ky, x·s+kx, c], ·)."""
    batch, height, width, outputs = out.shape
    kh, kw, channels = w.shape[:3]
    for b in prange(batch):
        for y in range(height):
            for xx in range(width):
                acc = out[b, y, xx]
                acc[:] = 0
                for ky in range(kh):
                    for kx in range(kw):
                        for c in range(channels):
                            v = x[b, y * stride + ky, xx * stride + kx, c]
                            for o in range(outputs):
                                acc[o] = _fma(w[ky, kx, c, o], v, acc[o])


_KERNELS = {f.__name__[1:]: (numba.njit(cache=True)(f), numba.njit(cache=True, parallel=True)(f))
            for f in (_xnor_conv, _xnor_conv_signs, _conv_fma, _pack_negative, _pack_thresholds, _affine, _scale_bn,
                      _residual_epilogue)}


def _run(name: str, work: int, *args):
    serial, parallel = _KERNELS[name]
    return (parallel if work >= PARALLEL_WORK else serial)(*args)


def scale_bn(dots: np.ndarray, scale: np.ndarray, bn_scale: np.ndarray, bn_shift: np.ndarray) -> np.ndarray:
    """BN(fl(d·s)) of integer sums (…, C) as torch computes it: a float32 product, then one fused multiply-add."""
    return _per_channel("scale_bn", dots, scale, bn_scale, bn_shift)


def residual_epilogue(dots: np.ndarray, scale: np.ndarray, bn_scale: np.ndarray, bn_shift: np.ndarray,
                      shortcut: np.ndarray, clip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A residual block's end in one pass: (BN(fl(d·s)) + shortcut, hardtanh'd with `clip`; its packed
    signs; where it is exactly 0 or None), each float operation rounded as `scale_bn`, `+` and `np.clip` round."""
    flat = dots.reshape(-1, dots.shape[-1])
    out = np.empty(flat.shape, np.float32)
    packed = np.empty((len(flat), -(-flat.shape[1] // 8)), np.uint8)
    zeros = _run("residual_epilogue", out.size, flat, scale, bn_scale, bn_shift,
                 np.ascontiguousarray(shortcut, np.float32).reshape(flat.shape), clip, out, packed)
    out = out.reshape(dots.shape)
    return out, packed.reshape(*dots.shape[:-1], -1), (out == 0 if zeros else None)


def affine(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """x·scale + shift (…, C) rounded once, as torch's eval-mode BN."""
    return _per_channel("affine", np.ascontiguousarray(x, np.float32), scale, shift)


def _per_channel(kernel: str, x: np.ndarray, *params) -> np.ndarray:
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty(flat.shape, np.float32)
    _run(kernel, out.size, flat, *params, out)
    return out.reshape(x.shape)


def pack_signs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(bytes (B, H, W, ceil(C/8)) of the sign bits of x (B, H, W, C), where x == 0 or None), in one pass."""
    x = np.ascontiguousarray(x)
    packed = np.empty((*x.shape[:-1], -(-x.shape[-1] // 8)), np.uint8)
    zeros = _run("pack_negative", x.size, x.reshape(-1, x.shape[-1]), packed.reshape(-1, packed.shape[-1]))
    return packed, (x == 0 if zeros else None)


def pack_thresholds(dots: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                    increasing: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """`pack_signs` of a layer whose BN is taken as thresholds on its integer sums `dots` (B, H, W, C)."""
    dots = np.ascontiguousarray(dots)
    packed = np.empty((*dots.shape[:-1], -(-dots.shape[-1] // 8)), np.uint8)
    zeros = _run("pack_thresholds", dots.size, dots.reshape(-1, dots.shape[-1]), t1, t2, increasing,
                 packed.reshape(-1, packed.shape[-1]))
    return packed, ((dots >= t1) & (dots < t2) if zeros else None)


def pack_weights(signs: np.ndarray) -> np.ndarray:
    """(O, kh, kw, C) of ±1 -> (O, words) uint64 laid out as `_patches` lays out a patch."""
    packed = np.packbits(signs < 0, axis=-1, bitorder="little")
    return _words(packed.reshape(len(signs), -1))


def _words(rows: np.ndarray) -> np.ndarray:
    """(n, bytes) uint8 -> (n, words) uint64, zero-padded."""
    pad = -rows.shape[1] % 8
    return np.ascontiguousarray(np.pad(rows, ((0, 0), (0, pad))) if pad else rows).view(np.uint64)


def _patches(packed: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    """(B, H', W', words): each output position's window of a packed map as one row of words (the window's
    pixels' bytes side by side), positions outside the map as +1 (bit 0). One strided copy per tap, a pixel's
    bytes moved as one integer where they are 1, 2, 4 or 8."""
    b, h, w, nbytes = packed.shape
    padded = np.pad(packed, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else np.ascontiguousarray(packed)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.zeros((b, oh, ow, -(-k * k * nbytes // 8) * 8), np.uint8)
    taps = out[..., : k * k * nbytes].reshape(b, oh, ow, k * k, nbytes)
    if nbytes in (1, 2, 4, 8):
        unit = np.dtype(f"u{nbytes}")
        taps, padded = taps.view(unit), padded.view(unit)
    for t in range(k * k):
        ky, kx = divmod(t, k)
        taps[:, :, :, t] = padded[:, ky: ky + stride * (oh - 1) + 1: stride, kx: kx + stride * (ow - 1) + 1: stride]
    return out.view(np.uint64)


class BinaryConv:
    """A convolution of ±1 (or 0) activations with ±1 weights, packed (B, H, W, ceil(C/8)) bytes in,
    (B, H', W', O) int32 sums out. With C a multiple of 64 the kernel reads each window's words in place;
    otherwise the windows are first copied into rows of whole words (`_patches`), which packs small
    channel counts without padding every pixel to a word."""

    def __init__(self, weight_bits: np.ndarray, signs: np.ndarray, k: int, stride: int, pad: int,
                 zero_weights: np.ndarray | None = None):
        self.weights_t = np.ascontiguousarray(weight_bits.T)  # (words, O)
        self.signs = signs.astype(np.float32)  # (O, k, k, C) ±1 as packed (a 0 weight as +1): border, zeros
        # weights exactly 0 (sign 0: rare, but one in millions happens) as (o, ky, kx, c) rows
        self.zero_weights = np.zeros((0, 4), np.intp) if zero_weights is None else zero_weights.astype(np.intp)
        self.k, self.stride, self.pad = k, stride, pad
        self.fan_in = signs[0].size
        self.in_place = signs.shape[-1] % 64 == 0
        self._border: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, packed: np.ndarray, zeros: np.ndarray | None) -> np.ndarray:
        src, k, stride, shape = self._windows(packed)
        out = np.empty((*shape, self.weights_t.shape[1]), np.int32)
        _run("xnor_conv", out.size * self.weights_t.shape[0], src, self.weights_t, k, stride, self.fan_in,
             self.border(packed.shape[1:3]), out)
        if zeros is not None:  # only the images that have an exact zero
            images = np.flatnonzero(zeros.any((1, 2, 3)))
            out[images] -= self._over(zeros[images].astype(np.float32)).astype(np.int32)
        if len(self.zero_weights):
            out -= self._zero_weight_terms(packed, zeros, out.shape)
        return out

    def thresholded(self, packed: np.ndarray, zeros: np.ndarray | None, t1: np.ndarray, t2: np.ndarray,
              increasing: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`pack_thresholds(self(packed, zeros), t1, t2, increasing)`, in one kernel where no input or weight
        is exactly 0 and no sign comes out 0 (else through the sums)."""
        if zeros is None and not len(self.zero_weights):
            src, k, stride, shape = self._windows(packed)
            outputs = self.weights_t.shape[1]
            signs, zeros_per_row = np.empty((*shape, -(-outputs // 8)), np.uint8), np.empty(shape[:2], np.int64)
            _run("xnor_conv_signs", np.prod(shape) * outputs * self.weights_t.shape[0], src, self.weights_t, k, stride,
                 self.fan_in, self.border(packed.shape[1:3]), t1, t2, increasing, signs, zeros_per_row)
            if not zeros_per_row.any():
                return signs, None
        return pack_thresholds(self(packed, zeros), t1, t2, increasing)

    def _windows(self, packed: np.ndarray) -> tuple[np.ndarray, int, int, tuple[int, int, int]]:
        """(the kernel's source, its k and stride, the output's (B, H', W')): the padded map read in place,
        or its windows as rows of words."""
        b, h, w, _ = packed.shape
        k, stride, pad = self.k, self.stride, self.pad
        shape = (b, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)
        if self.in_place:
            return np.pad(packed, ((0, 0), (pad, pad), (pad, pad), (0, 0))).view(np.uint64), k, stride, shape
        return _patches(packed, k, stride, pad), 1, 1, shape

    def _zero_weight_terms(self, packed, zeros, shape) -> np.ndarray:
        """Σ a over each 0 weight's input (packed as +1, it added a; torch adds 0): a in {-1, 0, +1}, 0 outside."""
        o, ky, kx, c = self.zero_weights.T
        a = 1 - 2 * ((packed[..., c // 8] >> (c % 8).astype(np.uint8)) & 1).astype(np.int32)  # (B, H, W, n)
        if zeros is not None:
            a[zeros[..., c]] = 0
        a = np.pad(a, ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0)))
        b, oh, ow, outputs = shape
        rows = ky[None, :] + self.stride * np.arange(oh)[:, None]  # (H', n)
        cols = kx[None, :] + self.stride * np.arange(ow)[:, None]  # (W', n)
        taken = a[:, rows[:, None, :], cols[None, :, :], np.arange(len(c))]  # (B, H', W', n)
        return taken @ (o[:, None] == np.arange(outputs)).astype(np.int32)

    def border(self, size: tuple[int, int]) -> np.ndarray:
        """(H', W', O): Σ w over the window's positions outside the map, for each output position."""
        if size not in self._border:
            outside = np.pad(np.zeros((1, *size, self.signs.shape[-1]), np.float32),
                             ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0)), constant_values=1)
            self._border[size] = np.ascontiguousarray(self._over(outside, padded=True)[0].astype(np.int32))
        return self._border[size]

    def _over(self, indicator: np.ndarray, padded: bool = False) -> np.ndarray:
        """Σ w over the positions where `indicator` (B, H, W, C) is 1: a small float convolution (exact)."""
        if not padded and self.pad:
            indicator = np.pad(indicator, ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(indicator, (self.k, self.k), axis=(1, 2))
        windows = windows[:, :: self.stride, :: self.stride]  # (B, H', W', C, k, k)
        return np.einsum("bhwcyx,oyxc->bhwo", windows, self.signs, optimize=True)


def conv_fma(x: np.ndarray, weight: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Float convolution of (B, H, W, C) by weight (kh, kw, C, O), summed as oneDNN sums a small direct
    convolution: fused multiply-adds over (ky, kx, c) in that order — torch's float32 result, bit for bit."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
    k = weight.shape[0]
    oh, ow = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.empty((len(x), oh, ow, weight.shape[-1]), np.float32)
    _run("conv_fma", out.size * weight[..., 0].size, np.ascontiguousarray(x, np.float32),
         np.ascontiguousarray(weight, np.float32), stride, out)
    return out
