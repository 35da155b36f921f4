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


# --------------------------------------------------------------------------- seed fidelity (issue 22)


def minimal_spec(tmp_path, **sections):
    from bitfleet.resolve import validate_spec

    raw = {"name": "minimal", "workload": "rbnn", "model": {"arch": "resnet20_1w1a"},
           "data": {"dataset": "mnist_sample"}, "storage_path": str(tmp_path), **sections}
    return validate_spec(raw)


def test_a_minimal_spec_gets_the_official_clis_defaults_and_explicit_values_win(tmp_path):
    from bitfleet.resolve import load_spec

    spec = minimal_spec(tmp_path)
    train = spec.train
    assert (train.epochs, train.batch_size, train.eval_batch_size) == (400, 256, 128)
    assert (train.optimizer.type, train.optimizer.lr, train.optimizer.momentum, train.optimizer.weight_decay) == (
        "sgd", 0.1, 0.9, 1e-4)
    assert train.lr_schedule.type == "cosine" and spec.data.loader_workers == 8
    assert (spec.options.tmin, spec.options.tmax, spec.options.rotation_update) == (1e-2, 10.0, 2)
    given = minimal_spec(tmp_path, train={"epochs": 3, "lr_schedule": {"type": "multistep", "milestones": [2]}},
                         data={"dataset": "mnist_sample", "loader_workers": 0})
    assert (given.train.epochs, given.train.batch_size, given.data.loader_workers) == (3, 256, 0)
    assert given.train.lr_schedule.type == "multistep" and given.train.lr_schedule.milestones == [2]
    overridden = load_spec("workloads/rbnn/specs/cifar10_resnet20_1w1a.yaml",
                           ["data.dataset=mnist_sample", "train.batch_size=64", f"storage_path={tmp_path}"])
    assert overridden.train.batch_size == 64 and overridden.train.epochs == 400
    # the other workloads' defaults stay theirs: resnet_cifar's seed turns AMP on (GPU workers)
    resnet = minimal_spec(tmp_path, workload="resnet_cifar", model={"arch": "resnet20"})
    assert resnet.train.amp == "gpu" and resnet.train.eval_batch_size == 512 and resnet.data.loader_workers == 0


def test_top5_is_reported_on_ten_classes_as_the_official_code_prints_it():
    from bitfleet.data import DataInfo
    from bitfleet.engine.objective import Classification
    from bitfleet.spec import TrainSpec
    from workloads.rbnn.workload import RBNN

    cifar10 = DataInfo(10, 3, 32)
    logits, labels = torch.eye(10)[[0, 1, 2, 3]] + torch.linspace(0, 0.5, 10), torch.tensor([0, 9, 8, 3])
    rbnn = RBNN.Objective(TrainSpec(), cifar10)
    sums = rbnn.batch_sums(logits, labels, train=False)
    metrics = rbnn.metrics("test", 4.0, 4, sums.tolist(), train=False)
    assert metrics["test/acc"] == 50.0 and metrics["test/acc5"] == 100.0  # 9 and 8 are in the top five
    assert "test/acc5" not in Classification(TrainSpec(), cifar10).metrics("test", 4.0, 4, sums.tolist(), train=False)


@pytest.mark.parametrize("arch", ["mobilenetv1_bireal_05_noGroup_1w1a", "resnet18_1w1a"])
def test_react_adds_rsign_and_rprelu_to_every_bireal_block(arch):
    from workloads.rbnn.models import BinaryConvBN, RPReLU

    torch.manual_seed(0)
    plain, react = build(arch, 10, 3, 32), build(arch, 10, 3, 32, react=True)
    blocks = [m for m in react.modules() if isinstance(m, BinaryConvBN)]
    assert blocks and all(b.rsign is not None and isinstance(b.rprelu, RPReLU) for b in blocks)
    extra = sum(p.numel() for p in react.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == sum(b.conv.in_channels + 3 * b.bn.num_features for b in blocks)  # α; γ, PReLU slope, ζ
    x = torch.randn(2, 3, 32, 32)
    react(x).sum().backward()
    first = blocks[0]
    assert first.rsign.bias.grad.abs().sum() > 0 and first.rprelu.prelu.weight.grad.abs().sum() > 0
    # the thresholds move the sign: with α = 0.3 the conv sees sign(x + 0.3)
    with torch.no_grad():
        first.rsign.bias.fill_(0.3)
    conv_inputs = []
    hook = first.conv.register_forward_pre_hook(lambda module, args: conv_inputs.append(args[0]))
    react.eval()(x)
    hook.remove()
    shifted = torch.nn.functional.hardtanh(first_input(react, x) + 0.3)
    assert torch.equal(torch.sign(conv_inputs[0]), torch.sign(shifted))


def first_input(model, x):
    """What the first Bi-Real block receives: the stem's output."""
    return model.stem(x)


def test_react_needs_bireal_blocks():
    from workloads.rbnn.config import ModelConfig

    with pytest.raises(ValueError, match="react: ReActNet's activations sit in Bi-Real blocks"):
        ModelConfig(arch="resnet20_1w1a", react=True)


def test_mobilenets_take_imagenet_strides_above_64_pixels():
    model = build("mobilenetv1_bireal_05_noGroup_1w1a", 1000, 3, 224, react=True)
    assert model.stem[0].stride == (2, 2)
    features = model.layers(model.stem(torch.randn(1, 3, 224, 224)))
    assert features.shape == (1, 512, 7, 7)  # 224 / 32: MobileNetV1's ImageNet resolution
    assert build("mobilenetv1_bireal_05_1w1a", 10, 3, 32).stem[0].stride == (1, 1)


def test_a_torchvision_teacher_is_validated_and_gives_the_distributional_loss(tmp_path):
    from bitfleet import registry
    from bitfleet.data import info
    from bitfleet.engine.callbacks import RunContext
    from bitfleet.errors import SpecError
    from bitfleet.spec import DataSpec

    def spec(**teacher):
        return minimal_spec(tmp_path, model={"arch": "mobilenetv1_bireal_025_1w1a", "w32": True},
                            rbnn={"teacher": teacher}, data={"dataset": "cifar10", "root": str(cifar_root(tmp_path))})

    with pytest.raises(SpecError, match="rbnn.teacher.torchvision: 'resnet35' is not a torchvision model"):
        spec(torchvision="resnet35")
    with pytest.raises(SpecError, match="rbnn.teacher.weights: 'IMAGENET1K_V9' is not one of resnet18's"):
        spec(torchvision="resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(SpecError, match="rbnn.teacher.workload: name either"):
        spec(torchvision="resnet18", workload="resnet_cifar", checkpoint=str(tmp_path))
    with pytest.raises(SpecError, match="rbnn.teacher.weights: resnet34's IMAGENET1K_V1 predicts 1000 classes; "
                                        "cifar10 has 10"):
        spec(torchvision="resnet34", weights="IMAGENET1K_V1")
    resolved = spec(torchvision="resnet18", weights=None)  # untrained: nothing to fetch in a test
    data = info(DataSpec(dataset="cifar10", root=str(cifar_root(tmp_path))))
    workload = registry.get("rbnn", resolved.options)
    workload.setup(RunContext(1, str(tmp_path), resolved.data, data))
    student = workload.build_model(resolved.model, data)
    images = torch.randn(2, 3, 32, 32)
    loss, logits = workload.train_step(student, images, torch.arange(2), torch.nn.CrossEntropyLoss())
    with torch.no_grad():
        target = torch.softmax(workload.teacher(images), 1)
    expected = (target * (target.log() - torch.log_softmax(logits, 1))).sum(1).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def cifar_root(tmp_path):
    from bitfleet.data import synthetic

    root = tmp_path / "cifar10"
    if not root.exists():
        synthetic.write("cifar10", root, n_train=8, n_test=8)
    return root


def test_the_bn_only_epoch_and_reactnets_stages_are_pipelines(tmp_path):
    import numpy as np

    from bitfleet.data import synthetic
    from bitfleet.engine import checkpoint
    from bitfleet.resolve import load_spec, stage_raw, validate_spec
    from workloads.rbnn.callbacks import Temperature

    synthetic.write_jpeg_folders("image_folder", tmp_path / "imagenet", 4, 2, np.random.default_rng(0), 4)
    common = [f"storage_path={tmp_path}", "data.dataset=image_folder", f"data.root={tmp_path / 'imagenet'}",
              "data.loader=torchvision"]
    bireal = load_spec("workloads/rbnn/specs/imagenet_resnet18_bireal_recipe.yaml", common)
    assert [(s.name, s.needs, s.init_from) for s in bireal.stages] == [("train", [], None),
                                                                        ("bn_only", ["train"], "train")]
    train_folder = str(tmp_path / bireal.name / "train")
    stage = validate_spec(stage_raw(bireal, bireal.stages[1]), pending_checkpoints=(train_folder,))
    assert stage.train.init_from == train_folder
    assert (stage.train.epochs, stage.options.bn_only_epochs, stage.train.optimizer.lr) == (1, 1, 1e-4)
    state = TrainState(build("resnet18_1w1a", 4, 3, 72), None, epochs=1)
    Temperature(stage.options.tmin, stage.options.tmax).on_epoch_start(state)
    assert state.metrics["rbnn/t"] == 10.0  # the temperature the train stage ended at, held

    placeholder = tmp_path / "teacher"
    placeholder.mkdir()
    checkpoint.save(placeholder, {"model": {}})
    synthetic.write("cifar10", tmp_path / "cifar10", n_train=8, n_test=8)
    reactnet = load_spec("workloads/rbnn/specs/cifar10_reactnet_mbv1_05.yaml",
                         [f"storage_path={tmp_path}", f"data.root={tmp_path / 'cifar10'}",
                          f"rbnn.teacher.checkpoint={placeholder}"])
    first, second = (stage_raw(reactnet, s) for s in reactnet.stages)
    assert first["model"]["w32"] and first["train"]["optimizer"]["weight_decay"] == 1e-5
    assert not second["model"]["w32"] and second["train"]["optimizer"]["weight_decay"] == 0.0
    assert second["train"]["init_from"] == str(tmp_path / reactnet.name / "stage1") and second["model"]["react"]
