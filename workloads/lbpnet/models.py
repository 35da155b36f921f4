"""LBPNet networks: stages of LBP blocks and a small float head, three block kinds to compare.

- `residual` (the seed's network): y = BN(fusion(LBP(x))); out = y + tile(x) — channels of x repeated
  to the block's width, no parameters — then a 2x2 average pool where the stage downsamples.
- `macfree` (the paper's MAC-free block): y = RP(LBP(x)) with the shifted-ReLU activation;
  out = concat(x, y), then a 2x2 max pool where the stage downsamples. Comparisons, additions and
  maxima only: every value in the feature path is an integer count or an input pixel, which is what
  lets the integer engine (`intengine.py`) reproduce it bit for bit.
- `conv` (a float baseline of the same skeleton): y = ReLU(BN(conv3x3(x))), residual as `residual`.

Head: global average pool -> Linear(hidden) -> BN -> ReLU -> Dropout -> Linear(num_classes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workloads.lbpnet import batchnorm01, trainkernels
from workloads.lbpnet.layers import Conv1x1Fusion, LBPLayer, RPFusion


def _tile(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x's channels repeated (and cut) to `channels`: a parameter-free residual alignment."""
    return x.index_select(1, torch.arange(channels, device=x.device) % x.shape[1])


def _residual(y: torch.Tensor, x: torch.Tensor, downsample: bool) -> torch.Tensor:
    """y + _tile(x, y's channels), 2x2 average-pooled when `downsample`: on float32 CPU tensors in one
    compiled pass each way (the same numbers), which also spares index_add's per-channel loop in
    `_tile`'s backward (one pool wake-up per channel with several threads)."""
    if trainkernels.applies(y) and trainkernels.applies(x):
        return _Residual.apply(y, x, 2 if downsample else 1)
    out = y + _tile(x, y.shape[1])
    return F.avg_pool2d(out, 2) if downsample else out


class _Residual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, pool):
        ctx.pool, ctx.shapes = pool, (y.shape, x.shape)
        return trainkernels.residual(y, x, pool)

    @staticmethod
    def backward(ctx, grad):
        grad_y, grad_x = trainkernels.residual_backward(grad, ctx.pool, *ctx.shapes)
        return grad_y, grad_x if ctx.needs_input_grad[1] else None, None


class LBPBlock(nn.Module):
    """LBP comparisons fused into `out_channels` maps by RP or 1x1 fusion, in the `residual` or `macfree` form."""

    def __init__(self, in_channels: int, out_channels: int, kind: str, downsample: bool, lbp: dict, fusion: str,
                 rp: dict):
        super().__init__()
        self.kind, self.downsample = kind, downsample
        self.lbp = LBPLayer(in_channels, **lbp)
        if fusion == "rp_paper":
            activation = "shifted_relu" if kind == "macfree" else "threshold"
            self.fusion = RPFusion(self.lbp.num_bits, out_channels, activation=activation,
                                   surrogate=self.lbp.surrogate, **rp)
        else:
            self.fusion = Conv1x1Fusion(self.lbp.num_bits, out_channels)
        self.bn = nn.BatchNorm2d(out_channels) if kind == "residual" or fusion == "conv1x1" else nn.Identity()
        self.out_channels = in_channels + out_channels if kind == "macfree" else out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        binary = not (self.lbp.soft_forward and self.lbp.training)  # relaxed comparisons are fractions
        bits = self.lbp(x, self.fusion.needed_bits)
        rp = isinstance(self.fusion, RPFusion)
        if self.kind == "residual" and rp and binary and batchnorm01.applies(self.bn, bits):
            out = self._counted(bits, x)  # 0/1 outputs: BN from counts, fused with the shortcut (same numbers)
            if out is not None:
                return out
        y = self.bn(self.fusion(bits, binary=binary))
        if isinstance(self.fusion, Conv1x1Fusion):
            y = F.relu(y)
        if self.kind == "macfree":
            out = torch.cat([x, y.to(x.dtype)], 1)
            return F.max_pool2d(out, 2) if self.downsample else out
        return _residual(y, x, self.downsample)


    def _counted(self, bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        counted = self.fusion.counted(bits)
        if counted is None:
            return None
        values, gates = self.fusion.tables[0], self.fusion.gates().detach()
        one_table = (gates.view(-1, 1) * values.view(1, -1) == 1).numpy()
        return batchnorm01.bn_residual(self.bn, counted, x, one_table, 2 if self.downsample else 1)


class ConvBlock(nn.Module):
    """The float baseline: conv3x3 -> BN -> ReLU with the `residual` block's shortcut and pooling."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.downsample, self.out_channels = downsample, out_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return _residual(F.relu(self.bn(self.conv(x))), x, self.downsample)


class Head(nn.Module):
    """Global average pool (or the flattened final map) -> Linear -> BN -> ReLU -> Dropout -> Linear."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout_rate: float, use_bn: bool, pool: str):
        super().__init__()
        self.pool = pool
        self.fc1 = nn.LazyLinear(hidden) if pool == "flatten" else nn.Linear(in_features, hidden)
        self.bn = nn.BatchNorm1d(hidden) if use_bn else nn.Identity()
        self.dropout = nn.Dropout(dropout_rate)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        pooled = features.flatten(1) if self.pool == "flatten" else features.mean((2, 3))
        return self.fc2(self.dropout(F.relu(self.bn(self.fc1(pooled)))))


class LBPNet(nn.Module):
    """Stages of blocks; a stage whose index is in `downsample_at` halves the resolution after its block."""

    def __init__(self, config, in_channels: int, num_classes: int, image_size: int = 28):
        super().__init__()
        blocks, channels = [], in_channels
        lbp = config.lbp_layer.model_dump()
        rp = {**config.rp_config.model_dump(), **config.rp_layer.model_dump()}
        for stage, width in enumerate(config.blocks.channels_per_stage):
            down = stage in config.blocks.downsample_at
            if config.blocks.block == "conv":
                block = ConvBlock(channels, width, down)
            else:
                block = LBPBlock(channels, width, config.blocks.block, down, lbp, config.blocks.fusion_type, rp)
            blocks.append(block)
            channels = block.out_channels
        self.blocks = nn.ModuleList(blocks)
        h = config.head
        self.head = Head(channels, h.hidden, num_classes, h.dropout_rate, h.use_bn, h.pool)
        if h.pool == "flatten":  # materialise the lazy layer: its width depends on the final map's size
            with torch.no_grad():
                self.train(False)
                self(torch.zeros(1, in_channels, image_size, image_size))
                self.train(True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def lbp_layers(model: nn.Module) -> list[LBPLayer]:
    return [m for m in model.modules() if isinstance(m, LBPLayer)]


def rp_layers(model: nn.Module) -> list[RPFusion]:
    return [m for m in model.modules() if isinstance(m, RPFusion)]
