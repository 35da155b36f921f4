"""Bit-packed inference of LBPNet in numpy — every block kind (`residual`, `macfree`) and fusion (RP, 1x1) —
and its exporter.

A batch is held as maps (channels, H, W, batch): batch last, so a shifted map is a slice whose rows are
contiguous runs of W·batch values. One block:

  LBP comparisons at whole-pixel offsets (edge-replicated) -> the U bits of each pixel packed into one
  integer code -> the distinct codes of the batch (a few dozen to a few thousand: digits are mostly flat)
  -> the fusion evaluated once per distinct code: RP is AND with each output's route mask and popcount,
  then threshold or shifted ReLU and the gates; 1x1 sums the weights of the set bits, then BN and ReLU
  -> a table (C_out, codes) that each pixel's code indexes.

Outputs are computed per channel and only where they are read (`Stage.values`): the next block reads at
most U channels; a residual network's global-average-pool head reads per-channel means, which average
pooling leaves linear: means of table entries weighted by code counts (`np.bincount`) plus the stream's.

Exactness. Counts and pixel codes are integers. Comparisons depend only on order within a channel, and
the loader's normalisation is strictly increasing, so integer networks compare raw pixel codes. The
residual stream is float32 and the engine repeats torch's operations in torch's order: BN of a bit is one
of the two values torch's BN gives for 0 and 1 (read from it at export), the shortcut add is one IEEE
addition, the 2x2 average adds the four values row by row and divides by 4 as torch's CPU kernel does,
and pixels are normalised by the loader's own table — so every comparison sees torch's floats. The 1x1
fusion sums its weights in float64 (oneDNN's summation order is not reproducible) and the float32 head
uses BLAS: these differ from torch by rounding only, and predictions are compared (tests, bench).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from bitfleet import deploy
from bitfleet.errors import SpecError
from workloads.lbpnet.layers import Conv1x1Fusion, RPFusion
from workloads.lbpnet.models import LBPBlock, LBPNet

MAX_BITS = 64  # one 64-bit code per pixel


# ----------------------------------------------------------------------------------------------- export
def export(model: LBPNet, data) -> dict[str, np.ndarray]:
    """The engine's arrays of an LBPNet (eval mode): per block its comparisons, fusion and BN; the head."""
    blocks = list(model.blocks)
    if not all(isinstance(b, LBPBlock) for b in blocks):
        raise SpecError("model.blocks.block: `conv` is the float CNN baseline, which has no binary path to export; "
                        "export `macfree` or `residual` networks")
    arrays: dict[str, np.ndarray] = {"num_blocks": np.array(len(blocks)), "in_channels": np.array(data.in_channels)}
    for i, block in enumerate(blocks):
        arrays.update({f"b{i}.{k}": v for k, v in _block_arrays(block).items()})
    head = model.head
    arrays.update({"head.pool": np.array(head.pool), **_linear("fc1", head.fc1), **_linear("fc2", head.fc2)})
    if isinstance(head.bn, torch.nn.BatchNorm1d):
        bn = head.bn  # the float head: BLAS rounds it its own way anyway
        scale = bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.double().numpy() + bn.eps)
        shift = bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * scale
        arrays.update({"head.bn_scale": scale.astype(np.float32), "head.bn_shift": shift.astype(np.float32)})
    return arrays


def _block_arrays(block: LBPBlock) -> dict[str, np.ndarray]:
    lbp, fusion = block.lbp, block.fusion
    channel, row = lbp.bit_sources(fusion.needed_bits)
    if len(channel) > MAX_BITS:
        raise SpecError(f"model.lbp_layer: a block computes {len(channel)} LBP bits per pixel; the engine packs at "
                        f"most {MAX_BITS} into one code (share_across_channels: true keeps num_patterns x num_points)")
    out = {
        "kind": np.array(block.kind), "downsample": np.array(block.downsample),
        "channels": channel.numpy(), "offsets": lbp.integer_positions().reshape(-1, 2)[row].numpy(),
    }
    if isinstance(fusion, RPFusion):
        out.update({"fusion": np.array("rp"), "routes": fusion.local_routes.numpy(),
                    "threshold": np.array(fusion.threshold), "activation": np.array(fusion.activation),
                    "gates": (fusion.gate_logits.detach() > 0).numpy()})
        if isinstance(block.bn, torch.nn.BatchNorm2d):  # BN of a 0/1 output: the two values torch gives
            with torch.no_grad():
                probe = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1).expand(1, fusion.out_channels, 2, 1)
                out["bn_values"] = block.bn(probe.contiguous())[0, :, :, 0].numpy()  # (C, 2)
    else:
        assert isinstance(fusion, Conv1x1Fusion)
        out.update({"fusion": np.array("conv1x1"), **_conv1x1_arrays(block)})
    return out


def _conv1x1_arrays(block: LBPBlock) -> dict[str, np.ndarray]:
    """The 1x1 fusion's weights and BN, with the rounding that repeats torch's, checked on every code (or a
    sample of 4,096 past 16 bits): oneDNN sums the bits' weights in index order, BN is one fused
    multiply-add. `exact` records whether the check passed on this machine."""
    weight = block.fusion.conv.weight.detach()[:, :, 0, 0].numpy()
    scale, shift = deploy.batchnorm_affine(block.bn)
    u = weight.shape[1]
    codes = np.arange(1 << u, dtype=np.uint64) if u <= 16 else np.random.default_rng(0).integers(
        0, 1 << min(u, 63), 4096, dtype=np.uint64)
    bits = _bits(codes, u)
    with torch.no_grad():  # codes as the pixels of one map, as in a network
        conv = block.fusion.conv(torch.from_numpy(bits.astype(np.float32))[None, :, :, None])[0, :, :, 0].numpy()
    ours = _weight_sums(weight, bits)
    rounding = deploy.batchnorm_rounding(block.bn, ours, scale, shift)
    exact = np.array_equal(ours, conv) and rounding is not None
    return {"weight": weight, "bn_scale": scale, "bn_shift": shift, "bn_rounding": np.array(rounding or "fma"),
            "exact": np.array(exact)}


def _bits(codes: np.ndarray, u: int) -> np.ndarray:
    """(u, len(codes)) uint8: bit i of each code."""
    return ((codes[None, :] >> np.arange(u, dtype=np.uint64)[:, None]) & np.uint64(1)).astype(np.uint8)


def _weight_sums(weight: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """(C_out, codes) float32: Σ_i weight[:, i]·bit_i, added in index order (oneDNN's order for a 1x1 conv)."""
    total = np.zeros((len(weight), bits.shape[1]), np.float32)
    for i in range(bits.shape[0]):  # one pass per input bit, over all channels and codes
        total += weight[:, i:i + 1] * bits[i]
    return total


def _linear(name: str, layer) -> dict[str, np.ndarray]:
    return {f"head.{name}.weight": layer.weight.detach().numpy(), f"head.{name}.bias": layer.bias.detach().numpy()}


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
        self.in_channels = int(t["in_channels"])
        # integer networks (MAC-free RP) carry pixel codes and counts as uint8; the others float32
        self.integer = all(b["kind"] == "macfree" and b["fusion"] == "rp" for b in self.blocks)

    def logits(self, images: np.ndarray) -> np.ndarray:
        maps = np.ascontiguousarray(np.asarray(images, np.uint8).transpose(1, 2, 3, 0))  # (C, H, W, B)
        stage = Input(maps, self.input_lut, self.integer)
        for block in self.blocks:
            stage = _stage(block, stage)
        return self._head(stage)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).argmax(1)

    def _head(self, stage: Stage) -> np.ndarray:
        t = self.arrays
        if str(t["head.pool"]) == "flatten":
            values = self._as_float(stage.all_values())  # (C, H, W, B)
            features = values.reshape(-1, values.shape[-1]).T  # torch's flatten: channel, row, column
        elif isinstance(stage, Residual):  # average pools all the way: linear, from code counts
            features = stage.means(stage.height, stage.width).T.astype(np.float32)
        else:
            features = self._as_float(stage.all_values()).mean((1, 2), dtype=np.float64).T.astype(np.float32)
        h = features @ t["head.fc1.weight"].T + t["head.fc1.bias"]
        if "head.bn_scale" in t:
            h = h * t["head.bn_scale"] + t["head.bn_shift"]
        return np.maximum(h, 0) @ t["head.fc2.weight"].T + t["head.fc2.bias"]

    def _as_float(self, values: np.ndarray) -> np.ndarray:
        if values.dtype == np.float32:
            return values
        out = values.astype(np.float32)  # counts as they are; pixel codes (the first channels) normalised
        k = self.in_channels
        codes = values[:k].reshape(k, -1).astype(np.intp)
        out[:k] = np.take_along_axis(self.input_lut, codes, 1).reshape(out[:k].shape)
        return out


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
            self._some.update(zip(todo.tolist(), self._compute(todo)))
        return np.stack([self._some[c] for c in channels.tolist()])

    def all_values(self) -> np.ndarray:
        if self._all is None:
            self._all, self._some = self._compute(np.arange(self.channels)), {}
        return self._all

    def read(self, channels: np.ndarray) -> np.ndarray:
        """`values`, or a selection from `all_values` when every channel is read anyway."""
        return self.all_values()[channels] if len(np.unique(channels)) == self.channels else self.values(channels)

    def _compute(self, channels: np.ndarray) -> np.ndarray:
        """(len, H, W, B) of the sorted, distinct `channels`."""
        raise NotImplementedError


class Input(Stage):
    def __init__(self, codes: np.ndarray, lut: np.ndarray, integer: bool):
        super().__init__()
        self.codes, self.lut, self.integer = codes, lut, integer
        self.channels, self.height, self.width = codes.shape[:3]

    def _compute(self, channels):
        codes = self.codes[channels]
        if self.integer:  # order is all comparisons and max pools need: raw codes
            return codes
        flat = codes.reshape(len(channels), -1).astype(np.intp)
        return np.take_along_axis(self.lut[channels], flat, 1).reshape(codes.shape)

    def means(self, h: int, w: int) -> np.ndarray:
        return self.values(np.arange(self.channels))[:, :h, :w].mean((1, 2), dtype=np.float64)


class Block(Stage):
    """A block's output: its fusion table indexed by each pixel's code, joined with its input."""

    def __init__(self, table: np.ndarray, inverse: np.ndarray, previous: Stage, downsample: bool):
        super().__init__()
        self.table, self.inverse, self.previous, self.downsample = table, inverse, previous, downsample
        self.height, self.width = (previous.height // 2, previous.width // 2) if downsample else (
            previous.height, previous.width)

    def _fused(self, channels: np.ndarray) -> np.ndarray:
        return np.take(self.table[channels], self.inverse, axis=1)  # (len, H, W, B)


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
        counts = np.bincount((inverse * batch + np.arange(batch)).ravel(), minlength=len(self.table[0]) * batch)
        fused = self.table.astype(np.float64) @ counts.reshape(-1, batch) / (h * w)
        return fused + self.previous.means(h, w)[np.arange(self.channels) % self.previous.channels]


class MacFree(Block):
    """out = concat(x, fusion): the input's channels first; 2x2 max pool."""

    def __init__(self, *args):
        super().__init__(*args)
        self.channels = self.previous.channels + len(self.table)

    def _compute(self, channels):
        k = self.previous.channels
        n = int((channels < k).sum())  # channels are sorted: the input's come first
        out = np.empty((len(channels), self.height, self.width, self.inverse.shape[-1]), self.table.dtype)
        if n:
            _pool_into(self.previous.read(channels[:n]), out[:n], self.downsample)
        if n < len(channels):
            _pool_into(self._fused(channels[n:] - k), out[n:], self.downsample)
        return out


def _pool_into(x: np.ndarray, out: np.ndarray, downsample: bool) -> None:
    if downsample:
        max_pool(x, out)
    else:
        out[...] = x


def _stage(block: dict, previous: Stage) -> Block:
    codes = lbp_codes(previous, block["channels"], block["offsets"])
    unique, inverse = _unique(codes)
    table = _fusion_table(block, unique)
    kind = Residual if block["kind"] == "residual" else MacFree
    return kind(table, inverse.reshape(codes.shape), previous, bool(block["downsample"]))


def lbp_codes(stage: Stage, channels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(H, W, B) codes, bit u set where x_c(u)(p + offset_u) > x_c(u)(p), edges replicated; the narrowest
    unsigned type that holds the bits."""
    read, local = np.unique(channels, return_inverse=True)
    values = stage.read(read)
    r = int(np.abs(offsets).max(initial=0))
    h, w, batch = values.shape[1:]
    padded = np.pad(values, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    nbytes = next(n for n in (1, 2, 4, 8) if 8 * n >= len(channels))
    code_bytes = np.zeros((h, w, batch, nbytes), np.uint8)  # little-endian bytes of each code
    for u, ((dy, dx), c) in enumerate(zip(offsets.tolist(), local.tolist())):  # one pass per bit of the code
        bit = np.greater(padded[c, r + dy: r + dy + h, r + dx: r + dx + w], values[c]).view(np.uint8)
        code_bytes[..., u // 8] |= bit << np.uint8(u % 8)
    return code_bytes.view(f"<u{nbytes}")[..., 0]


def _unique(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct codes as uint64, index of each pixel's code among them)."""
    flat = codes.ravel()
    if codes.dtype.itemsize <= 2:  # a presence table beats sorting a million codes
        present = np.zeros(1 << 8 * codes.dtype.itemsize, bool)
        present[flat] = True
        unique = np.flatnonzero(present)
        index = np.zeros(len(present), np.intp)
        index[unique] = np.arange(len(unique))
        return unique.astype(np.uint64), index[flat]
    unique, inverse = np.unique(flat, return_inverse=True)
    return unique.astype(np.uint64), inverse


def _fusion_table(block: dict, unique: np.ndarray) -> np.ndarray:
    """(C_out, distinct codes): the block's fusion of each distinct code."""
    if block["fusion"] == "conv1x1":
        z = _weight_sums(block["weight"], _bits(unique, len(block["channels"])))
        return np.maximum(deploy.affine(z, block["bn_scale"], block["bn_shift"], str(block["bn_rounding"])), 0)
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


def packed_size_bits(arrays: dict[str, np.ndarray]) -> int:
    """Bits the comparisons and the fusion need, stored tightly (the paper's count: no head): per point its
    window position and channel; per RP route its bit, per gate one bit; 1x1 weights as float32."""
    bits = 0
    for i in range(int(arrays["num_blocks"])):
        offsets, channels = arrays[f"b{i}.offsets"], arrays[f"b{i}.channels"]
        side = 2 * int(np.abs(offsets).max(initial=0)) + 1
        bits += len(offsets) * (math.ceil(math.log2(side * side)) + math.ceil(math.log2(max(2, channels.max() + 1))))
        if str(arrays[f"b{i}.fusion"]) == "rp":
            routes = arrays[f"b{i}.routes"]
            bits += routes.size * math.ceil(math.log2(max(2, len(offsets)))) + len(routes)
        else:
            bits += arrays[f"b{i}.weight"].size * 32
    return bits
