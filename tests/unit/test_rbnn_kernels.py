"""RBNN's CPU kernels (the backward's fused passes, `layers.FUSED_BACKWARD`, on by default; the forward's,
`layers.CPU_KERNELS`, off): their outputs and gradients equal the torch ops' bit for bit."""
from __future__ import annotations

import math

import pytest
import torch

from workloads.rbnn.layers import BinaryConv2d, sign_approx


@pytest.mark.parametrize("t", [1e-3, 0.1, 1.0, 10.0])
def test_fused_sign_gradient_equals_the_torch_expression_bit_for_bit(t, monkeypatch):
    """The CPU backward is one numba pass; it must round exactly as the torch ops it replaces. Activation-
    and weight-shaped, with zeros and the clip edges."""
    from workloads.rbnn import layers

    monkeypatch.setattr(layers, "FUSED_BACKWARD", True)
    torch.manual_seed(0)
    t_, k_ = torch.tensor(t), torch.tensor(max(1 / t, 1.0))
    for shape in [(8, 16, 12, 12), (64, 64, 3, 3), (5,)]:
        x = torch.randn(shape) * 3
        x.view(-1)[:5] = torch.tensor([0.0, -0.0, 1.0, -1.0, math.sqrt(2) / t])
        x.requires_grad_()
        grad = torch.randn(shape)
        sign_approx(x, t_, k_).backward(grad)
        expected = grad * (k_ * (math.sqrt(2.0) * t_ - t_.square() * x.detach().abs()).clamp(min=0))
        assert torch.equal(x.grad.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("a32", [False, True])
def test_numba_kernels_give_the_torch_paths_results_bit_for_bit(monkeypatch, a32):
    """A binary conv's output and every gradient with the CPU kernels equal those of the torch ops (the path
    on GPUs), bit for bit: NaN-free inputs with exact zeros, t where the gradient's clip acts."""
    from workloads.rbnn import layers

    def run():
        torch.manual_seed(0)
        conv = BinaryConv2d(16, 32, 3, 1, 1, bias=False, a32=a32)
        conv.t.fill_(2.0), conv.k.fill_(1.0)
        x = torch.randn(4, 16, 8, 8)
        x[0, 0, 0, :4] = torch.tensor([0.0, -0.0, 1.0, -1.0])
        x.requires_grad_()
        out = conv(x)
        out.backward(torch.randn_like(out))
        return [out, x.grad] + [p.grad for p in conv.parameters()]

    results = []
    for on in (True, False):  # the backward's kernels are on by default, the forward's off (see layers.py)
        monkeypatch.setattr(layers, "CPU_KERNELS", on)
        monkeypatch.setattr(layers, "FUSED_BACKWARD", on)
        results.append(run())
    for a, b in zip(*results):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_a_training_steps_gradients_are_the_torch_ops_with_the_fused_backward(monkeypatch):
    """Every gradient of a resnet20_1w1a step, on the threads torch has here: the backward's kernels
    (the default) against the torch ops, bit for bit."""
    from workloads.rbnn import layers
    from workloads.rbnn.models import build

    def grads():
        torch.manual_seed(0)
        model = build("resnet20_1w1a", 10, 3, 16)
        for conv in layers.binary_convs(model):
            conv.t.fill_(0.7), conv.k.fill_(1.4)
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return [p.grad for p in model.parameters()]

    fused = grads()
    monkeypatch.setattr(layers, "FUSED_BACKWARD", False)
    for a, b in zip(fused, grads()):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("fused", [True, False])
def test_clipped_sign_is_hardtanh_then_sign(fused, monkeypatch):
    """`clip` (a binary conv's `clip_input`) fuses hardtanh into sign: the output and the input's gradient
    are those of sign_approx(hardtanh(x)) bit for bit, at the clip edges and beyond them too."""
    from workloads.rbnn import layers

    monkeypatch.setattr(layers, "FUSED_BACKWARD", fused)
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6) * 2
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5])
    t, k, grad = torch.tensor(0.5), torch.tensor(2.0), torch.randn(4, 8, 6, 6)
    fused_in, plain_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = sign_approx(fused_in, t, k, clip=True)
    out.backward(grad)
    expected = sign_approx(torch.nn.functional.hardtanh(plain_in), t, k)
    expected.backward(grad)
    for a, b in [(out, expected), (fused_in.grad, plain_in.grad)]:
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
