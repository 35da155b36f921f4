"""LBPNet layers, networks, paper metrics and integer engine (seed 000 section 12 and more)."""
from __future__ import annotations

import io
import threading

import pytest
import torch
import torch.nn.functional as F

from workloads.lbpnet import paper_metrics, trainkernels
from workloads.lbpnet.config import ModelConfig
from workloads.lbpnet.layers import LBPLayer, RPFusion, hard_step
from workloads.lbpnet.models import LBPNet

BLOCKS = ["residual", "macfree", "conv"]


def build(block="macfree", seed=0, **model):
    torch.manual_seed(seed)
    config = ModelConfig.model_validate({"blocks": {"block": block}, **model})
    return LBPNet(config, 1, 10, 28)


def images(n=16, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_hard_step_is_a_step_with_a_surrogate_gradient():
    x = torch.tensor([-2.0, -0.1, 0.0, 0.1, 2.0], requires_grad=True)
    y = hard_step(x, 2.0, "tanh")
    assert y.tolist() == [0, 0, 0, 1, 1]
    y.sum().backward()
    expected = (1 - torch.tanh(2.0 * x.detach()) ** 2) * 1.0
    assert torch.allclose(x.grad, expected)
    x.grad = None
    hard_step(x, 2.0, "ste").sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]  # scale/2 inside |2x| <= 1


def test_lbp_bits_match_a_direct_comparison_at_whole_pixel_offsets():
    torch.manual_seed(0)
    layer = LBPLayer(3, num_patterns=2, num_points=4, window=3, share_across_channels=False).eval()
    x = torch.randn(2, 3, 9, 9)
    bits = layer(x)
    pos = layer.integer_positions().view(3, 8, 2)
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    for c in range(3):
        for i in range(8):
            dy, dx = pos[c, i].tolist()
            shifted = xp[:, c, 2 + dy: 2 + dy + 9, 2 + dx: 2 + dx + 9]
            assert torch.equal(bits[:, c * 8 + i], (shifted > x[:, c]).float())


def test_bits_are_binary_and_deterministic():
    model = build("residual").eval()
    layer = model.blocks[1].lbp
    x = torch.randn(4, 39, 28, 28)
    a, b = layer(x), layer(x)
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert a.shape == (4, layer.num_bits, 28, 28) and layer.num_bits == 16  # shared: P·N bits


def test_gradients_reach_offsets_alpha_gates_and_are_finite():
    model = build("residual").train()
    F.cross_entropy(model(images()), torch.arange(16) % 10).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(block.lbp.offsets.grad.abs().sum() > 0 for block in model.blocks)
    assert any(block.fusion.gate_logits.grad.abs().sum() > 0 for block in model.blocks)


def test_rp_routing_shapes_and_no_multiplications_in_the_count():
    rp = RPFusion(16, 39, n_bits_per_out=4, seed=42)
    assert rp.routes.shape == (39, 4) and all(len(set(r)) == 4 for r in rp.routes.tolist())
    assert torch.equal(RPFusion(16, 39, n_bits_per_out=4, seed=42).routes, rp.routes)  # seeded
    bits = (torch.rand(2, len(rp.needed_bits), 5, 5) > 0.5).float()
    full = torch.zeros(2, 16, 5, 5)
    full[:, rp.needed_bits] = bits
    expected = full[:, rp.routes].sum(2)  # (B, C_out, H, W): popcount of the routed bits
    assert torch.equal(rp.popcount(bits), expected)
    out = rp(bits)
    assert out.shape == (2, 39, 5, 5) and torch.equal(out, (expected >= 2).float())  # threshold ceil(k/2), gates open


def test_opening_gates_never_lowers_an_output():
    rp = RPFusion(16, 8, n_bits_per_out=4, seed=1, activation="shifted_relu")
    bits = (torch.rand(3, len(rp.needed_bits), 4, 4) > 0.5).float()
    previous = None
    for value in torch.linspace(-2, 2, 9):
        with torch.no_grad():
            rp.gate_logits.fill_(value)
        out = rp(bits)
        assert previous is None or (out >= previous).all()
        previous = out


@pytest.mark.parametrize("block", BLOCKS)
def test_every_block_kind_trains_evaluates_deterministically_and_round_trips(block):
    model = build(block)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    loss = F.cross_entropy(model(images()), torch.arange(16) % 10)
    loss.backward()
    opt.step()
    model.eval()
    x = images(8, seed=1)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(first, model(x))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    clone = build(block, seed=123).eval()
    clone.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    with torch.no_grad():
        assert torch.equal(clone(x), first)


@pytest.mark.parametrize("block, fusion, k, surrogate, soft", [
    ("residual", "rp_paper", 8, "tanh", False), ("residual", "rp_paper", 4, "ste", True),
    ("macfree", "rp_paper", 4, "tanh", False), ("macfree", "rp_paper", 8, "ste", False),
    ("residual", "conv1x1", 8, "tanh", False), ("conv", "rp_paper", 8, "tanh", False)])
def test_compiled_training_loops_give_torchs_numbers_bit_for_bit(block, fusion, k, surrogate, soft, monkeypatch):
    """`trainkernels` (numba) replaces torch's operators on float32 CPU tensors: the loss and every gradient
    stay exactly what the operators give, because each sum is taken in their order."""
    model = {"blocks": {"block": block, "fusion_type": fusion, "channels_per_stage": [6, 8, 16]},
             "lbp_layer": {"surrogate": surrogate, "soft_forward": soft},
             "rp_config": {"n_bits_per_out": k, "soft_forward": soft}}

    def loss_and_grads(compiled: bool):
        monkeypatch.setattr(trainkernels, "applies", applies if compiled else lambda t: False)
        net = build(seed=3, **model)
        loss = F.cross_entropy(net(images(8, seed=2)), torch.arange(8) % 10)
        loss.backward()
        return loss, [p.grad for p in net.parameters()]

    applies = trainkernels.applies
    (loss, grads), (ref_loss, ref_grads) = loss_and_grads(True), loss_and_grads(False)
    assert torch.equal(loss, ref_loss)
    assert all(g is None and r is None or torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))


def test_compiled_loops_leave_torchs_thread_count_alone():
    """numba's OpenMP layer sets a thread's OpenMP count on first use; torch's must stay what it was (it
    decides the order of torch's parallel sums: the reference curves moved when it did)."""
    counts = []

    def step():
        torch.set_num_threads(1)
        F.cross_entropy(build("residual")(images(4)), torch.arange(4)).backward()
        counts.append(torch.get_num_threads())

    before = torch.get_num_threads()
    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
    torch.set_num_threads(before)
    assert counts == [1]


def test_bf16_autocast_stays_close_to_fp32():
    model = build("macfree", head={"pool": "flatten"}).eval()
    x = images(32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    assert (ref.argmax(1) == low.argmax(1)).float().mean() >= 0.9
    assert torch.allclose(ref, low, atol=0.1 * ref.abs().max().item())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_torchscript_trace_matches_eager():
    model = build("macfree").eval()
    x = images(4)
    traced = torch.jit.trace(model, x, check_trace=False)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x))


def test_paper_metrics_match_the_seed_for_its_full60k_network():
    """Seed 001: cmp 105,840 / add 261,072 / mul 0 (k=4); 5,472 bytes and add 571,536 (k=8)."""
    k4 = paper_metrics.measure(build("residual", rp_config={"n_bits_per_out": 4}), 28)
    assert (k4["cmp"], k4["add"], k4["mul"]) == (105_840, 261_072, 0)
    assert round(k4["gops"], 6) == 0.000367
    k8 = paper_metrics.measure(build("residual"), 28)  # the default: the seed's current k=8
    assert (k8["size_bytes"], k8["add"], round(k8["gops"], 6)) == (5_472, 571_536, 0.000677)
    one = paper_metrics.measure(build("residual", blocks={"fusion_type": "conv1x1"}), 28)
    assert one["mul"] > 0 and one["size_bytes"] > k8["size_bytes"]


def test_parameter_count_of_the_full60k_preset_and_what_the_seeds_code_adds():
    """24,394 parameters, at k=4 and k=8 alike (routes are buffers). Seed 001 reports 31,629 for the same
    config: its code (README, "Parameter count") adds, per block, a 1x1 conv aligning the shortcut's channels
    (1·39 + 39·40 + 40·80 = 4,799), an unused 1x1 conv over the 16 bits (16·159 = 2,544), unused pattern
    weights (16 per LBP layer: 48) and a residual scale (3), and has no gate parameters (159 here)."""
    import yaml

    raw = yaml.safe_load(open("workloads/lbpnet/specs/paper_mnist_rp_full60k.yaml"))["model"]
    by_part = {}
    for k in (4, 8):
        model = LBPNet(ModelConfig.model_validate({**raw, "rp_config": {**raw["rp_config"], "n_bits_per_out": k}}),
                       1, 10, 28)
        by_part = {}
        for name, p in model.named_parameters():
            part = name.rsplit(".", 1)[0].split(".")[-1] if name.startswith("blocks.") else "head"
            by_part[part] = by_part.get(part, 0) + p.numel()
        assert sum(by_part.values()) == 24_394, k
    assert by_part == {"lbp": 96 + 3, "fusion": 159, "bn": 2 * 159, "head": 80 * 256 + 256 + 2 * 256 + 256 * 10 + 10}
    channel_alignment, unused_bit_conv, pattern_weights, residual_scales = 4_799, 16 * 159, 3 * 16, 3
    seed = 24_394 - by_part["fusion"] + channel_alignment + unused_bit_conv + pattern_weights + residual_scales
    assert seed == 31_629
