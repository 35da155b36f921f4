"""RBNN's packed engine: an exported network (`export.py`) run as XNOR-popcount on packed sign bits.

The program is a list of layer operations on named values: float maps (B, H, W, C) — channels last, so
a pixel's signs pack into consecutive bits —, the integer sums of a binarized convolution, or packed
signs (`Signs`). A binarized layer's result feeds the next layer as signs straight from its thresholds
(no float in between) where torch only takes its sign, else as float32 computed as torch computes it.

Exactness: the sums are exact integers; thresholds are torch's signs; every float operation of the
feature path repeats torch's rounding — the first convolution as oneDNN sums it (fused multiply-adds
over kernel rows, columns, channels), BN as torch's fused multiply-add (checked at export on every value
the layer can receive), the residual adds as single IEEE additions, pools in torch's order. What is left
is float rounding in the head (global average pool, classifier: BLAS), and in the ImageNet networks'
downsampling shortcuts (real 1x1 convolutions whose blocked summation order oneDNN chooses); the arrays'
`exact` flags record which checks held at export, and predictions are compared (tests, bench).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bitfleet import deploy
from workloads.rbnn import xnor


class Signs(NamedTuple):
    """Binarized activations: packed sign bits (B, H, W, ceil(C/8)) and where they are exactly 0 (or None)."""

    packed: np.ndarray
    zeros: np.ndarray | None


class PackedRBNN:
    """`logits(uint8 images (N, C, H, W))`; `source`: an engine file, or its arrays and the input table."""

    def __init__(self, source: str | Path | dict, input_lut: np.ndarray | None = None):
        if not isinstance(source, dict):
            _, source = deploy.load(source)
            input_lut = source.pop("input_lut")
        self.input_lut = input_lut.astype(np.float32)
        self.ops = json.loads(str(source["program"]))
        self.params = [{k.split(".", 1)[1]: v for k, v in source.items() if k.startswith(f"op{i}.")}
                       for i in range(len(self.ops))]
        self.convs = {i: _binary_conv(op, self.params[i]) for i, op in enumerate(self.ops) if op["op"] == "binary_conv"}
        self.residual_ends = _residual_ends(self.ops)
        self.signed_convs = {i for i, op in enumerate(self.ops[:-1]) if op["op"] == "binary_conv"
                             and self.ops[i + 1]["op"] == "sign" and self.ops[i + 1]["in"] == [op["out"]]
                             and not _read_later(self.ops, i + 2, op["out"])}
        self.folded = {i for scale_bn, clip in self.residual_ends.values() for i in (scale_bn, clip) if i is not None}
        self.folded |= {i + 1 for i in self.signed_convs}

    def logits(self, images: np.ndarray) -> np.ndarray:
        codes = np.asarray(images, np.uint8).transpose(0, 2, 3, 1)  # (B, H, W, C)
        channels = np.arange(codes.shape[-1])
        values = {"x": self.input_lut[channels, codes]}  # the loader's normalisation, bit for bit
        signs_of: dict[str, Signs] = {}  # a float value's signs, packed with it by a residual end
        for i, (op, params) in enumerate(zip(self.ops, self.params)):
            if i in self.folded:
                continue
            signs_of.pop(op["out"], None)
            if i in self.residual_ends:
                scale_bn, clip = self.residual_ends[i]
                p = self.params[scale_bn]
                values[op["out"]], *packed = xnor.residual_epilogue(
                    values[self.ops[scale_bn]["in"][0]], p["scale"], p["bn_scale"], p["bn_shift"],
                    values[op["in"][1]], clip is not None)
                signs_of[op["out"]] = Signs(*packed)
                continue
            inputs = [values[name] for name in op["in"]]
            if op["op"] == "binary_conv":
                x = inputs[0]
                signs = x if isinstance(x, Signs) else signs_of.get(op["in"][0]) or Signs(*xnor.pack_signs(x))
                if i in self.signed_convs:  # its sums only thresholded into the next conv's signs: one kernel
                    sign, p = self.ops[i + 1], self.params[i + 1]
                    values[sign["out"]] = Signs(*self.convs[i].thresholded(
                        signs.packed, signs.zeros, p["t1"], p["t2"], p["increasing"]))
                    signs_of.pop(sign["out"], None)
                else:
                    values[op["out"]] = self.convs[i](signs.packed, signs.zeros)
            else:
                values[op["out"]] = OPS[op["op"]](op, params, *inputs)
        return values["x"]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).argmax(1)


def _read_later(ops: list[dict], start: int, name: str) -> bool:
    """Whether an op from `start` on reads `name` before one writes it."""
    later = next((op for op in ops[start:] if name in op["in"] or op["out"] == name), None)
    return later is not None and name in later["in"]


def _residual_ends(ops: list[dict]) -> dict[int, tuple[int, int | None]]:
    """{add: (scale_bn, hardtanh or None)}: a binarized conv's scale_bn (fma rounding) whose result only an
    `add` reads, optionally followed by a hardtanh of the sum in place: run as one pass at the add."""
    ends = {}
    for i, op in enumerate(ops):
        if op["op"] != "scale_bn" or op.get("rounding") != "fma":
            continue
        y, dots = op["out"], op["in"][0]
        j = next((j for j in range(i + 1, len(ops)) if y in ops[j]["in"] or ops[j]["out"] in (y, dots)), None)
        if j is None or ops[j]["op"] != "add" or ops[j]["in"][0] != y or ops[j]["in"][1] == y:
            continue
        if _read_later(ops, j + 1, y):
            continue  # the scaled sums are read again
        out = ops[j]["out"]
        clip = j + 1 if j + 1 < len(ops) and ops[j + 1] == {"op": "hardtanh", "in": [out], "out": out} else None
        ends[j] = (i, clip)
    return ends


def _binary_conv(op: dict, params: dict) -> xnor.BinaryConv:
    k, bits = op["k"], params["bits"]
    channels = int(params["channels"])
    nbytes = -(-channels // 8)
    planes = np.unpackbits(bits.view(np.uint8)[:, : k * k * nbytes].reshape(len(bits), k, k, nbytes), axis=-1,
                           bitorder="little")[..., :channels]
    return xnor.BinaryConv(bits, 1 - 2 * planes.astype(np.int8), k, op["stride"], op["pad"], params["zero_weights"])


def _max_pool(x: np.ndarray, k: int, stride: int, pad: int, fill) -> np.ndarray:
    """k x k max pool of (B, H, W, C), `fill` outside the map (floor mode)."""
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    return windows.max(axis=(-2, -1))


def _max_pool_sums(op, params, dots):
    """2x2 max pool of fl(d·s) taken on d: the max of d, or its min where the channel's scale is negative."""
    sign = np.where(params["descending"], -1, 1).astype(np.int32)
    return _max_pool(dots * sign, 2, 2, 0, 0) * sign


def _sign(op, params, dots):
    return Signs(*xnor.pack_thresholds(dots, params["t1"], params["t2"], params["increasing"]))


def _scale_bn(op, params, dots):
    if op["rounding"] == "fma":
        return xnor.scale_bn(dots, params["scale"], params["bn_scale"], params["bn_shift"])
    scaled = dots.astype(np.float32) * params["scale"]  # the conv's output times its scale, as torch rounds it
    return _bn("mul_add", scaled, params["bn_scale"], params["bn_shift"])


def _bn(rounding: str, x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Eval-mode BN over the last axis: one fused multiply-add (torch's CPU kernel), or a product and a sum."""
    return xnor.affine(x, scale, shift) if rounding == "fma" else x * scale + shift


def _shortcut_a(op, params, x):
    """He et al.'s option A: subsample, zero channels on both sides."""
    stride, pad = op["stride"], op["pad"]
    x = x[:, ::stride, ::stride] if stride > 1 else x
    return np.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2))) if pad else x


def _avg_pool_ceil(op, params, x):
    """k x k average pool, ceil mode: edge windows average what they cover; summed row by row as torch does."""
    k = op["k"]
    b, h, w, c = x.shape
    oh, ow = -(-h // k), -(-w // k)
    padded = np.zeros((b, oh * k, ow * k, c), np.float32)
    padded[:, :h, :w] = x
    total = padded[:, 0::k, 0::k]
    for t in range(1, k * k):  # adding 0.0 for the positions outside leaves a sum unchanged
        total = total + padded[:, t // k::k, t % k::k]
    rows = np.minimum(k, h - np.arange(oh) * k)
    cols = np.minimum(k, w - np.arange(ow) * k)
    return total / (rows[:, None] * cols[None, :]).astype(np.float32)[None, :, :, None]


OPS = {
    "conv": lambda op, p, x: xnor.conv_fma(x, p["weight"], op["stride"], op["pad"]),
    "bn": lambda op, p, x: _bn(op["rounding"], x, p["scale"], p["shift"]),
    "hardtanh": lambda op, p, x: np.clip(x, -1, 1),
    "relu": lambda op, p, x: np.maximum(x, 0),
    "max_pool": lambda op, p, x: _max_pool(x, op["k"], op["stride"], op["pad"], -np.inf),
    "max_pool_sums": _max_pool_sums,
    "sign": _sign,
    "scale_bn": _scale_bn,
    "add": lambda op, p, a, b: a + b,
    "copy": lambda op, p, x: x,
    "shortcut_a": _shortcut_a,
    "avg_pool_ceil": _avg_pool_ceil,
    "global_avg_pool": lambda op, p, x: x.mean((1, 2), dtype=np.float64).astype(np.float32),
    "flatten": lambda op, p, x: x.transpose(0, 3, 1, 2).reshape(len(x), -1),  # torch's order: C, H, W
    "linear": lambda op, p, x: x @ p["weight"].T + p["bias"],
}
