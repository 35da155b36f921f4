"""Integer inference of a MAC-free LBPNet with packed bits in numpy, and its exporter.

Per block, on integer feature maps (8-bit pixel codes, then counts):
  comparisons at whole-pixel offsets -> bit planes packed 64 pixels to a word -> routing (whole packed
  planes gathered) -> popcount by bit-sliced ripple-carry addition of the routed planes (AND/XOR on
  words) -> count bits unpacked -> shifted ReLU, closed gates zeroed -> concatenation -> 2x2 max pool.
The float head (global average pool or flatten, Linear, BN, ReLU, Linear) stays float32.

LBP comparisons depend only on the order of values within a channel, and the input normalisation is
strictly increasing, so the engine reads raw uint8 pixels where the model reads normalised ones; before
the head the image channels are normalised as the data loader does. Its predictions equal the model's
hard-path predictions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bitfleet.errors import SpecError
from workloads.lbpnet.layers import RPFusion
from workloads.lbpnet.models import LBPBlock, LBPNet


def export(model: LBPNet, data, path: Path) -> dict:
    """Write the integer engine's tables (.npz) of a MAC-free RP LBPNet; returns a summary."""
    blocks = list(model.blocks)
    if not all(isinstance(b, LBPBlock) and b.kind == "macfree" and isinstance(b.fusion, RPFusion) for b in blocks):
        raise SpecError("model.blocks: integer export needs the MAC-free network "
                        "(block: macfree, fusion_type: rp_paper)")
    arrays: dict[str, np.ndarray] = {"num_blocks": np.array(len(blocks))}
    for i, block in enumerate(blocks):
        lbp, rp = block.lbp, block.fusion
        channel, row = lbp.bit_sources(rp.needed_bits)
        arrays.update({
            f"b{i}.channels": channel.numpy(), f"b{i}.offsets": lbp.integer_positions().reshape(-1, 2)[row].numpy(),
            f"b{i}.routes": rp.local_routes.numpy(), f"b{i}.threshold": np.array(rp.threshold),
            f"b{i}.gates": (rp.gate_logits.detach() > 0).numpy(), f"b{i}.downsample": np.array(block.downsample),
            f"b{i}.radius": np.array(int(np.ceil(lbp.radius))),
        })
    head = model.head
    bn = head.bn if isinstance(head.bn, torch.nn.BatchNorm1d) else None
    arrays.update({
        "input_mean": np.array(data.mean, np.float32), "input_std": np.array(data.std, np.float32),
        "input_channels": np.array(data.in_channels), "head_pool": np.array(head.pool),
        "fc1.weight": head.fc1.weight.detach().numpy(), "fc1.bias": head.fc1.bias.detach().numpy(),
        "fc2.weight": head.fc2.weight.detach().numpy(), "fc2.bias": head.fc2.bias.detach().numpy(),
    })
    if bn is not None:
        arrays.update({
            "bn.mean": bn.running_mean.numpy(), "bn.var": bn.running_var.numpy(),
            "bn.eps": np.array(bn.eps, np.float32),
            "bn.weight": bn.weight.detach().numpy(), "bn.bias": bn.bias.detach().numpy(),
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return {"path": str(path), "blocks": len(blocks), "bytes": path.stat().st_size}


class IntegerLBPNet:
    """The exported network, run with integer and bit operations; `predict(uint8 images)` -> labels."""

    def __init__(self, path: str | Path):
        with np.load(path) as f:
            self.t = {k: f[k] for k in f.files}
        self.num_blocks = int(self.t["num_blocks"])

    def features(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.uint8)  # pixel codes, then counts of at most k: 8 bits hold every value
        for i in range(self.num_blocks):
            x = self._block(x, i)
        return x

    def logits(self, images: np.ndarray) -> np.ndarray:
        t = self.t
        features = self.features(images).astype(np.float32)
        # the image channels were carried as pixel codes: normalise them as the loader does
        k = int(t["input_channels"])
        mean, std = t["input_mean"][:, None, None], t["input_std"][:, None, None]
        features[:, :k] = (features[:, :k] / np.float32(255) - mean) / std
        pooled = features.reshape(len(features), -1) if str(t["head_pool"]) == "flatten" else features.mean((2, 3))
        h = pooled @ t["fc1.weight"].T + t["fc1.bias"]
        if "bn.mean" in t:
            h = (h - t["bn.mean"]) / np.sqrt(t["bn.var"] + t["bn.eps"]) * t["bn.weight"] + t["bn.bias"]
        return np.maximum(h, 0) @ t["fc2.weight"].T + t["fc2.bias"]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).argmax(1)

    def _block(self, x: np.ndarray, i: int) -> np.ndarray:
        t = {k.split(".", 1)[1]: v for k, v in self.t.items() if k.startswith(f"b{i}.")}
        b, c, h, w = x.shape
        planes = _compare(x, t["channels"], t["offsets"], int(t["radius"]) + 1)  # (B, U, words) uint64
        count = _popcount(planes[:, t["routes"]], h * w)  # (B, C_out, H·W)
        y = (np.maximum(count - (int(t["threshold"]) - 1), 0).astype(np.uint8)
             * t["gates"][None, :, None].astype(np.uint8))
        out = np.concatenate([x, y.reshape(b, -1, h, w)], 1)
        if t["downsample"]:  # 2x2 max pool as three element-wise maxima of strided views
            even = out[:, :, : h // 2 * 2, : w // 2 * 2]
            out = np.maximum(np.maximum(even[:, :, ::2, ::2], even[:, :, 1::2, ::2]),
                             np.maximum(even[:, :, ::2, 1::2], even[:, :, 1::2, 1::2]))
        return out


def _compare(x: np.ndarray, channels: np.ndarray, offsets: np.ndarray, pad: int) -> np.ndarray:
    """Bit planes 1[x_c(p + offset) > x_c(p)] for each (channel, offset), packed 64 pixels per uint64."""
    b, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge").reshape(b, -1)
    hp, wp = h + 2 * pad, w + 2 * pad
    centre = (channels[:, None, None] * hp * wp + (np.arange(h)[:, None] + pad) * wp
              + np.arange(w) + pad).reshape(len(channels), -1)
    sample = centre + (offsets[:, 0] * wp + offsets[:, 1])[:, None]
    bits = xp[:, sample] > xp[:, centre]  # (B, U, H·W) bool
    packed = np.packbits(bits, axis=-1, bitorder="little")
    words = -(-packed.shape[-1] // 8) * 8
    packed = np.pad(packed, ((0, 0), (0, 0), (0, words - packed.shape[-1])))
    return packed.view(np.uint64)


def _popcount(routed: np.ndarray, pixels: int) -> np.ndarray:
    """Per-pixel count of set bits over axis 2 of (B, C_out, k, words): bit-sliced ripple-carry adders."""
    k = routed.shape[2]
    counter = [np.zeros_like(routed[:, :, 0]) for _ in range(max(1, int(k).bit_length()))]
    for j in range(k):
        carry = routed[:, :, j]
        for i, digit in enumerate(counter):
            counter[i], carry = digit ^ carry, digit & carry
    total = np.zeros(routed.shape[:2] + (pixels,), np.int16)
    for i, digit in enumerate(counter):
        bits = np.unpackbits(digit.view(np.uint8), axis=-1, bitorder="little")[..., :pixels]
        total += bits.astype(np.int16) << i
    return total
