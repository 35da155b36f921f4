"""Rotated Binary Neural Network layers (Lin et al., "Rotated Binary Neural Network", NeurIPS 2020).

- `sign_approx`: sign(x) forward; the training-aware approximation's gradient backward (Eq. 13):
      d sign(x)/dx ≈ k · max(0, √2·t − t²·|x|)
  with t annealed from Tmin to Tmax over training and k = max(1/t, 1).
- `BinaryConv2d`: a convolution whose weight is standardised, bi-rotated (R1ᵀ X R2, Eq. 4, R1 and R2
  orthogonal of sizes a x a and b x b with a·b = Cin·k·k the divisor pair closest to a square), adjusted by
  a learnable angle per output channel (Eq. 10: w' = w + |sin θ|·(R1ᵀ X R2 − w)), binarized, convolved
  with binarized activations (or real ones with `a32`) and scaled per output channel (learnable).
  `update_rotation` runs the alternating optimisation of Eq. 6-8 (B, then R1 by an SVD, then R2), batched
  over output channels.
"""
from __future__ import annotations

import math
from functools import partial

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# CPU kernels: serial numba passes for the elementwise work binarizing adds to a convolution. Each torch op is a
# parallel region of its own; on a loaded 2-core machine the threads' hand-offs cost more than the arithmetic.
# Each float32 operation is rounded as torch's op rounds it (no fast-math, so no fused multiply-add): the
# results are bit for bit those of the torch expressions, which stay the path on GPUs and in double backward.


@numba.njit(cache=True)
def _sign_kernel(x, out):
    one, zero = np.float32(1), np.float32(0)
    for i in range(x.size):
        out[i] = (one if x[i] > zero else zero) - (one if x[i] < zero else zero)  # torch.sign's formula


@numba.njit(cache=True)
def _sign_grad_kernel(grad, x, a, c, k, clip, out):
    zero, one = np.float32(0), np.float32(1)
    for i in range(x.size):
        if clip and (x[i] <= -one or x[i] >= one):  # hardtanh_backward's test (NaN passes, as there)
            out[i] = zero
            continue
        d = a - c * abs(x[i])
        out[i] = grad[i] * (k * (zero if d < zero else d))


# FUSED_BACKWARD: sign's gradient as a single pass (one instead of six over each activation). CPU_KERNELS: the
# forward's sign, one serial pass against torch's one parallel pass.
FUSED_BACKWARD = True
CPU_KERNELS = False


def _numba_takes(*tensors: torch.Tensor, backward: bool = False) -> bool:
    return (FUSED_BACKWARD if backward else CPU_KERNELS) and not torch.is_grad_enabled() and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().view(-1).numpy()


def _sign(x: torch.Tensor) -> torch.Tensor:
    if not _numba_takes(x):
        return torch.sign(x)
    out = torch.empty_like(x)
    _sign_kernel(_flat(x), _flat(out))
    return out


def _sign_grad(grad: torch.Tensor, x: torch.Tensor, t: torch.Tensor, k: torch.Tensor, clip: bool) -> torch.Tensor:
    """grad · k·max(0, √2·t − t²·|x|): one pass instead of six. With `clip`, x is hardtanh's input and the
    result hardtanh's gradient of it: zero where |x| ≥ 1, where inside hardtanh(x) = x."""
    a, c = math.sqrt(2.0) * t, t.square()  # 0-dim float32, as the torch expression computes them
    if not (_numba_takes(grad, x, backward=True) and grad.shape == x.shape):
        grad = grad * (k * (a - c * x.abs()).clamp(min=0))
        return torch.ops.aten.hardtanh_backward(grad, x, -1.0, 1.0) if clip else grad
    out = torch.empty_like(x)
    _sign_grad_kernel(_flat(grad), _flat(x), np.float32(a.item()), np.float32(c.item()), np.float32(k.item()),
                      clip, _flat(out))
    return out


class _SignApprox(torch.autograd.Function):
    """sign(x), or sign(hardtanh(x)) = sign(x) with `clip` (hardtanh's gradient fused into sign's)."""

    @staticmethod
    def forward(ctx, x, t, k, clip):
        ctx.save_for_backward(x, t, k)
        ctx.clip = clip
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        x, t, k = ctx.saved_tensors
        return _sign_grad(grad, x, t, k, ctx.clip), None, None, None


def sign_approx(x: torch.Tensor, t: torch.Tensor, k: torch.Tensor, clip: bool = False) -> torch.Tensor:
    """sign(x) with the approximate gradient; with `clip`, of hardtanh(x) (its gradient included)."""
    return _SignApprox.apply(x, t.to(x.dtype), k.to(x.dtype), clip)


def divisor_pair(n: int) -> tuple[int, int]:
    """(a, b) with a·b = n and a the largest divisor not above √n."""
    a = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    return a, n // a


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix with the signs of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


class BinaryConv2d(nn.Conv2d):
    """1-bit weights (rotated, then sign, unless `w32`) and 1-bit activations (sign, unless `a32`), scaled
    per channel. `clip_input`: the input goes through hardtanh first, fused into the activations' sign
    (hardtanh leaves the sign unchanged and zeroes its gradient beyond |x| = 1; one pass less each way)."""

    def __init__(self, *args, a32: bool = False, w32: bool = False, clip_input: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.a32, self.w32, self.clip_input = a32, w32, clip_input
        fan_in = self.weight[0].numel()
        self.a, self.b = divisor_pair(fan_in)
        self.register_buffer("R1", random_orthogonal(self.a))
        self.register_buffer("R2", random_orthogonal(self.b))
        self.register_buffer("t", torch.tensor(0.1))
        self.register_buffer("k", torch.tensor(10.0))
        scale = self.weight.detach().abs().flatten(1).mean(1).view(-1, 1, 1, 1)
        self.scale = nn.Parameter(scale)  # per output channel, learnable
        self.rotate = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) * math.pi / 2)  # θ of Eq. 10

    def standardised(self) -> torch.Tensor:
        """The weight with zero mean and unit std per output channel, as (O, a, b)."""
        w = self.weight.flatten(1)
        w = (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True).clamp(min=1e-8)
        return w.view(-1, self.a, self.b)

    def rotated_weight(self) -> torch.Tensor:
        """w + |sin θ|·(R1ᵀ X R2 − w): the real weight that is binarized."""
        x = self.standardised()
        rotated = (self.R1.t() @ x.detach() @ self.R2).detach()
        mix = torch.sin(self.rotate).abs().view(-1, 1, 1)
        return (x + mix * (rotated - x)).view_as(self.weight)

    def binary_weight(self) -> torch.Tensor:
        """sign of the rotated weight (the rotated weight itself with `w32`, ReActNet's first stage)."""
        weight = self.rotated_weight()
        return weight if self.w32 else sign_approx(weight, self.t, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.a32:
            x = sign_approx(x, self.t, self.k, self.clip_input)
        elif self.clip_input:
            x = F.hardtanh(x)
        weight, conv = self.binary_weight(), partial(F.conv2d, stride=self.stride, padding=self.padding,
                                                     dilation=self.dilation, groups=self.groups)
        if self.training:
            # conv(x, W)·s = conv(x, W·s) per output channel: the scale folded into the weight is one
            # weight-sized product in place of an activation-sized pass each way (the same function, its
            # sums rounded in another order)
            scaled = self.scale.view(-1)
            return conv(x, weight * self.scale, None if self.bias is None else self.bias * scaled)
        # eval: the sums (integers, with binary activations) scaled after the convolution, one rounding, as
        # the XNOR engine scales them: its predictions equal the model's
        return conv(x, weight, self.bias) * self.scale.view(1, -1, 1, 1)

    @torch.no_grad()
    def quantization_error(self) -> float:
        """‖sign(R1ᵀ X R2) − R1ᵀ X R2‖²_F averaged over output channels: what the rotation minimises."""
        v = self.R1.t() @ self.standardised() @ self.R2
        return (torch.sign(v) - v).square().sum((1, 2)).mean().item()

    @torch.no_grad()
    def update_rotation(self, iterations: int = 3, svd_device: str = "cpu") -> tuple[float, float]:
        """Alternate B = sign(R1ᵀXR2), R1 and R2 by SVD (Eq. 6-8), batched over the O output channels.

        R1 = V1·U1ᵀ with U1 S1 V1ᵀ = Σ_i B_i R2ᵀ X_iᵀ;  R2 = U2·V2ᵀ with U2 S2 V2ᵀ = Σ_i X_iᵀ R1 B_i.
        Returns the quantization error before and after.
        """
        before = self.quantization_error()
        x = self.standardised()
        device = self.R1.device if svd_device == "device" else torch.device("cpu")
        for _ in range(iterations):
            b = torch.sign(self.R1.t() @ x @ self.R2)
            u1, _, v1h = torch.linalg.svd((b @ self.R2.t() @ x.transpose(1, 2)).sum(0).to(device))
            self.R1.copy_((v1h.t() @ u1.t()).to(self.R1))
            u2, _, v2h = torch.linalg.svd((x.transpose(1, 2) @ self.R1 @ b).sum(0).to(device))
            self.R2.copy_((u2 @ v2h).to(self.R2))
        return before, self.quantization_error()


def binary_convs(model: nn.Module) -> list[BinaryConv2d]:
    return [m for m in model.modules() if isinstance(m, BinaryConv2d)]
