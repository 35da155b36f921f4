"""RBNN: the sign approximation, bi-rotation and its update, the binary forward, models and callbacks."""
from __future__ import annotations

import math

import pytest
import torch

from bitfleet.engine.callbacks import TrainState
from workloads.rbnn import callbacks as cb
from workloads.rbnn.layers import BinaryConv2d, binary_convs, divisor_pair, sign_approx
from workloads.rbnn.models import ARCHS, build


@pytest.mark.parametrize("t", [0.01, 0.5, 1.0, 10.0])
def test_sign_approximation_gradient_is_its_formula(t):
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    t_, k_ = torch.tensor(t), torch.tensor(max(1 / t, 1.0))
    y = sign_approx(x, t_, k_)
    assert torch.equal(y, torch.sign(x.detach()))
    y.backward(torch.ones_like(x))
    expected = max(1 / t, 1.0) * torch.clamp(math.sqrt(2) * t - t**2 * x.detach().abs(), min=0)
    assert torch.allclose(x.grad, expected)


def test_divisor_pair_is_the_closest_to_a_square():
    assert divisor_pair(16 * 9) == (12, 12) and divisor_pair(3 * 9) == (3, 9) and divisor_pair(7) == (1, 7)


def conv(cin=16, cout=8, a32=False):
    torch.manual_seed(0)
    return BinaryConv2d(cin, cout, 3, 1, 1, bias=False, a32=a32)


def test_rotation_update_keeps_orthogonality_and_lowers_the_quantization_error():
    layer = conv()
    for _ in range(3):
        before, after = layer.update_rotation(iterations=3)
        assert after <= before + 1e-4
        for r in (layer.R1, layer.R2):
            assert torch.allclose(r @ r.t(), torch.eye(len(r)), atol=1e-4)
    first, _ = conv().update_rotation(iterations=1)
    assert after < first  # several updates: lower than the random rotation's error


def test_batched_rotation_update_equals_the_per_channel_loop_of_the_paper():
    layer = conv()
    x = layer.standardised().detach()
    r1, r2 = layer.R1.clone(), layer.R2.clone()
    b = torch.sign(r1.t() @ x @ r2)
    d1 = sum(bi @ r2.t() @ xi.t() for bi, xi in zip(b, x))  # the official loop over output channels
    u1, _, v1 = torch.svd(d1)
    r1 = v1 @ u1.t()
    d2 = sum(xi.t() @ r1 @ bi for xi, bi in zip(x, b))
    u2, _, v2 = torch.svd(d2)
    r2 = u2 @ v2.t()
    layer.update_rotation(iterations=1)
    assert torch.allclose(layer.R1, r1, atol=1e-4) and torch.allclose(layer.R2, r2, atol=1e-4)


def test_binary_forward_uses_plus_minus_one_weights_and_activations():
    layer = conv()
    assert set(layer.binary_weight().unique().tolist()) <= {-1.0, 1.0}
    x = torch.randn(2, 16, 5, 5)
    out = layer(x)
    ref = torch.nn.functional.conv2d(torch.sign(x), layer.binary_weight(), padding=1) * layer.scale.view(1, -1, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    real = conv(a32=True)
    ref32 = torch.nn.functional.conv2d(x, real.binary_weight(), padding=1) * real.scale.view(1, -1, 1, 1)
    assert torch.allclose(real(x), ref32, atol=1e-5)


def test_gradients_reach_weights_scales_and_angles():
    layer = conv()
    layer(torch.randn(2, 16, 5, 5)).square().sum().backward()
    for p in (layer.weight, layer.scale, layer.rotate):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_keeps_first_and_last_layers_real(arch):
    model = build(arch, 10, 3, 32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not isinstance(convs[0], BinaryConv2d)  # the stem
    assert not any(isinstance(m, BinaryConv2d) for m in model.modules() if isinstance(m, torch.nn.Linear))
    share = sum(c.weight.numel() for c in binary_convs(model)) / sum(p.numel() for p in model.parameters())
    assert share > 0.9


def test_imagenet_resnets_are_chosen_by_image_size():
    small, large = build("resnet18_1w1a", 10, 3, 32), build("resnet18_1w1a", 1000, 3, 224)
    assert small.stem[0].kernel_size == (3, 3) and large.stem[0].kernel_size == (7, 7)
    assert large(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("arch", ["resnet18_1w1a", "resnet34_1w1a"])
@pytest.mark.parametrize("size", [72, 100, 160])
def test_imagenet_resnets_take_crops_other_than_224(arch, size):
    # odd feature maps after a strided stage: the downsampling shortcut must keep the strided conv's size
    model = build(arch, 12, 3, size)
    assert model.stem[0].kernel_size == (7, 7)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 12)


def state_for(model, epochs=10):
    return TrainState(model, None, epochs=epochs)


def test_temperature_is_log_linear_from_tmin_to_tmax():
    model = build("resnet20_1w1a", 10, 3, 32)
    callback, state = cb.Temperature(1e-2, 10.0), state_for(model)
    for epoch, t in [(0, 1e-2), (5, 10 ** -0.5)]:
        state.epoch = epoch
        callback.on_epoch_start(state)
        layer = binary_convs(model)[0]
        assert (math.isclose(layer.t.item(), t, rel_tol=1e-5)
                and math.isclose(layer.k.item(), max(1 / t, 1), rel_tol=1e-5))


def test_rotation_callback_runs_every_n_epochs_and_reports_errors():
    model = build("resnet20_1w1a", 10, 3, 32)
    callback, state = cb.Rotation(2, 1, "cpu", bn_only_from=10), state_for(model)
    before = binary_convs(model)[0].R1.clone()
    state.epoch = 1
    callback.on_epoch_start(state)
    assert torch.equal(binary_convs(model)[0].R1, before) and not state.metrics
    state.epoch = 2
    callback.on_epoch_start(state)
    assert not torch.equal(binary_convs(model)[0].R1, before)
    assert state.metrics["rbnn/rotation_error_after"] <= state.metrics["rbnn/rotation_error_before"]


def test_bn_only_stage_fixes_everything_but_batchnorm(tmp_path):
    model = build("resnet20_1w1a", 10, 3, 32)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    callback, state = cb.BNOnly(start=1), state_for(model)
    state.epoch = 1
    callback.on_epoch_start(state)
    weight, bn = binary_convs(model)[0].weight.detach().clone(), model.stem[1].weight.detach().clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    callback.on_step_end(state)
    assert torch.equal(binary_convs(model)[0].weight, weight) and not torch.equal(model.stem[1].weight, bn)


def test_telemetry_reports_flips_angles_and_writes_histograms(tmp_path):
    model = build("resnet20_1w1a", 10, 3, 32)
    callback, state = cb.Telemetry(hist_every=1, run_path=str(tmp_path)), state_for(model)
    callback.on_epoch_end(state, {})
    assert "rbnn/flip_ratio" not in state.metrics and 0 < state.metrics["rbnn/sin_theta"] <= 1
    with torch.no_grad():
        binary_convs(model)[0].weight.neg_()
    state.epoch = 1
    callback.on_epoch_end(state, {})
    assert 0 < state.metrics["rbnn/flip_ratio"] < 1
    assert (tmp_path / "weight_hist" / "epoch_0001.png").stat().st_size > 0


def test_w32_keeps_real_weights_and_binary_activations():
    layer = BinaryConv2d(16, 8, 3, 1, 1, bias=False, w32=True)
    x = torch.randn(2, 16, 5, 5)
    weight = layer.rotated_weight()
    assert len(weight.unique()) > 2
    ref = torch.nn.functional.conv2d(torch.sign(x), weight, padding=1) * layer.scale.view(1, -1, 1, 1)
    assert torch.allclose(layer(x), ref, atol=1e-5)


def reactnet_spec(tmp_path, checkpoint_dir, **teacher):
    from bitfleet.resolve import validate_spec

    raw = {
        "name": "reactnet", "workload": "rbnn", "model": {"arch": "mobilenetv1_bireal_025_1w1a", "w32": True},
        "data": {"dataset": "mnist_sample"}, "storage_path": str(tmp_path),
        "rbnn": {"teacher": {"workload": "resnet_cifar", "model": {"arch": "resnet20"},
                             "checkpoint": str(checkpoint_dir), **teacher}},
    }
    return validate_spec(raw)


def test_teacher_gives_the_distributional_loss(tmp_path):
    from bitfleet import registry
    from bitfleet.data import info
    from bitfleet.engine import checkpoint
    from bitfleet.engine.callbacks import RunContext
    from bitfleet.spec import DataSpec
    from workloads.resnet_cifar import models as float_models

    teacher = float_models.build("resnet20", "A", num_classes=10, in_channels=1)
    checkpoint.save(tmp_path, {"model": teacher.state_dict(), "ema": None})
    spec = reactnet_spec(tmp_path, tmp_path)
    data = info(DataSpec(dataset="mnist_sample"))
    workload = registry.get("rbnn", spec.options)
    workload.setup(RunContext(spec.train.epochs, str(spec.run_dir), spec.data, data))
    student = workload.build_model(spec.model, data)
    images, labels = torch.randn(4, 1, 28, 28), torch.arange(4)
    loss, logits = workload.train_step(student, images, labels, torch.nn.CrossEntropyLoss())
    with torch.no_grad():
        target = torch.softmax(teacher.eval()(images), 1)
    expected = (target * (target.log() - torch.log_softmax(logits, 1))).sum(1).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in workload.teacher.parameters())


@pytest.mark.parametrize("teacher, field", [({"workload": "rbnn"}, "rbnn.teacher.workload"),
                                            ({"model": {"arch": "resnet21"}}, "model.arch")])
def test_bad_teachers_are_refused_before_any_run(tmp_path, teacher, field):
    from bitfleet.errors import SpecError

    (tmp_path / "state.pt").write_bytes(b"")
    with pytest.raises(SpecError, match=field):
        reactnet_spec(tmp_path, tmp_path, **teacher)


def test_missing_teacher_checkpoint_names_the_field(tmp_path):
    from bitfleet.errors import SpecError

    with pytest.raises(SpecError, match="rbnn.teacher.checkpoint: .*neither a checkpoint"):
        reactnet_spec(tmp_path, tmp_path / "nowhere")
