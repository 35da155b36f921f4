"""INT8 QAT and conversion, record-point capture and histograms, the TAP student, attention transfer.

Eager-mode `torch.ao.quantization`: a float network from `models.py` is fused (record points become
ConvReLU2d / ConvBnReLU2d / LinearReLU), given the `ENGINE` QAT qconfig and prepared for QAT (fake-quant
of weights and activations in train mode), then converted to a quantized network whose record points
output quint8 tensors: the codes c = round(y / scale) + zero_point, zero_point = 0 after a fused ReLU.

Quantization: activations per-tensor affine quint8 over the full range 0..255 (no reduce_range), weights
per-channel symmetric qint8 (`QCONFIG`). The INT8 kernels are QNNPACK's (`ENGINE`): on CPUs without VNNI
the x86/fbgemm/onednn kernels multiply u8·s8 pairs into saturating int16 sums — which is why their default
qconfigs use reduce_range, activation codes 0..127 only, half the code range TAP works on — and with
full-range activations their outputs can drift from a float reference of the same integer arithmetic
(57 codes on a worst-case conv measured on an AVX2 machine); QNNPACK accumulates in int32 and matches it
to one code of rounding. `convert_int8` selects the engine (process-global); run INT8 networks under it.

The TAP student is the teacher's INT8 network with forward hooks (`apply_tap`) that replace each record
point's codes by TAP(codes) at the same scale and zero point; attention transfer compares the two
networks' attention maps (Zagoruyko & Komodakis, ICLR 2017) at the model's `attention_layers`.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic import qat as nniqat

from workloads.tap_ppo.models import build, fuse
from workloads.tap_ppo.tap import TapCodes, tap_map

ENGINE = "qnnpack"
NUM_CODES = 256
QCONFIG = tq.QConfig(
    activation=tq.FusedMovingAvgObsFakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=NUM_CODES - 1, dtype=torch.quint8,
        qscheme=torch.per_tensor_affine),
    weight=tq.default_fused_per_channel_wt_fake_quant)


def use_engine(engine: str = ENGINE) -> None:
    """Select the quantized kernels that pack (at convert) and run the INT8 network."""
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"engine: {engine!r} not supported by this torch "
                         f"({torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = engine


def prepare_qat(float_model: nn.Module) -> nn.Module:
    """A QAT copy of `float_model` (weights included): fused for QAT, qconfig set, fake-quant inserted."""
    model = copy.deepcopy(float_model).train()
    fuse(model, qat=True)
    model.qconfig = QCONFIG
    return tq.prepare_qat(model, inplace=True)


def qat_from_float(arch: str, float_state_dict: dict, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build `arch`, load the float weights of an ordinary (unfused) training run, prepare for QAT.

    Fusing after loading is what lets a plain float checkpoint (keys `conv1.conv.weight`, `conv1.bn.*`) load."""
    model = build(arch, num_classes, in_channels)
    model.load_state_dict(float_state_dict)
    return prepare_qat(model)


def freeze(qat_model: nn.Module) -> nn.Module:
    """Stop observers and BN statistics in place (the usual last QAT epochs, and before evaluating
    fake-quant): evaluation then neither moves the quantization ranges nor the BN statistics."""
    qat_model.apply(tq.disable_observer)
    qat_model.apply(nniqat.freeze_bn_stats)
    return qat_model


def convert_int8(qat_model: nn.Module) -> nn.Module:
    """The INT8 network of a QAT network: an eval copy with every fake-quantized module replaced by its
    quantized kernel (weights packed for `ENGINE`)."""
    use_engine()
    model = copy.deepcopy(qat_model).eval()
    return tq.convert(model, inplace=True)


def output_codes(t: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of a record point's quint8 output."""
    assert t.dtype == torch.quint8, f"record points output quint8, got {t.dtype}"
    return t.int_repr()


class RecordPoints:
    """Context manager capturing the outputs of named modules of a model at every forward.

    `outputs[name]` is the latest output (quint8 on a converted network, float on a float/QAT one).
    Hooks run in registration order and each sees the previous one's replacement, so a `RecordPoints`
    entered inside `apply_tap` records the TAP-mapped outputs."""

    def __init__(self, model: nn.Module, layers: Iterable[str]):
        self.model, self.layers = model, list(layers)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def __enter__(self) -> RecordPoints:
        self._handles = [self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _inputs(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def histograms(int8_model: nn.Module, batches: Iterable, layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """256-bin int64 histograms of each record point's output codes over the calibration batches
    (batches of images or of (images, labels))."""
    layers = list(layers)
    hists = {name: torch.zeros(NUM_CODES, dtype=torch.int64) for name in layers}
    with RecordPoints(int8_model, layers) as rec:
        for batch in batches:
            int8_model(_inputs(batch))
            for name in layers:
                codes = output_codes(rec.outputs[name]).flatten().to(torch.int64)
                hists[name] += torch.bincount(codes, minlength=NUM_CODES).cpu()
    return hists


def _tap_hook(c: TapCodes):
    def hook(module, inputs, output):
        mapped = tap_map(output_codes(output), c)
        return torch._make_per_tensor_quantized_tensor(mapped, output.q_scale(), output.q_zero_point())
    return hook


@contextmanager
def apply_tap(int8_model: nn.Module, codes: dict[str, TapCodes]):
    """Within the block, each named record point of the INT8 network outputs TAP(codes) — exact codes at
    the original scale and zero point — instead of its codes: the TAP student."""
    handles = [int8_model.get_submodule(name).register_forward_hook(_tap_hook(c)) for name, c in codes.items()]
    try:
        yield int8_model
    finally:
        for handle in handles:
            handle.remove()


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' activation-based attention, Q / ||Q||_2 per sample, with
    Q = mean_c |f_c|^2 flattened to (N, H*W) for an (N, C, H, W) feature and Q = f^2 for an (N, F) one.
    Quantized features are dequantized first."""
    f = feature.dequantize() if feature.is_quantized else feature
    if f.dim() == 4:
        q = f.float().pow(2).mean(1).flatten(1)
    elif f.dim() == 2:
        q = f.float().pow(2)
    else:
        raise ValueError(f"feature: expected a 2-D or 4-D tensor, got shape {tuple(f.shape)}")
    return F.normalize(q, p=2, dim=1)


def attention_loss(teacher_feats: dict, student_feats: dict, layers: Iterable[str]) -> torch.Tensor:
    """Attention-transfer distance: mean over layers of mean_n || a_t(n) - a_s(n) ||_2 — the p = 2 norm
    (not squared) of the difference of the normalised maps, as in Zagoruyko & Komodakis' Eq. (2)."""
    layers = list(layers)
    if not layers:
        raise ValueError("layers: at least one attention layer is needed")
    distances = [(attention_map(teacher_feats[n]) - attention_map(student_feats[n])).norm(p=2, dim=1).mean()
                 for n in layers]
    return torch.stack(distances).mean()


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable) -> float:
    """Top-1 accuracy in percent over (images, labels) batches, in eval mode (the model's mode is restored).
    On a QAT network call `freeze` first, or its observers keep moving with the evaluated data."""
    was_training, correct, total = model.training, 0, 0
    model.eval()
    try:
        for images, labels in batches:
            correct += int((model(images).argmax(1) == labels).sum())
            total += labels.numel()
    finally:
        model.train(was_training)
    return 100.0 * correct / max(total, 1)
