"""Bit-packed inference of LBPNet — every block kind (`residual`, `macfree`) and fusion (RP, 1x1); the
exporter is `intexport.py`, the loops over pixels are numba kernels (`kernels.py`).

A batch is held as maps (channels, H, W, batch), batch last. One block:

  LBP comparisons at whole-pixel offsets (edges replicated) -> the U bits of each pixel packed into one
  integer code -> the distinct codes of the batch (a few dozen to a few thousand: digits are mostly flat)
  -> the fusion evaluated once per distinct code: RP is AND with each output's route mask and popcount,
  then threshold or shifted ReLU and the gates; 1x1 sums the weights of the set bits, then BN and ReLU
  -> a table (C_out, codes) that each pixel's code indexes.

Outputs are computed per channel and only where they are read (`Stage.values`): the next block reads at
most U channels; a residual network's global-average-pool head reads per-channel means, which average
pooling leaves linear: means of table entries weighted by code counts (`np.bincount`) plus the stream's.

Exactness. Counts and pixel codes are integers. Comparisons depend only on order within a channel, and
the loader's normalisation is strictly increasing, so MAC-free networks compare raw pixel codes and each
channel's ranks. Floats are computed as torch computes them: BN of a bit is one of the two values torch's
BN gives for 0 and 1 (read from it at export); a 1x1 fusion adds its weights in index order and applies BN
as one fused multiply-add, as oneDNN and torch do (checked at export on every code: `exact`); the shortcut
add is one IEEE addition; the 2x2 average adds row by row and divides by 4 as torch's CPU kernel; pixels
are normalised by the loader's own table. Only the float32 head (BLAS) rounds its own way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bitfleet import deploy
from workloads.lbpnet import kernels

MAX_BITS = 64  # one 64-bit code per pixel


def _bits(codes: np.ndarray, u: int) -> np.ndarray:
    """(u, len(codes)) uint8: bit i of each code."""
    return ((codes[None, :] >> np.arange(u, dtype=np.uint64)[:, None]) & np.uint64(1)).astype(np.uint8)


def _weight_sums(weight: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """(C_out, codes) float32: Σ_i weight[:, i]·bit_i, added in index order (oneDNN's order for a 1x1 conv)."""
    total = np.zeros((len(weight), bits.shape[1]), np.float32)
    for i in range(bits.shape[0]):  # one pass per input bit, over all channels and codes
        total += weight[:, i:i + 1] * bits[i]
    return total


# ----------------------------------------------------------------------------------------------- engine
class IntegerLBPNet:
    """An exported LBPNet; `logits(uint8 images (N, C, H, W))`, `predict(...)`. `source`: an engine file,
    or its arrays and the input table (`bitfleet.export.load_engine`)."""

    def __init__(self, source: str | Path | dict, input_lut: np.ndarray | None = None):
        if not isinstance(source, dict):
            _, source = deploy.load(source)
            input_lut = source.pop("input_lut")
        self.arrays, self.input_lut = source, input_lut.astype(np.float32)
        t = source
        self.blocks = [{k.split(".", 1)[1]: v[()] if v.ndim == 0 else v for k, v in t.items() if k.startswith(f"b{i}.")}
                       for i in range(int(t["num_blocks"]))]
        # MAC-free networks carry integers — pixel codes, and each channel's values as their ranks (counts
        # for RP) — since comparisons and max pools only look at order; residual networks carry float32
        if all(b["kind"] == "macfree" for b in self.blocks):
            self.dtype = np.dtype(np.uint8 if all(b["fusion"] == "rp" for b in self.blocks) else np.uint16)
        else:
            self.dtype = np.dtype(np.float32)

    def logits(self, images: np.ndarray) -> np.ndarray:
        maps = np.ascontiguousarray(np.asarray(images, np.uint8).transpose(1, 2, 3, 0))  # (C, H, W, B)
        stage = Input(maps, self.input_lut, self.dtype)
        for block in self.blocks:
            stage = _stage(block, stage)
        return self._head(stage)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).argmax(1)

    def _head(self, stage: Stage) -> np.ndarray:
        t = self.arrays
        if isinstance(stage, Residual) and str(t["head.pool"]) == "gap":  # linear all the way: from code counts
            features = stage.means(stage.height, stage.width).T.astype(np.float32)
        else:
            values = stage.all_values()
            if values.dtype != np.float32:  # ranks and pixel codes back to the values they stand for
                decoded = np.empty(values.shape, np.float32)
                flat = values.reshape(len(values), -1)
                kernels.lookup(values.size, stage.decoders(), flat, decoded.reshape(len(values), -1))
                values = decoded
            if str(t["head.pool"]) == "flatten":
                features = values.reshape(-1, values.shape[-1]).T  # torch's flatten: channel, row, column
            else:
                features = values.mean((1, 2), dtype=np.float64).T.astype(np.float32)
        h = features @ t["head.fc1.weight"].T + t["head.fc1.bias"]
        if "head.bn_scale" in t:
            h = h * t["head.bn_scale"] + t["head.bn_shift"]
        return np.maximum(h, 0) @ t["head.fc2.weight"].T + t["head.fc2.bias"]


# ----------------------------------------------------------------------------------------------- stages
class Stage:
    """The output map (C, H, W, B) of a block (or the input), computed where it is read: a few channels
    (`values`, each computed once) for the next block's comparisons, or all of them (`all_values`)."""

    channels: int
    height: int
    width: int

    def __init__(self):
        self._some: dict[int, np.ndarray] = {}
        self._all: np.ndarray | None = None

    def values(self, channels: np.ndarray) -> np.ndarray:
        if self._all is not None:
            return self._all[channels]
        todo = np.setdiff1d(channels, np.fromiter(self._some, int, len(self._some)))  # sorted
        if len(todo):
            computed = self._compute(todo)
            self._some.update(zip(todo.tolist(), computed))
            if np.array_equal(todo, channels):  # all new, in order: no copy
                return computed
        return np.stack([self._some[c] for c in channels.tolist()])

    def all_values(self) -> np.ndarray:
        if self._all is None:
            self._all, self._some = self._compute(np.arange(self.channels)), {}
        return self._all

    def read(self, channels: np.ndarray) -> np.ndarray:
        """`values`, or `all_values` (a selection of it) when every channel is read anyway."""
        if np.array_equal(channels, np.arange(self.channels)):
            return self.all_values()
        return self.all_values()[channels] if len(np.unique(channels)) == self.channels else self.values(channels)

    def parts(self) -> list[np.ndarray]:
        """Arrays whose concatenation is `all_values` (a MAC-free block need not copy its input)."""
        return [self.all_values()]

    def _compute(self, channels: np.ndarray) -> np.ndarray:
        """(len, H, W, B) of the sorted, distinct `channels`."""
        raise NotImplementedError


class Input(Stage):
    def __init__(self, codes: np.ndarray, lut: np.ndarray, dtype: np.dtype):
        super().__init__()
        self.codes, self.lut, self.dtype = codes, lut, dtype
        self.channels, self.height, self.width = codes.shape[:3]

    def _compute(self, channels):
        codes = self.codes[channels]
        if self.dtype != np.float32:  # order is all comparisons and max pools need: raw codes
            return codes.astype(self.dtype, copy=False)
        out = np.empty(codes.shape, np.float32)
        flat = codes.reshape(len(codes), -1)
        kernels.lookup(flat.size, np.ascontiguousarray(self.lut[channels]), flat, out.reshape(len(out), -1))
        return out

    def decoders(self) -> np.ndarray:
        return self.lut

    def means(self, h: int, w: int) -> np.ndarray:
        return self.all_values()[:, :h, :w].mean((1, 2), dtype=np.float64)


class Block(Stage):
    """A block's output: its fusion table indexed by each pixel's code, joined with its input."""

    def __init__(self, table: np.ndarray, inverse: np.ndarray, previous: Stage, downsample: bool):
        super().__init__()
        self.table, self.inverse, self.previous, self.downsample = table, inverse, previous, downsample
        self.height, self.width = (previous.height // 2, previous.width // 2) if downsample else (
            previous.height, previous.width)

    def _fused(self, channels: np.ndarray) -> np.ndarray:
        """(len, H, W, B): each pixel's fusion value from its code's column of the table."""
        out = np.empty((len(channels), *self.inverse.shape), self.table.dtype)
        table = np.ascontiguousarray(self.table[channels])
        kernels.gather(out.size, table, self.inverse.ravel(), out.reshape(len(out), -1))
        return out


class Residual(Block):
    """out = BN(fusion) + tile(x): input channel c % C_in added to output channel c; 2x2 average pool."""

    def __init__(self, *args):
        super().__init__(*args)
        self.channels = len(self.table)

    def _compute(self, channels):
        out = self._fused(channels)
        out += self.previous.read(channels % self.previous.channels)
        return avg_pool(out) if self.downsample else out

    def means(self, h: int, w: int) -> np.ndarray:
        """(C, B) float64 means over the top-left h x w of the output map: what global average pooling of a
        map pooled down from this one averages; average pooling keeps it a sum of the inputs' means."""
        h, w = (2 * h, 2 * w) if self.downsample else (h, w)  # the region this map's pool averaged
        inverse = self.inverse[:h, :w]
        batch = inverse.shape[-1]
        keys = inverse.astype(np.intp) * batch + np.arange(batch)
        counts = np.bincount(keys.ravel(), minlength=len(self.table[0]) * batch)
        fused = self.table.astype(np.float64) @ counts.reshape(-1, batch) / (h * w)
        return fused + self.previous.means(h, w)[np.arange(self.channels) % self.previous.channels]


class MacFree(Block):
    """out = concat(x, fusion): the input's channels first; 2x2 max pool. The table holds each channel's
    values as their ranks (`decode` turns them back)."""

    def __init__(self, table: np.ndarray, *args, dtype: np.dtype):
        ranks, self.decode = _ranks(table)
        super().__init__(ranks.astype(dtype), *args)
        self.channels = self.previous.channels + len(self.table)

    def _compute(self, channels):
        k = self.previous.channels
        n = int((channels < k).sum())  # sorted: the input's channels come first
        passed = self.previous.parts() if n == k else [self.previous.read(channels[:n])] if n else []
        if not self.downsample:
            parts = passed + ([self._fused(channels[n:] - k)] if n < len(channels) else [])
            return np.concatenate(parts) if len(parts) > 1 else parts[0]
        out = np.empty((len(channels), self.height, self.width, self.inverse.shape[-1]), self.table.dtype)
        bounds = np.cumsum([0] + [len(p) for p in passed])
        for part, i, j in zip(passed, bounds, bounds[1:]):  # pooled straight into place
            max_pool(part, out[i:j])
        if n < len(channels):  # gathered and pooled in one pass
            index = self.inverse[: 2 * self.height, : 2 * self.width]
            table = np.ascontiguousarray(self.table[channels[n:] - k])
            kernels.gather_max_pool(out[n:].size * 4, table, np.ascontiguousarray(index), out[n:])
        return out

    def parts(self):
        if self.downsample or self._all is not None:
            return [self.all_values()]
        return self.previous.parts() + [self._fused(np.arange(len(self.table)))]

    def decoders(self) -> np.ndarray:
        """(C, n) float32: row c maps channel c's ranks (pixel codes for the input's) to values."""
        before, own = self.previous.decoders(), self.decode
        width = max(before.shape[1], own.shape[1])
        return np.concatenate([np.pad(before, ((0, 0), (0, width - before.shape[1]))),
                               np.pad(own, ((0, 0), (0, width - own.shape[1])))])


def _ranks(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dense rank of each entry within its row, (C, n) values by rank): order-preserving integer codes."""
    order = np.argsort(table, axis=1, kind="stable")
    ordered = np.take_along_axis(table, order, 1)
    new = np.ones(ordered.shape, bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    dense = np.cumsum(new, axis=1) - 1
    ranks = np.empty_like(dense)
    np.put_along_axis(ranks, order, dense, 1)
    decode = np.zeros(table.shape, np.float32)
    np.put_along_axis(decode, dense, ordered.astype(np.float32), 1)
    return ranks, decode


def _stage(block: dict, previous: Stage) -> Block:
    codes = lbp_codes(previous, block["channels"], block["offsets"])
    unique, inverse = _unique(codes, len(block["channels"]))
    table = _fusion_table(block, unique)
    args = (table, inverse.reshape(codes.shape), previous, bool(block["downsample"]))
    return Residual(*args) if block["kind"] == "residual" else MacFree(*args, dtype=_integer_type(previous))


def _integer_type(stage: Stage) -> np.dtype:
    return stage.dtype if isinstance(stage, Input) else _integer_type(stage.previous)


def lbp_codes(stage: Stage, channels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(H, W, B) uint64 codes, bit u set where x_c(u)(p + offset_u) > x_c(u)(p), edges replicated."""
    read, local = np.unique(channels, return_inverse=True)
    values = np.ascontiguousarray(stage.read(read))
    codes = np.zeros(values.shape[1:], np.uint64)
    dy, dx = offsets[:, 0].astype(np.intp), offsets[:, 1].astype(np.intp)
    kernels.lbp_codes(codes.size * len(channels), values, local.astype(np.intp), dy, dx, codes)
    return codes


def _unique(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct codes, index (int32) of each pixel's code among them)."""
    flat = codes.ravel()
    if bits <= 16:  # a presence table beats sorting a million codes
        present = np.zeros(1 << bits, bool)
        present[flat] = True
        unique = np.flatnonzero(present)
        index = np.zeros(len(present), np.int32)
        index[unique] = np.arange(len(unique), dtype=np.int32)
        return unique.astype(np.uint64), index[flat]
    unique, inverse = np.unique(flat, return_inverse=True)
    return unique, inverse.astype(np.int32)


def _fusion_table(block: dict, unique: np.ndarray) -> np.ndarray:
    """(C_out, distinct codes): the block's fusion of each distinct code."""
    if block["fusion"] == "conv1x1":
        z = _weight_sums(block["weight"], _bits(unique, len(block["channels"])))
        y = deploy.affine(z.T, block["bn_scale"], block["bn_shift"], str(block["bn_rounding"])).T
        return np.maximum(y, 0)
    routes = block["routes"]
    masks = np.bitwise_or.reduce(np.uint64(1) << routes.astype(np.uint64), axis=1)  # (C_out,) route masks
    count = np.bitwise_count(unique[None, :] & masks[:, None]).astype(np.int16)  # the RP popcount
    gates = block["gates"][:, None]
    if block["activation"] == "shifted_relu":
        return (np.maximum(count - int(block["threshold"]) + 1, 0) * gates).astype(np.uint8)
    fired = (count >= int(block["threshold"])) & gates  # residual blocks: then BN, one of two values
    return np.where(fired, block["bn_values"][:, 1:], block["bn_values"][:, :1]).astype(np.float32)


def avg_pool(x: np.ndarray) -> np.ndarray:
    """2x2 average pool of (C, H, W, B) as torch's CPU kernel sums: row by row, then / 4 (odd edges dropped)."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    x = x[:, :h, :w]
    return (((x[:, 0::2, 0::2] + x[:, 0::2, 1::2]) + x[:, 1::2, 0::2]) + x[:, 1::2, 1::2]) / x.dtype.type(4)


def max_pool(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    x = x[:, :h, :w]
    top = np.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2])
    return np.maximum(top, np.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2], out=out), out=out)
