"""The exporter of RBNN's packed engine (`packed.py`): a network as a program of layer operations.

Binarized convolutions are stored as the packed sign bits of the rotated weights (`xnor.pack_weights`)
with their per-channel scales; their BatchNorm becomes
  - thresholds on the integer XNOR-popcount sum where only the sign of the result is used next (the first
    conv of a plain ResNet block, VGG-small): read from torch's own BN on every sum the layer can produce,
    so the folded layer gives torch's signs exactly;
  - otherwise (a Bi-Real stream, a plain block's residual sum) a per-channel affine whose rounding is
    checked against torch's BN on every sum the layer can produce (`deploy.batchnorm_rounding`).
The first convolution and the classifier stay float. `exact` arrays record each check.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from bitfleet import deploy
from bitfleet.errors import SpecError
from workloads.rbnn import xnor
from workloads.rbnn.layers import BinaryConv2d
from workloads.rbnn.models import CifarResNet, ImageNetBiRealResNet, ShortcutA, VGGSmall


class Program:
    """Operations in execution order, each reading and writing named values; arrays keyed `op{i}.name`."""

    def __init__(self):
        self.ops: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, op: str, inputs, output: str = "x", arrays: dict | None = None, **attrs) -> None:
        i = len(self.ops)
        self.ops.append({"op": op, "in": [inputs] if isinstance(inputs, str) else list(inputs), "out": output,
                         **attrs})
        self.arrays.update({f"op{i}.{k}": np.asarray(v) for k, v in (arrays or {}).items()})

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"program": np.array(json.dumps(self.ops)), **self.arrays}


def export(model: nn.Module, data) -> dict[str, np.ndarray]:
    program = Program()
    if isinstance(model, CifarResNet):
        _cifar_resnet(model, program)
    elif isinstance(model, VGGSmall):
        _vgg_small(model, program)
    elif isinstance(model, ImageNetBiRealResNet):
        _imagenet_resnet(model, program)
    else:
        raise SpecError(f"model.arch: {type(model).__name__} has grouped binary convolutions, which the packed "
                        f"engine does not run; export resnet20/resnet18/resnet34/vgg_small (1w1a, Bi-Real)")
    for conv in (m for m in model.modules() if isinstance(m, BinaryConv2d)):
        if conv.a32 or conv.w32:
            raise SpecError("model.a32/w32: XNOR-popcount needs binary weights and activations (1w1a)")
    return program.to_arrays()


# ------------------------------------------------------------------------------------------ networks
def _cifar_resnet(model: CifarResNet, p: Program) -> None:
    conv, bn, _ = model.stem
    _float_conv(p, conv, bn, "hardtanh")
    for block in model.layers:
        first, second = block.first, block.second
        if block.bireal:  # a shortcut around each binarized conv; the stream stays real
            _binary(p, first.conv, first.bn, "x", "y")
            _shortcut(p, first.shortcut, "x", "s")
            p.add("add", ["y", "s"], "x")
            _binary(p, second.conv, second.bn, "x", "y")
            p.add("add", ["y", "x"], "x")
        else:  # h = hardtanh(BN1(conv1 x)) is only ever binarized: thresholds
            _binary(p, first.conv, first.bn, "x", "h", signs_only=True)
            _binary(p, second.conv, second.bn, "h", "y")
            _shortcut(p, block.shortcut, "x", "s")
            p.add("add", ["y", "s"], "x")
            p.add("hardtanh", "x")
    p.add("global_avg_pool", "x")
    _linear_bn(p, model.bn)
    _linear(p, model.fc)


def _vgg_small(model: VGGSmall, p: Program) -> None:
    layers = list(model.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    _float_conv(p, layers[0], layers[1], "hardtanh")
    for n, i in enumerate(convs[1:]):
        pooled = isinstance(layers[i + 1], nn.MaxPool2d)
        bn = layers[i + 2] if pooled else layers[i + 1]
        last = n == len(convs) - 2
        _binary(p, layers[i], bn, "x", "x", signs_only=not last, pool=pooled)
    p.add("hardtanh", "x")
    p.add("flatten", "x")
    _linear(p, model.fc)


def _imagenet_resnet(model: ImageNetBiRealResNet, p: Program) -> None:
    conv, bn, _, pool = model.stem
    _float_conv(p, conv, bn, "relu")
    p.add("max_pool", "x", k=pool.kernel_size, stride=pool.stride, pad=pool.padding)
    for layer in model.layers:
        _binary(p, layer.conv, layer.bn, "x", "y")
        _shortcut(p, layer.shortcut, "x", "s")
        p.add("add", ["y", "s"], "x")
    p.add("global_avg_pool", "x")
    _linear(p, model.fc)


# ------------------------------------------------------------------------------------------ layers
def _binary(p: Program, conv: BinaryConv2d, bn: nn.BatchNorm2d, inputs: str, output: str, signs_only: bool = False,
            pool: bool = False) -> None:
    """conv (+ 2x2 max pool) + BN: thresholds to signs, or floats. `pool`: VGG's max pool between conv and
    BN, taken on the integer sums (the per-channel scale is monotone: max, or min where it is negative)."""
    assert conv.groups == 1 and conv.dilation == (1, 1) and conv.kernel_size[0] == conv.kernel_size[1]
    with torch.no_grad():
        signs = torch.sign(conv.binary_weight()).permute(0, 2, 3, 1).numpy()  # (O, k, k, C)
    scale = conv.scale.detach().view(-1).numpy()
    p.add("binary_conv", inputs, "dots", {"bits": xnor.pack_weights(signs), "channels": signs.shape[-1],
                                          "zero_weights": np.argwhere(signs == 0).astype(np.int32)},
          k=conv.kernel_size[0], stride=conv.stride[0], pad=conv.padding[0])
    if pool:
        p.add("max_pool_sums", "dots", "dots", {"descending": scale < 0})
    fan_in = signs[0].size
    sums = np.arange(-fan_in, fan_in + 1, dtype=np.float32)  # every value the layer's integer sum can take
    scaled = sums[None, :] * scale[:, None]  # fl(d·s), as torch scales the conv's output
    if signs_only:
        p.add("sign", "dots", output, _thresholds(deploy.batchnorm(bn, scaled), fan_in))
        return
    bn_scale, bn_shift = deploy.batchnorm_affine(bn)
    dots = np.ascontiguousarray(np.broadcast_to(sums[:, None], (len(sums), len(scale))), np.int32)
    if np.array_equal(xnor.scale_bn(dots, scale, bn_scale, bn_shift).T, deploy.batchnorm(bn, scaled)):
        rounding = "fma"  # the engine's own kernel, on every sum the layer can produce
    else:
        rounding = deploy.batchnorm_rounding(bn, scaled, bn_scale, bn_shift)
    p.add("scale_bn", "dots", output, {"scale": scale, "bn_scale": bn_scale, "bn_shift": bn_shift,
                                      "exact": rounding is not None}, rounding=rounding or "fma")


def _thresholds(values: np.ndarray, fan_in: int) -> dict[str, np.ndarray]:
    """Per channel, the sums d where sign(BN(d·s)) is -1, 0, +1, as two cuts t1 <= t2 and a direction:
    increasing: -1 below t1, 0 in [t1, t2), +1 from t2; decreasing: the other way round."""
    signs = np.sign(values).astype(np.int8)  # (O, 2K+1), monotone in d since fl(d·s) and BN are
    increasing = signs[:, -1] >= signs[:, 0]
    first = np.where(increasing, (signs < 0).sum(1), (signs > 0).sum(1))
    t1 = -fan_in + first
    t2 = t1 + (signs == 0).sum(1)
    d = np.arange(-fan_in, fan_in + 1)[None, :]
    low, high = np.where(increasing[:, None], -1, 1), np.where(increasing[:, None], 1, -1)
    rebuilt = np.where(d < t1[:, None], low, np.where(d < t2[:, None], 0, high))
    assert np.array_equal(rebuilt, signs), "BN of the scaled sums is not monotone"
    return {"t1": t1.astype(np.int32), "t2": t2.astype(np.int32), "increasing": increasing}


def _float_conv(p: Program, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str | None, inputs: str = "x",
                output: str = "x") -> None:
    """A real convolution and its BN; `exact`: the engine's result equals torch's on a random probe."""
    assert conv.groups == 1 and conv.bias is None
    weight = conv.weight.detach().permute(2, 3, 1, 0).numpy()  # (kh, kw, C, O)
    stride, pad = conv.stride[0], conv.padding[0]
    probe = torch.randn(2, conv.in_channels, 9, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = bn(conv(probe)).permute(0, 2, 3, 1).numpy()
    bn_scale, bn_shift = deploy.batchnorm_affine(bn)
    z = xnor.conv_fma(probe.permute(0, 2, 3, 1).numpy(), weight, stride, pad)
    candidates = {"fma": xnor.affine(z, bn_scale, bn_shift), "mul_add": z * bn_scale + bn_shift}  # the engine's
    rounding = next((r for r, y in candidates.items() if np.array_equal(y, expected)), None)
    p.add("conv", inputs, output, {"weight": weight, "exact": rounding is not None}, stride=stride, pad=pad)
    p.add("bn", output, output, {"scale": bn_scale, "shift": bn_shift}, rounding=rounding or "fma")
    if activation:
        p.add(activation, output, output)


def _shortcut(p: Program, shortcut: nn.Module, inputs: str, output: str) -> None:
    if isinstance(shortcut, nn.Identity):
        p.add("copy", inputs, output)
    elif isinstance(shortcut, ShortcutA):
        p.add("shortcut_a", inputs, output, stride=shortcut.stride, pad=shortcut.pad)
    elif isinstance(shortcut, nn.Sequential):  # ImageNet downsampling: avg pool 2x2 (ceil), real 1x1 conv, BN
        pool, conv, bn = shortcut
        p.add("avg_pool_ceil", inputs, output, k=pool.kernel_size)
        _float_conv(p, conv, bn, None, output, output)
    else:
        raise SpecError(f"model: shortcut {type(shortcut).__name__} is not exported")


def _linear_bn(p: Program, bn: nn.BatchNorm1d) -> None:
    inv = 1.0 / np.sqrt(bn.running_var.double().numpy() + bn.eps)
    scale = bn.weight.detach().double().numpy() * inv
    shift = bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * scale
    p.add("bn", "x", "x", {"scale": scale.astype(np.float32), "shift": shift.astype(np.float32)}, rounding="mul_add")


def _linear(p: Program, fc: nn.Linear) -> None:
    p.add("linear", "x", "x", {"weight": fc.weight.detach().numpy(), "bias": fc.bias.detach().numpy()})
