"""Bit-packed inference of LBPNet — every block kind (`residual`, `macfree`) and fusion (RP, 1x1); the
exporter is `intexport.py`, the loops over pixels are numba kernels (`kernels.py`).

A batch is held as maps (channels, H, W, batch), batch last. One block:

  LBP comparisons at whole-pixel offsets (edges replicated) -> the U bits of each pixel packed into one
  integer code (the narrowest unsigned type that holds U bits) -> the fusion:
  - RP at each pixel: popcount(code AND the output's route mask) against its threshold (a closed gate:
    one no count reaches), then the shifted ReLU (MAC-free) or BN's value for 0 or 1 (residual) — a few
    vector instructions per pixel, no table;
  - 1x1 once per distinct code of the batch (a few dozen to a few thousand: digits are mostly flat): the
    weights of the set bits summed, BN and ReLU -> a table (C_out, codes) that each pixel's code indexes.
  The fused values are written joined with the input (added to the tiled input and average-pooled, or
  concatenated and max-pooled) in one kernel pass per block.

A stage is one array whose channels are filled in place where they are read (`Stage.rows`): the next
block reads at most U channels; a residual network's global-average-pool head reads per-channel means,
which average pooling leaves linear: each block's sums over the pooled region (RP: its fired pixels
counted; 1x1: table rows added per pixel) plus the stream's.

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
        if isinstance(stage, Residual) and str(t["head.pool"]) == "gap":  # linear all the way: from sums of codes
            features = stage.means(stage.height, stage.width).T.astype(np.float32)
        else:
            values = stage.all_values()
            if values.dtype != np.float32:  # ranks and pixel codes back to the values they stand for
                decoded = values.astype(np.float32)  # RP's values are their own numbers: a vectorised cast
                rows = np.flatnonzero(~stage.identity())  # the others through their tables
                kernels.lookup(len(rows) * values[0].size, np.ascontiguousarray(stage.decoders()[rows]),
                               values.reshape(len(values), -1), rows, decoded.reshape(len(values), -1))
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
    """The output map (C, H, W, B) of a block (or the input), held in one array whose channels are computed
    where they are read: a few (`rows`, each computed once, in place) for the next block's comparisons, or
    all of them (`all_values`)."""

    channels: int
    height: int
    width: int
    batch: int
    dtype: np.dtype

    def __init__(self):
        self._array: np.ndarray | None = None
        self._done = np.zeros(0, bool)

    def rows(self, channels: np.ndarray) -> np.ndarray:
        """The stage's (C, H, W, B) array, `channels` computed in it (others may be unset)."""
        if self._array is None:  # untouched channels cost no memory: np.empty only reserves it
            self._array = np.empty((self.channels, self.height, self.width, self.batch), self.dtype)
            self._done = np.zeros(self.channels, bool)
        todo = np.unique(channels[~self._done[channels]])
        if len(todo):
            self._compute(todo, self._array)
            self._done[todo] = True
        return self._array

    def values(self, channels: np.ndarray) -> np.ndarray:
        """(len, H, W, B): the `channels` alone (a copy)."""
        return self.rows(channels)[channels]

    def all_values(self) -> np.ndarray:
        return self.rows(np.arange(self.channels))

    def max_pooled(self, channels: np.ndarray, out: np.ndarray, rows: np.ndarray) -> None:
        """out[rows] = the 2x2 max pool of `channels` (a MAC-free network's integers)."""
        kernels.max_pool(len(channels) * out[0].size * 4, self.rows(channels), channels, out, rows)

    def _compute(self, channels: np.ndarray, out: np.ndarray) -> None:
        """Fill out[channels] (sorted, distinct, not yet computed)."""
        raise NotImplementedError


class Input(Stage):
    def __init__(self, codes: np.ndarray, lut: np.ndarray, dtype: np.dtype):
        super().__init__()
        self.codes, self.lut, self.dtype = codes, lut, np.dtype(dtype)
        self.channels, self.height, self.width, self.batch = codes.shape
        if self.dtype == codes.dtype:  # order is all comparisons and max pools need: raw codes, no copy
            self._array, self._done = codes, np.ones(self.channels, bool)

    def _compute(self, channels, out):
        if self.dtype != np.float32:
            out[channels] = self.codes[channels]
            return
        flat = self.codes.reshape(self.channels, -1)
        kernels.lookup(len(channels) * flat.shape[1], np.ascontiguousarray(self.lut[channels]), flat, channels,
                       out.reshape(self.channels, -1))

    def decoders(self) -> np.ndarray:
        return self.lut

    def identity(self) -> np.ndarray:
        return np.zeros(self.channels, bool)

    def means(self, h: int, w: int) -> np.ndarray:
        return self.all_values()[:, :h, :w].mean((1, 2), dtype=np.float64)


class Fusion:
    """A block's fused output at each pixel, from the pixel's key. RP (`count`): keys are the pixels' codes,
    and channel i's value follows from popcount(key & masks[i]) against thresholds[i] (a closed gate: a
    threshold no count reaches) — BN of the bit, tables[i, 0 or 1] (residual), or the shifted ReLU (MAC-free,
    tables[i] listing its values for `decode`). 1x1: keys index the batch's distinct codes, tables[i] their
    fusion."""

    def __init__(self, keys: np.ndarray, masks: np.ndarray, thresholds: np.ndarray, count: bool, tables: np.ndarray):
        self.keys, self.masks, self.thresholds, self.count, self.tables = keys, masks, thresholds, count, tables

    def args(self, channels: np.ndarray, keys: np.ndarray | None = None) -> tuple:
        keys = self.keys if keys is None else keys
        return (keys, self.masks[channels], self.thresholds[channels], self.count,
                np.ascontiguousarray(self.tables[channels]))


class Block(Stage):
    """A block's output: its fusion, joined with its input."""

    def __init__(self, fusion: Fusion, previous: Stage, downsample: bool):
        super().__init__()
        self.fusion, self.previous, self.downsample = fusion, previous, downsample
        self.height, self.width = (previous.height // 2, previous.width // 2) if downsample else (
            previous.height, previous.width)
        self.batch = previous.batch


class Residual(Block):
    """out = BN(fusion) + tile(x): input channel c % C_in added to output channel c; 2x2 average pool."""

    def __init__(self, *args):
        super().__init__(*args)
        self.channels, self.dtype = len(self.fusion.tables), np.dtype(np.float32)

    def _compute(self, channels, out):
        tiled = channels % self.previous.channels
        previous = self.previous.rows(tiled)
        work = len(channels) * self.previous.height * self.previous.width * self.batch
        kernels.residual(work, *self.fusion.args(channels), channels, out, previous, tiled, self.downsample)

    def means(self, h: int, w: int) -> np.ndarray:
        """(C, B) float64 means over the top-left h x w of the output map: what global average pooling of a
        map pooled down from this one averages; average pooling keeps it a sum of the inputs' means."""
        h, w = (2 * h, 2 * w) if self.downsample else (h, w)  # the region this map's pool averaged
        keys = self.fusion.keys
        keys = keys if keys.shape[:2] == (h, w) else np.ascontiguousarray(keys[:h, :w])
        channels = np.arange(self.channels)
        f = self.fusion
        if f.count:
            sums = np.empty((self.channels, self.batch))
            kernels.sums(sums.size * h * w, keys, f.masks, f.thresholds, f.tables, sums)
        else:
            sums_t = np.zeros((self.batch, self.channels))
            kernels.table_sums(sums_t.size * h * w, keys, np.ascontiguousarray(f.tables.T, np.float64), sums_t)
            sums = sums_t.T
        return sums / (h * w) + self.previous.means(h, w)[channels % self.previous.channels]


class MacFree(Block):
    """out = concat(x, fusion): the input's channels first; 2x2 max pool. The tables hold each channel's
    values as integers in the same order (ranks, or RP's counts themselves): `decode` turns them back."""

    def __init__(self, fusion: Fusion, previous: Stage, downsample: bool, decode: np.ndarray):
        super().__init__(fusion, previous, downsample)
        self.decode, self.dtype = decode, previous.dtype
        self.channels = previous.channels + len(fusion.tables)

    def _compute(self, channels, out):
        k = self.previous.channels
        passed, own = channels[channels < k], channels[channels >= k]
        if len(passed) and self.downsample:
            self.previous.max_pooled(passed, out, passed)
        elif len(passed):
            out[passed] = self.previous.rows(passed)[passed]
        if len(own):
            work = len(own) * self.previous.height * self.previous.width * self.batch
            kernels.fuse(work, *self.fusion.args(own - k), own, out, self.downsample)

    def max_pooled(self, channels, out, rows):
        """Channels not yet computed at full resolution are pooled straight from the codes, never written
        at full size: the max pool commutes with the concatenation, and with the fusion's monotone ReLU."""
        ready = self._done[channels] if self._array is not None else np.zeros(len(channels), bool)
        if self.downsample or ready.all():
            return super().max_pooled(channels, out, rows)
        if ready.any():
            super().max_pooled(channels[ready], out, rows[ready])
        todo, at, k = channels[~ready], rows[~ready], self.previous.channels
        if (todo < k).any():
            self.previous.max_pooled(todo[todo < k], out, at[todo < k])
        if (todo >= k).any():
            work = int((todo >= k).sum()) * self.height * self.width * self.batch
            kernels.fuse(work, *self.fusion.args(todo[todo >= k] - k), at[todo >= k], out, True)

    def identity(self) -> np.ndarray:
        """(C,) bool: channels whose integers are their values (RP's shifted ReLU), decoded by a cast."""
        return np.concatenate([self.previous.identity(), np.full(len(self.fusion.tables), self.fusion.count)])

    def decoders(self) -> np.ndarray:
        """(C, n) float32: row c maps channel c's integers (pixel codes for the input's) to values."""
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
    downsample, macfree = bool(block["downsample"]), block["kind"] == "macfree"
    if block["fusion"] == "rp":
        fusion = _rp_fusion(block, codes, previous.dtype)
        decode = fusion.tables.astype(np.float32)  # MAC-free: the values are the counts' ReLUs themselves
    else:
        unique, inverse = _unique(codes, len(block["channels"]))
        table = _fusion_table(block, unique)
        decode = None
        if macfree:  # order-preserving integers in the stage's type
            ranks, decode = _ranks(table)
            table = ranks.astype(previous.dtype)
        none = np.zeros(len(table), np.int32)
        fusion = Fusion(inverse.reshape(codes.shape), none, none.astype(np.int64), False, table)
    return MacFree(fusion, previous, downsample, decode) if macfree else Residual(fusion, previous, downsample)


def _code_type(bits: int) -> np.dtype:
    """The narrowest unsigned integer that holds `bits` bits (fewer bytes to write and read per pixel)."""
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if np.iinfo(t).bits >= bits))


def lbp_codes(stage: Stage, channels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(H, W, B) codes, bit u set where x_c(u)(p + offset_u) > x_c(u)(p), edges replicated."""
    channels = channels.astype(np.intp)
    values = stage.rows(channels)
    dtype = _code_type(len(channels))
    codes = np.zeros((stage.height, stage.width, stage.batch), dtype)
    dy, dx = offsets[:, 0].astype(np.intp), offsets[:, 1].astype(np.intp)
    bits = (np.uint64(1) << np.arange(len(channels), dtype=np.uint64)).astype(dtype)
    kernels.lbp_codes(codes.size * len(channels), values, channels, dy, dx, bits, codes)
    return codes


def _unique(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct codes (uint64), index (int32) of each pixel's code among them)."""
    flat = codes.ravel()
    if bits <= 16:  # a presence table beats sorting a million codes
        present = np.zeros(1 << bits, bool)
        present[flat] = True
        unique = np.flatnonzero(present)
        index = np.zeros(len(present), np.int32)
        index[unique] = np.arange(len(unique), dtype=np.int32)
        return unique.astype(np.uint64), index[flat]
    unique, inverse = np.unique(flat, return_inverse=True)
    return unique.astype(np.uint64), inverse.astype(np.int32)


def _rp_fusion(block: dict, codes: np.ndarray, dtype: np.dtype) -> Fusion:
    """RP evaluated at each pixel: popcount(code AND route mask) against the threshold, gates folded in."""
    routes, bits = block["routes"], len(block["channels"])
    masks = np.bitwise_or.reduce(np.uint64(1) << routes.astype(np.uint64), axis=1).astype(codes.dtype)
    thresholds = np.where(block["gates"], int(block["threshold"]), bits + 2).astype(np.int64)
    if block["activation"] == "shifted_relu":  # max(count - threshold + 1, 0): 0 .. bits
        tables = np.tile(np.arange(bits + 1), (len(routes), 1)).astype(dtype)
    else:  # BN of the bit: the two values torch's BN gives for 0 and 1
        tables = np.ascontiguousarray(block["bn_values"], np.float32)
    return Fusion(codes, masks, thresholds, True, tables)


def _fusion_table(block: dict, unique: np.ndarray) -> np.ndarray:
    """(C_out, distinct codes) float32: the 1x1 fusion of each distinct code — the weights of its set bits
    summed, BN, ReLU."""
    z = _weight_sums(block["weight"], _bits(unique, len(block["channels"])))
    y = deploy.affine(z.T, block["bn_scale"], block["bn_shift"], str(block["bn_rounding"])).T
    return np.maximum(y, 0)
