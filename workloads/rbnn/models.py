"""RBNN networks: the first convolution and the classifier stay real, every other convolution is a
`BinaryConv2d`. Activations between binary layers are hardtanh (the sign's clip range).

CIFAR (32x32):
- resnet20_1w1a — He et al.'s ResNet-20 with a shortcut around each two-conv block (option A).
- resnet20_bireal_1w1a — Bi-Real: a shortcut around every binarized conv (what the official code runs).
- resnet18_1w1a, resnet34_1w1a — ResNet-18/34 for CIFAR (3x3 stem, stages 64-128-256-512), Bi-Real shortcuts.
- vgg_small_1w1a — VGG-small (128C3-128C3-MP-256C3-256C3-MP-512C3-512C3-MP-FC), first conv real.
- mobilenetv1_bireal_{025,05}[_noGroup]_1w1a — MobileNetV1 at width 0.25/0.5: each depthwise (or, with
  noGroup, dense) 3x3 conv and each pointwise conv binarized with its own Bi-Real shortcut (channel
  changes: the input repeated or summed in groups; stride 2: average-pooled first).
ImageNet (images above 64 pixels): resnet18_1w1a, resnet34_1w1a — Bi-Real ResNets: real 7x7 stem and classifier,
  a shortcut around every binarized 3x3 conv, downsampling shortcuts avg-pool + real 1x1 conv + BN; the
  MobileNets with a stride-2 stem (MobileNetV1's ImageNet strides).
`react`: ReActNet's RSign and RPReLU in every Bi-Real block (every arch but resnet20_1w1a and vgg_small).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from workloads.rbnn.layers import BinaryConv2d


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    for m in model.modules():  # the scales start at the Kaiming weights' mean magnitude
        if isinstance(m, BinaryConv2d):
            with torch.no_grad():
                m.scale.copy_(m.weight.abs().flatten(1).mean(1).view(-1, 1, 1, 1))
    return model


class ShortcutA(nn.Module):
    """He et al.'s option A: subsample and zero-pad channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.pad, self.stride = planes - in_planes, stride

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2)) if self.pad else x


class Shift(nn.Module):
    """x + b with a learnable per-channel b (ReActNet's "move"), starting at 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x + self.bias


class RPReLU(nn.Module):
    """ReActNet's RPReLU: PReLU(x − γ) + ζ with per-channel γ, ζ and slopes."""

    def __init__(self, channels: int):
        super().__init__()
        self.before, self.prelu, self.after = Shift(channels), nn.PReLU(channels), Shift(channels)

    def forward(self, x):
        return self.after(self.prelu(self.before(x)))


class BinaryConvBN(nn.Module):
    """BN(BinaryConv(x)), plus a shortcut around it when `bireal`, then hardtanh. With ReActNet's activations
    (`react`): the conv's sign becomes RSign, sign(x − α) with a learnable per-channel threshold α, and the
    block's output (after the shortcut) goes through RPReLU."""

    def __init__(self, conv, bn, shortcut=None, bireal=True, clip_input=None):
        super().__init__()
        self.conv, self.bn, self.shortcut, self.bireal = conv, bn, shortcut or nn.Identity(), bireal
        # the conv's input hardtanh (Bi-Real's, or a plain block's between its convs) runs inside its sign
        conv.clip_input = bireal if clip_input is None else clip_input
        self.rsign = self.rprelu = None

    def add_react(self) -> None:
        self.rsign, self.rprelu = Shift(self.conv.in_channels), RPReLU(self.bn.num_features)

    def forward(self, x):
        if not self.bireal:
            return self.bn(self.conv(x))
        # the conv takes hardtanh(x) (clip_input): sign(x) unchanged, its gradient clipped to |x| <= 1; the stream
        # is unclipped
        if self.rsign is None:
            return self.bn(self.conv(x)) + self.shortcut(x)
        return self.rprelu(self.bn(self.conv(self.rsign(x))) + self.shortcut(x))


class CifarBlock(nn.Module):
    """Two binarized 3x3 convs; one shortcut around both (plain) or one around each (Bi-Real)."""

    def __init__(self, in_planes, planes, stride, conv, bireal):
        super().__init__()
        self.bireal = bireal
        shortcut = ShortcutA(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()
        self.first = BinaryConvBN(conv(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes),
                                  shortcut, bireal)
        # plain: hardtanh between the convs, only ever binarized, runs inside the second conv's sign
        self.second = BinaryConvBN(conv(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes), None, bireal,
                                   clip_input=True)
        self.shortcut = shortcut

    def forward(self, x):
        if self.bireal:
            return self.second(self.first(x))
        return F.hardtanh(self.second(self.first(x)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks, widths, num_classes, in_channels, conv, bireal):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.Hardtanh())
        layers, planes = [], widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths)):
            for i in range(count):
                layers.append(CifarBlock(planes, width, 2 if stage and not i else 1, conv, bireal))
                planes = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(planes)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        return self.fc(self.bn(F.adaptive_avg_pool2d(out, 1).flatten(1)))


class VGGSmall(nn.Module):
    def __init__(self, num_classes, in_channels, conv):
        super().__init__()
        widths, layers, prev = [128, 128, 256, 256, 512, 512], [], in_channels
        for i, width in enumerate(widths):
            c = nn.Conv2d(prev, width, 3, 1, 1, bias=False) if i == 0 else conv(prev, width, 3, 1, 1, bias=False)
            layers += [c] + ([nn.MaxPool2d(2)] if i % 2 else []) + [nn.BatchNorm2d(width), nn.Hardtanh()]
            prev = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.LazyLinear(num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class ChannelShortcut(nn.Module):
    """Bi-Real shortcut across a channel change without parameters: repeat (widen) or group-sum (narrow)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        assert cout % cin == 0 or cin % cout == 0, (cin, cout)
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)  # odd sizes: as many outputs as the strided conv
        if self.cout > self.cin:
            return x.repeat(1, self.cout // self.cin, 1, 1)
        if self.cout < self.cin:
            return x.view(x.shape[0], self.cout, self.cin // self.cout, *x.shape[2:]).sum(2)
        return x


class MobileNetV1BiReal(nn.Module):
    """MobileNetV1 with every 3x3 and 1x1 conv binarized, each with a Bi-Real shortcut; the stem keeps CIFAR's
    resolution (stride 1) and halves ImageNet's (stride 2: 224 -> 112 -> ... -> 7, MobileNetV1's strides)."""

    PLAN = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, width, grouped, num_classes, in_channels, conv, stem_stride=1):
        super().__init__()
        c = int(32 * width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(c),
                                  nn.Hardtanh())
        layers = []
        for out, stride in self.PLAN:
            out = int(out * width)
            groups = c if grouped else 1
            layers.append(BinaryConvBN(conv(c, c, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(c),
                                       ChannelShortcut(c, c, stride)))
            layers.append(BinaryConvBN(conv(c, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out),
                                       ChannelShortcut(c, out, 1)))
            c = out
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(c)  # the unclipped stream's scale grows with depth: normalise before the classifier
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.bn(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)))


class ImageNetBiRealResNet(nn.Module):
    """Bi-Real ResNet-18/34 for ImageNet: basic blocks unrolled into single binarized convs with shortcuts."""

    def __init__(self, blocks, num_classes, in_channels, conv):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1)
        )
        layers, c = [], 64
        for stage, count in enumerate(blocks):
            width = 64 * 2**stage
            for i in range(2 * count):  # two binarized convs per basic block
                stride = 2 if stage and i == 0 else 1
                shortcut = None
                if stride != 1 or c != width:
                    pool = nn.AvgPool2d(2, ceil_mode=True)  # odd maps (crops other than 224): the strided conv's size
                    shortcut = nn.Sequential(pool, nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width))
                layers.append(BinaryConvBN(conv(c, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), shortcut))
                c = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def _cifar_resnet(blocks, widths, bireal):
    return lambda num_classes, in_channels, size, conv: CifarResNet(blocks, widths, num_classes, in_channels,
                                                                    conv, bireal)


def _resnet(blocks):
    """CIFAR-style (3x3 stem) below 64 pixels, the ImageNet Bi-Real ResNet above: the seed names both alike."""
    def build(num_classes, in_channels, size, conv):
        if size > 64:
            return ImageNetBiRealResNet(blocks, num_classes, in_channels, conv)
        return CifarResNet(blocks, [64, 128, 256, 512], num_classes, in_channels, conv, bireal=True)
    return build


def _mobilenet(width, grouped):
    return lambda num_classes, in_channels, size, conv: MobileNetV1BiReal(width, grouped, num_classes, in_channels,
                                                                          conv, stem_stride=2 if size > 64 else 1)


ARCHS = {
    "resnet20_1w1a": _cifar_resnet([3, 3, 3], [16, 32, 64], bireal=False),
    "resnet20_bireal_1w1a": _cifar_resnet([3, 3, 3], [16, 32, 64], bireal=True),
    "resnet18_1w1a": _resnet([2, 2, 2, 2]),
    "resnet34_1w1a": _resnet([3, 4, 6, 3]),
    "vgg_small_1w1a": lambda num_classes, in_channels, size, conv: VGGSmall(num_classes, in_channels, conv),
    "mobilenetv1_bireal_025_1w1a": _mobilenet(0.25, True),
    "mobilenetv1_bireal_05_1w1a": _mobilenet(0.5, True),
    "mobilenetv1_bireal_025_noGroup_1w1a": _mobilenet(0.25, False),
    "mobilenetv1_bireal_05_noGroup_1w1a": _mobilenet(0.5, False),
}


def build(arch: str, num_classes: int, in_channels: int, image_size: int, a32: bool = False,
          w32: bool = False, react: bool = False) -> nn.Module:
    model = ARCHS[arch](num_classes, in_channels, image_size, partial(BinaryConv2d, a32=a32, w32=w32))
    if react:
        blocks = [m for m in model.modules() if isinstance(m, BinaryConvBN) and m.bireal]
        assert blocks, f"{arch} has no Bi-Real blocks for ReActNet's activations"
        for block in blocks:
            block.add_react()
    if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules()):
        with torch.no_grad():  # materialise VGG-small's classifier for this image size
            model.eval()(torch.zeros(1, in_channels, image_size, image_size))
            model.train()
    return _init(model)
