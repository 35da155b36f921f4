"""LBPNet's layers (Lin et al., "Local Binary Pattern Networks", WACV 2020), vectorised.

- `hard_step`: the Heaviside step 1[x > 0] with a surrogate gradient (straight-through or tanh-relaxed).
- `LBPLayer`: local-binary-pattern comparisons with learnable sampling offsets, Eq. (1) of the paper.
- `RPFusion`: the MAC-free random-projection fusion: fixed seeded bit routing, popcount, threshold, gates.
- `Conv1x1Fusion`: the paper's 1x1-convolution fusion (the ablation with multiply-accumulates).

Bit planes are addressed by one flat index over (input channel c, pattern p, point n):
`index = (c * num_patterns + p) * num_points + n`. A fusion asks the LBP layer only for the bits it
routes (`needed_bits`); computing the others would be work whose result nobody reads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workloads.lbpnet import trainkernels

SURROGATES = ("ste", "tanh")


class _HardStep(torch.autograd.Function):
    """Forward 1[x > 0]; backward the derivative of a relaxation of the step at `scale` (a temperature's inverse).

    `ste`:  d/dx clamp((scale·x + 1) / 2, 0, 1) = scale/2 on |scale·x| <= 1 (the clipped straight-through estimator)
    `tanh`: d/dx (1 + tanh(scale·x)) / 2 = scale/2 · (1 - tanh²(scale·x))
    """

    @staticmethod
    def forward(ctx, x, scale, surrogate):
        ctx.save_for_backward(x, scale)
        ctx.surrogate = surrogate
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        slope = _surrogate_slope(scale * x, ctx.surrogate)
        grad_scale = None
        if ctx.needs_input_grad[1]:  # a learnable temperature: d/dscale of the same relaxation
            grad_scale = (grad * slope * x / 2).sum().reshape(scale.shape)
        return grad * slope * (scale / 2), grad_scale, None


def _surrogate_slope(z: torch.Tensor, surrogate: str) -> torch.Tensor:
    """2 · d/dz of the relaxed step at z: 1[|z| <= 1] (`ste`) or 1 − tanh²(z) (`tanh`)."""
    return (z.abs() <= 1).to(z.dtype) if surrogate == "ste" else 1 - torch.tanh(z).square()


def _relaxed_step(x: torch.Tensor, scale, surrogate: str) -> torch.Tensor:
    """The relaxation whose derivative `_HardStep` uses, as a value: for soft forward passes."""
    z = scale * x
    return (z.clamp(-1, 1) + 1) / 2 if surrogate == "ste" else (torch.tanh(z) + 1) / 2


def hard_step(x: torch.Tensor, scale: torch.Tensor | float, surrogate: str = "tanh") -> torch.Tensor:
    """1[x > 0] in the forward pass, a relaxed step's gradient (see `_HardStep`) in the backward pass."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return _HardStep.apply(x, scale.to(x.dtype), surrogate)


class LBPLayer(nn.Module):
    """Learnable local binary patterns, LBPNet Eq. (1): for sampling point i of a layer,

        b[i](y, x) = 1[ I_{c(i)}(y + dy[i], x + dx[i]) > I_{c(i)}(y, x) ]

    The points are num_patterns x num_points. With `share_across_channels` one set of points serves the
    whole input: point i compares pixels of input channel c(i), a fixed seeded random channel (the
    paper's random projection of sampling points onto input channels) — P·N bits. Without it every
    input channel has its own set — C·P·N bits, flat index `(c·P + p)·N + n`.

    The offsets (dy, dx) are learnable, bounded to the window by r·tanh(raw / r), r = (window - 1) / 2.
    Positions are rounded to whole pixels in every forward pass (the hard path the integer engine
    computes); as in the official LBPNet, the loss reaches an offset through the image gradient (central
    differences) at its sampling point. The comparison is hard in the forward pass (relaxed while
    `soft_forward`) and its gradient is `hard_step`'s surrogate at scale 1/alpha.

    The temperature alpha = alpha_base · alpha_scale: `alpha_base` (a buffer) is what a schedule sets
    (`alpha_init` without one); `alpha_scale` starts at 1 and is learned with `learn_alpha` (a parameter),
    else fixed — learning alpha under a schedule learns each layer's factor on the scheduled course.
    """

    def __init__(
        self, in_channels: int, num_patterns: int = 2, num_points: int = 8, window: int = 3,
        offset_init_std: float = 0.8, share_across_channels: bool = True, alpha_init: float = 0.2,
        learn_alpha: bool = True, surrogate: str = "tanh", soft_forward: bool = False,
    ):
        super().__init__()
        assert window % 2 == 1 and surrogate in SURROGATES
        self.in_channels, self.num_patterns, self.num_points, self.window = (
            in_channels, num_patterns, num_points, window)
        self.radius = (window - 1) / 2
        self.share_across_channels, self.surrogate = share_across_channels, surrogate
        tables = 1 if share_across_channels else in_channels
        raw = torch.randn(tables, num_patterns, num_points, 2) * offset_init_std
        self.offsets = nn.Parameter(raw.clamp(-self.radius, self.radius))
        channels = torch.randint(in_channels, (num_patterns * num_points,))  # from the seeded global RNG
        self.register_buffer("point_channels", channels if share_across_channels else torch.empty(0, dtype=torch.long))
        self.register_buffer("alpha_base", torch.tensor(float(alpha_init)))
        if learn_alpha:
            self.alpha_scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("alpha_scale", torch.tensor(1.0))
        self.soft_forward = soft_forward  # relaxed comparisons in the forward pass (before hardening)

    @property
    def alpha(self) -> torch.Tensor:
        return self.alpha_base * self.alpha_scale

    @property
    def num_bits(self) -> int:
        points = self.num_patterns * self.num_points
        return points if self.share_across_channels else self.in_channels * points

    def positions(self) -> torch.Tensor:
        """Offsets in pixels, (tables, P, N, 2) as (dy, dx), inside the window."""
        r = self.radius
        return r * torch.tanh(self.offsets / r)

    def integer_positions(self) -> torch.Tensor:
        """The offsets every forward pass uses: rounded to whole pixels."""
        return torch.round(self.positions().detach()).long()

    def bit_sources(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input channel, row of the flattened offset table) of each flat bit index."""
        if index is None:
            index = torch.arange(self.num_bits, device=self.offsets.device)
        if self.share_across_channels:
            return self.point_channels[index], index
        return torch.div(index, self.num_patterns * self.num_points, rounding_mode="floor"), index

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Bits (B, S, H, W) of the flat bit indices `index` (all C·P·N bits when None)."""
        channel, row = self.bit_sources(index)
        pos = self.positions().reshape(-1, 2)[row]  # (S, 2), differentiable
        b, c, h, w = x.shape
        pad = int(math.ceil(self.radius)) + 1  # +1: room for the central differences
        wp = w + 2 * pad
        rows = torch.arange(h, device=x.device).view(h, 1) + pad
        cols = torch.arange(w, device=x.device).view(1, w) + pad
        centre = (channel.view(-1, 1, 1) * ((h + 2 * pad) * wp) + rows * wp + cols).flatten(1)  # (S, H·W)
        whole = torch.round(pos.detach()).long()
        sample = centre + (whole[:, 0] * wp + whole[:, 1]).view(-1, 1)
        scale = 1.0 / self.alpha.clamp(min=1e-3)
        bits = _LBPCompare.apply(x, pos, scale.to(x.dtype), sample.flatten(), centre.flatten(), pad, self.surrogate,
                                 self.soft_forward and self.training)
        return bits.view(b, len(channel), h, w)

    def offset_penalty(self, target_radius: float | None) -> torch.Tensor:
        """Mean squared distance of the sampling radius from `target_radius` (or of the offsets from 0)."""
        radius = self.positions().norm(dim=-1)
        target = 0.0 if target_radius is None else target_radius
        return (radius - target).square().mean()


class _LBPCompare(torch.autograd.Function):
    """d = xp[sample] - xp[centre] over the flattened input xp, x padded by replication; forward 1[d > 0] (or
    its relaxation).

    Backward: dL/dd = grad · surrogate'(scale·d) · scale, which flows to x at both ends and, through the
    central-difference image gradient at the sampling point, to the (real-valued) positions. On float32
    CPU tensors compiled loops take the elementwise work and the scatters (`trainkernels`), same numbers.
    """

    @staticmethod
    def forward(ctx, x, pos, scale, sample, centre, pad, surrogate, soft):
        ctx.shape, ctx.pad, ctx.surrogate, ctx.npos = x.shape, pad, surrogate, len(pos)
        ctx.compiled = trainkernels.applies(x)
        if ctx.compiled:  # reads x through edge-clamped indices: no padded copy
            d, bits = trainkernels.compare(x, sample, centre, pad)
            ctx.save_for_backward(x, d, scale, sample, centre)
        else:
            xp = F.pad(x, (pad, pad, pad, pad), mode="replicate").flatten(1)
            d = xp.index_select(1, sample) - xp.index_select(1, centre)
            bits = (d > 0).to(xp.dtype)
            ctx.save_for_backward(xp, d, scale, sample, centre)
        return _relaxed_step(d, scale, surrogate) if soft else bits

    @staticmethod
    def backward(ctx, grad):
        saved, d, scale, sample, centre = ctx.saved_tensors  # saved: x (compiled) or x padded (operators)
        grad = grad.reshape(d.shape)
        backward = _LBPCompare.compiled if ctx.compiled else _LBPCompare.operators
        return (*backward(ctx, grad, saved, d, scale, sample, centre), None, None, None, None, None)

    @staticmethod
    def operators(ctx, grad, xp, d, scale, sample, centre):
        """(grad_x, grad_pos, grad_scale) with torch's operators."""
        (b, c, h, w), pad = ctx.shape, ctx.pad
        hp, wp = h + 2 * pad, w + 2 * pad
        slope = _surrogate_slope(scale * d, ctx.surrogate)
        g = grad * slope * (scale / 2)  # dL/dd
        grad_x = grad_pos = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_xp = torch.zeros_like(xp).index_add_(1, sample, g).index_add_(1, centre, -g)
            grad_x = torch.ops.aten.replication_pad2d_backward(grad_xp.view(b, c, hp, wp), xp.new_empty(ctx.shape),
                                                               [pad] * 4)
        if ctx.needs_input_grad[1]:
            dy = (xp.index_select(1, sample + wp) - xp.index_select(1, sample - wp)) / 2
            dx = (xp.index_select(1, sample + 1) - xp.index_select(1, sample - 1)) / 2
            per_bit = lambda t: (g * t).view(b, ctx.npos, -1).sum((0, 2))  # noqa: E731
            grad_pos = torch.stack([per_bit(dy), per_bit(dx)], 1)
        if ctx.needs_input_grad[2]:
            grad_scale = (grad * slope * d / 2).sum().reshape(scale.shape)
        return grad_x, grad_pos, grad_scale

    @staticmethod
    def compiled(ctx, grad, x, d, scale, sample, centre):
        """`operators`' numbers: the elementwise products and x's gradient in one compiled pass, the sums
        over the batch still torch's."""
        b = ctx.shape[0]
        z = scale * d
        tanh = ctx.surrogate == "tanh"
        grad_x, scale_terms, dy_terms, dx_terms = trainkernels.compare_backward(
            grad, torch.tanh(z) if tanh else z, tanh, (scale / 2).item(), d, x, sample, centre, ctx.pad,
            ctx.needs_input_grad[0])
        grad_pos = grad_scale = None
        if ctx.needs_input_grad[1]:
            per_bit = lambda t: t.view(b, ctx.npos, -1).sum((0, 2))  # noqa: E731
            grad_pos = torch.stack([per_bit(dy_terms), per_bit(dx_terms)], 1)
        if ctx.needs_input_grad[2]:
            grad_scale = scale_terms.sum().reshape(scale.shape)
        return grad_x, grad_pos, grad_scale


class RPFusion(nn.Module):
    """Random-projection fusion, MAC-free (LBPNet §3.2): for output channel o,

        popcount[o] = Σ_{j < k} bit[route[o, j]]          (k = n_bits_per_out, a fixed seeded routing)
        y[o] = gate[o] · 1[popcount[o] >= θ]             (activation "threshold")
        y[o] = gate[o] · max(popcount[o] - θ + 1, 0)     (activation "shifted_relu": how far above θ)

    with θ = ceil(k / 2) unless given, and gate[o] = 1[logit[o] > 0] whose gradient is `hard_step`'s
    surrogate at scale 1/tau. No multiply-accumulate in the forward pass: routing, additions, comparisons.
    """

    def __init__(
        self, num_bits_in: int, out_channels: int, n_bits_per_out: int = 4, seed: int = 42,
        threshold: int | None = None, activation: str = "threshold", gate_logits_init: float = 0.3,
        tau: float = 3.0, use_ste: bool = True, soft_forward: bool = False, surrogate: str = "tanh",
    ):
        super().__init__()
        assert activation in ("threshold", "shifted_relu") and 1 <= n_bits_per_out <= num_bits_in
        self.out_channels, self.k, self.activation, self.surrogate = out_channels, n_bits_per_out, activation, surrogate
        self.use_ste = use_ste
        self.soft_forward = soft_forward  # relaxed gates in the forward pass (before hardening)
        self.threshold = math.ceil(n_bits_per_out / 2) if threshold is None else int(threshold)
        generator = torch.Generator().manual_seed(seed)
        routes = torch.stack([torch.randperm(num_bits_in, generator=generator)[:n_bits_per_out]
                              for _ in range(out_channels)])
        needed, local = torch.unique(routes, return_inverse=True)
        self.register_buffer("routes", routes)  # (C_out, k) flat LBP bit indices: part of the model
        self.register_buffer("needed_bits", needed, persistent=False)  # the LBP bits to compute, sorted
        self.register_buffer("local_routes", local, persistent=False)  # routes into `needed_bits`
        self.gate_logits = nn.Parameter(torch.full((out_channels,), float(gate_logits_init)))
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.tables = self.activation_tables()  # constant: computed once, not at every step

    def gates(self) -> torch.Tensor:
        if not self.use_ste:  # gates keep their initial state
            return (self.gate_logits.detach() > 0).float()
        scale = 1.0 / self.tau.clamp(min=1e-3)
        if self.soft_forward and self.training:
            return _relaxed_step(self.gate_logits, scale, self.surrogate)
        return hard_step(self.gate_logits, scale, self.surrogate)

    def popcount(self, bits: torch.Tensor) -> torch.Tensor:
        """Σ_j bits[route[:, j]]: k whole-plane gathers added up (a loop over the k routed bits only)."""
        count = bits.index_select(1, self.local_routes[:, 0])
        for j in range(1, self.k):
            count = count + bits.index_select(1, self.local_routes[:, j])
        return count

    def forward(self, bits: torch.Tensor, binary: bool = True) -> torch.Tensor:
        """`bits`: (B, len(needed_bits), H, W), the LBP bits at `needed_bits` (0/1 unless not `binary`)."""
        gates = self.gates()
        if binary and trainkernels.applies(bits):  # count, activation and gates in one compiled pass, same numbers
            return _FusedCount.apply(bits, self.local_routes, *self.tables, gates)[0]
        y = self.activate(self.popcount(bits))
        return y * gates.view(1, -1, 1, 1).to(y.dtype)

    def counted(self, bits: torch.Tensor):
        """(y, count, nonzero) of the compiled pass (`trainkernels.fuse`) when every output is 0 or 1 (the
        threshold activation, hard gates) — what `batchnorm01` normalises from counts — else None."""
        gates = self.gates()
        hard = gates.detach()
        if self.activation != "threshold" or not bool(((hard == 0) | (hard == 1)).all()):
            return None
        return _FusedCount.apply(bits, self.local_routes, *self.tables, gates)

    def activate(self, count: torch.Tensor) -> torch.Tensor:
        if self.activation == "threshold":
            return hard_step(count - self.threshold + 0.5, 1.0, self.surrogate)
        return F.relu(count - self.threshold + 1)

    def activation_tables(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(values, slopes, scale) over the k + 1 possible counts c: the activation's value at c, and its
        gradient as `activate`'s backward computes it, (grad · slopes[c]) · scale."""
        count = torch.arange(self.k + 1, dtype=torch.float32)
        if self.activation == "shifted_relu":
            values = F.relu(count - self.threshold + 1)
            return values, (values > 0).float(), 1.0
        step = count - self.threshold + 0.5
        # each value repeated: computed on the vectorised path, as on a whole plane (a tail is not)
        slopes = _surrogate_slope(step.repeat_interleave(64), self.surrogate)[::64].contiguous()
        return (step > 0).float(), slopes, 0.5


class _FusedCount(torch.autograd.Function):
    """`activate(popcount(bits)) · gates` in compiled loops: the counts' values from a table, and the
    gradients summed in the order autograd summed those operators' (`trainkernels._fuse_backward`)."""

    @staticmethod
    def forward(ctx, bits, routes, values, slopes, scale, gates):
        y, count, nonzero = trainkernels.fuse(bits, routes, values, gates.detach())
        ctx.save_for_backward(count, routes, values, slopes, gates.detach())
        ctx.scale, ctx.planes = scale, bits.shape[1]
        ctx.mark_non_differentiable(count, nonzero)
        return y, count, nonzero

    @staticmethod
    def backward(ctx, grad, _count, _nonzero):
        count, routes, values, slopes, gates = ctx.saved_tensors
        grad_bits, gate_terms = trainkernels.fuse_backward(grad, count, values, slopes, ctx.scale, gates, routes,
                                                           ctx.planes)
        grad_gates = gate_terms.sum((0, 2, 3), keepdim=True).view(-1) if ctx.needs_input_grad[5] else None
        return grad_bits, None, None, None, None, grad_gates


class Conv1x1Fusion(nn.Module):
    """The paper's 1x1-convolution fusion of all LBP bits (with multiply-accumulates), for the ablation."""

    def __init__(self, num_bits_in: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Conv2d(num_bits_in, out_channels, 1, bias=False)
        self.needed_bits = None  # every bit

    def forward(self, bits: torch.Tensor, binary: bool = True) -> torch.Tensor:
        return self.conv(bits)  # 0/1 or relaxed bits alike
