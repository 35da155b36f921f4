"""The paper's Size and #Ops (LBPNet Table 3): LBP comparisons and the fusion only.

Counted from the model's structure, not by hooks. The convention is the seed's (and the paper's): each
LBP bit is one comparison plus one subtraction (an add); RP fusion adds k - 1 numbers per output and
compares the count with the threshold once; 1x1 fusion is one multiply and one add per weight and
pixel. Residual adds, BN, pooling and the head are not counted.

Size, `size_bytes`: sampling offsets as float32 and RP routing tables as int32 (1x1 weights as float32),
the seed's convention. `size_bytes_packed`: what the integer engine actually stores — each offset as a
whole-pixel position in its window, each point's input channel, each route, each gate as one bit —
in the fewest bits that can hold it.
"""
from __future__ import annotations

import math

from torch import nn

from workloads.lbpnet.layers import Conv1x1Fusion, RPFusion
from workloads.lbpnet.models import LBPBlock

QUANTITIES = {  # what `measure` returns, reported each epoch as `paper/<name>`
    "cmp": "comparisons per image", "add": "additions per image", "mul": "multiplications per image",
    "ops": "operations per image", "gops": "GOPs per image", "size_bytes": "model size in bytes",
    "size_bytes_packed": "model size in bytes as the integer engine packs it",
}


def _bits_for(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def measure(model: nn.Module, image_size: int) -> dict[str, float]:
    ops = {"cmp": 0, "add": 0, "mul": 0}
    size = packed_bits = 0
    side = image_size
    for block in getattr(model, "blocks", []):
        if isinstance(block, LBPBlock):
            lbp, fusion = block.lbp, block.fusion
            pixels = side * side
            computed = lbp.num_bits if fusion.needed_bits is None else len(fusion.needed_bits)
            ops["cmp"] += computed * pixels
            ops["add"] += computed * pixels
            size += lbp.offsets.numel() * 4
            window_positions = _bits_for(lbp.window**2)
            packed_bits += (lbp.offsets[..., 0].numel() * window_positions
                            + lbp.point_channels.numel() * _bits_for(lbp.in_channels))
            if isinstance(fusion, RPFusion):
                ops["add"] += (fusion.k - 1) * fusion.out_channels * pixels
                ops["cmp"] += fusion.out_channels * pixels
                size += fusion.routes.numel() * 4
                packed_bits += fusion.routes.numel() * _bits_for(lbp.num_bits) + fusion.out_channels
            elif isinstance(fusion, Conv1x1Fusion):
                weights = fusion.conv.weight.numel()
                ops["mul"] += weights * pixels
                ops["add"] += weights * pixels
                size += weights * 4
                packed_bits += weights * 32
        if getattr(block, "downsample", False):
            side //= 2
    total = sum(ops.values())
    return {**ops, "ops": total, "gops": total / 1e9, "size_bytes": size, "size_bytes_packed": packed_bits / 8}
