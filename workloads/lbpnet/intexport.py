"""The exporter of LBPNet's engine (`intengine.py`): per block its comparisons (each needed bit's input
channel and whole-pixel offset), its fusion (RP routes, threshold, gates; or 1x1 weights) and BN as the
values torch computes; the float head."""
from __future__ import annotations

import math

import numpy as np
import torch

from bitfleet import deploy
from bitfleet.errors import SpecError
from workloads.lbpnet.intengine import MAX_BITS, _bits, _weight_sums
from workloads.lbpnet.layers import Conv1x1Fusion, RPFusion
from workloads.lbpnet.models import LBPBlock, LBPNet


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



def _linear(name: str, layer) -> dict[str, np.ndarray]:
    return {f"head.{name}.weight": layer.weight.detach().numpy(), f"head.{name}.bias": layer.bias.detach().numpy()}


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
