"""CIFAR-10 networks built for eager-mode INT8 quantization, with named record points.

A *record point* is a quantized layer whose post-ReLU output is the activation TAP approximates: a small
`nn.Sequential` (conv+relu, conv+bn+relu or linear+relu) with named children, so that
`torch.ao.quantization.fuse_modules` turns it into one fused module and, after `convert`, its output is a
quint8 tensor of codes 0..255. Pooling, flattening and dropout stay outside the record points; the
classifier is quantized (INT8 linear) but is not a record point. `QuantStub` quantizes the input image,
`DeQuantStub` dequantizes the logits.

- `lenet5`: the seed's LeNet-5 — conv 3→6 5x5, pool, conv 6→16 5x5, pool, fc 400→120→84, classifier 84→10
  (62,006 parameters). Record points conv1, conv2, fc1, fc2; attention transfer at conv2, fc1.
- `alexnet`: a CIFAR AlexNet — conv 3→64 3x3 stride 2, pool, 64→192, pool, 192→384, 384→256, 256→256,
  pool (2x2 map), dropout, fc 1024→512→512, classifier 512→10 (~3.04M parameters). 7 record points.
- `vgg16`: CIFAR VGG16 — 13 conv3x3+BN+ReLU in stages [64,64 | 128,128 | 256x3 | 512x3 | 512x3], max pool
  after each stage, classifier Linear(512, 10) (~14.7M parameters). Record points conv1..conv13;
  attention transfer at the last conv of stages 3, 4, 5.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules, fuse_modules_qat


def conv_relu(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bn: bool = False) -> nn.Sequential:
    """A conv record point: conv(+BN)+ReLU with children `conv`(, `bn`), `relu` — fusable as one module."""
    layers = [("conv", nn.Conv2d(cin, cout, kernel, stride, padding, bias=not bn))]
    if bn:
        layers.append(("bn", nn.BatchNorm2d(cout)))
    return nn.Sequential(OrderedDict(layers + [("relu", nn.ReLU())]))


def linear_relu(fin: int, fout: int) -> nn.Sequential:
    """An FC record point: linear+ReLU with children `fc`, `relu`."""
    return nn.Sequential(OrderedDict([("fc", nn.Linear(fin, fout)), ("relu", nn.ReLU())]))


class QuantNet(nn.Module):
    """Shared skeleton: quant stub → `body` (a Sequential whose record points are named children) →
    flatten → `head` (a Sequential with the FC record points) → classifier → dequant stub.

    Record points are registered on the model itself (not only inside `body`/`head`) so that their module
    names are short (`conv1`, `fc1`) and `model.get_submodule(name)` finds them."""

    record_points: list[str] = []
    attention_layers: list[str] = []

    def __init__(self, body: list[tuple[str, nn.Module]], head: list[tuple[str, nn.Module]], classifier: nn.Linear):
        super().__init__()
        self.quant = QuantStub()
        for name, module in body + head:
            self.add_module(name, module)
        self._body = [name for name, _ in body]
        self._head = [name for name, _ in head]
        self.classifier = classifier
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        for name in self._body:
            x = getattr(self, name)(x)
        x = torch.flatten(x, 1)
        for name in self._head:
            x = getattr(self, name)(x)
        return self.dequant(self.classifier(x))


class LeNet5(QuantNet):
    record_points = ["conv1", "conv2", "fc1", "fc2"]
    attention_layers = ["conv2", "fc1"]

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        body = [("conv1", conv_relu(in_channels, 6, 5)), ("pool1", nn.MaxPool2d(2)),
                ("conv2", conv_relu(6, 16, 5)), ("pool2", nn.MaxPool2d(2))]
        head = [("fc1", linear_relu(16 * 5 * 5, 120)), ("fc2", linear_relu(120, 84))]
        super().__init__(body, head, nn.Linear(84, num_classes))


class AlexNet(QuantNet):
    record_points = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2"]
    attention_layers = ["conv5", "fc1"]

    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 512):
        body = [("conv1", conv_relu(in_channels, 64, 3, 2, 1)), ("pool1", nn.MaxPool2d(2)),
                ("conv2", conv_relu(64, 192, 3, 1, 1)), ("pool2", nn.MaxPool2d(2)),
                ("conv3", conv_relu(192, 384, 3, 1, 1)), ("conv4", conv_relu(384, 256, 3, 1, 1)),
                ("conv5", conv_relu(256, 256, 3, 1, 1)), ("pool5", nn.MaxPool2d(2))]
        head = [("drop1", nn.Dropout(0.5)), ("fc1", linear_relu(256 * 2 * 2, hidden)),
                ("drop2", nn.Dropout(0.5)), ("fc2", linear_relu(hidden, hidden))]
        super().__init__(body, head, nn.Linear(hidden, num_classes))


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(QuantNet):
    record_points = [f"conv{i}" for i in range(1, 14)]
    attention_layers = ["conv7", "conv10", "conv13"]

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        body, channels, conv, pool = [], in_channels, 0, 0
        for width in VGG16_CFG:
            if width == "M":
                pool += 1
                body.append((f"pool{pool}", nn.MaxPool2d(2)))
            else:
                conv += 1
                body.append((f"conv{conv}", conv_relu(channels, width, 3, 1, 1, bn=True)))
                channels = width
        super().__init__(body, [], nn.Linear(512, num_classes))


ARCHS: dict[str, type[QuantNet]] = {"lenet5": LeNet5, "alexnet": AlexNet, "vgg16": VGG16}


def build(arch: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A fresh float network of `arch` (one of `ARCHS`)."""
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown {arch!r}; one of {sorted(ARCHS)}")
    return ARCHS[arch](num_classes=num_classes, in_channels=in_channels)


def fuse(model: nn.Module, qat: bool | None = None) -> nn.Module:
    """Fuse every record point in place (conv[+bn]+relu, linear+relu) and return the model.

    For QAT (`qat=True`, the default when the model is in train mode) `fuse_modules_qat` keeps BN as part
    of a ConvBnReLU2d whose folding `prepare_qat` simulates; otherwise `fuse_modules` folds BN into the
    conv weights, which requires eval mode."""
    qat = model.training if qat is None else qat
    groups = [[f"{name}.{child}" for child, _ in model.get_submodule(name).named_children()]
              for name in model.record_points]
    (fuse_modules_qat if qat else fuse_modules)(model, groups, inplace=True)
    return model
