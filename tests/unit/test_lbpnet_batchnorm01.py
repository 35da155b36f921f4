"""`batchnorm01`: BatchNorm2d's training forward on 0/1 maps from counts equals torch's, bit for bit."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from workloads.lbpnet import batchnorm01
from workloads.lbpnet.config import ModelConfig
from workloads.lbpnet.models import LBPNet


def test_fused_multiply_add_rounds_once():
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(3000).astype(np.float32) for _ in range(3))
    got = batchnorm01._fma32(a, b, c)
    for i in range(0, 3000, 7):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        near = np.float32(float(exact))
        candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
        best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.int32)) & 1))
        assert got[i] == best


def test_statistics_equal_torchs_also_where_the_closed_form_is_not_exact():
    """Channel 0 holds a few ones among many zeros: its squared deviations span too many binary digits
    for the closed form, so it is summed in torch's order."""
    generator = torch.Generator().manual_seed(0)
    density = torch.tensor([0.001, 0.3, 0.0, 1.0, 0.97, 0.5])
    y = (torch.rand(64, 6, 20, 20, generator=generator) < density.view(1, -1, 1, 1)).float()
    count, one_table = y.to(torch.uint8), np.array([[False, True]] * 6)
    n = y.numel() // 6
    ones = y.sum((0, 2, 3)).long().numpy()
    share = (ones / n).astype(np.float32)
    assert not batchnorm01._exact(n - ones, share * share, ones, (np.float32(1) - share) ** 2, n)[0]
    mean, var_sum = batchnorm01.statistics(ones, count, one_table, n)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(y, None, None, None, None, True, 0.1, 1e-5)
    assert torch.equal(torch.from_numpy(mean), save_mean)
    invstd = (1.0 / np.sqrt((var_sum / np.float32(n)).astype(np.float64) + 1e-5)).astype(np.float32)
    assert torch.equal(torch.from_numpy(invstd), save_invstd)


def test_the_residual_networks_bn_runs_from_counts_and_checks_itself():
    torch.manual_seed(0)
    model = LBPNet(ModelConfig.model_validate({"blocks": {"block": "residual"}, "rp_config": {"n_bits_per_out": 8}}),
                   1, 10, 28)
    F.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.arange(8)).backward()
    assert batchnorm01._TRUSTED  # checked against torch's BatchNorm on its first batch, and passed
