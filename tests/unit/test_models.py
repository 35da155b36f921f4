"""Every registered model builds, runs forward and backward, and has the paper's parameter count."""
from __future__ import annotations

import pytest
import torch

from bitfleet import data, registry
from bitfleet.engine.callbacks import RunContext
from bitfleet.spec import DataSpec, RunSpec
from workloads.resnet_cifar import models

ARCHS = sorted(models.ARCHS)

# He et al. 2016, Table 6 (CIFAR-10, option A): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
PAPER_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}
EXACT_PARAMS = {20: 269722, 32: 464154, 44: 658586, 56: 853018, 110: 1727962}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def reference_count(depth: int, num_classes: int = 10, in_channels: int = 3) -> int:
    """Counted from the architecture description: conv weights, BN (weight+bias) and the classifier."""
    n = (depth - 2) // 6
    conv = lambda cin, cout: 9 * cin * cout  # noqa: E731 - 3x3, no bias
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(in_channels, 16) + bn(16)
    cin = 16
    for cout in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, cout) + bn(cout) + conv(cout, cout) + bn(cout)
            cin = cout
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(arch, shortcut):
    torch.manual_seed(0)
    model = models.build(arch, shortcut)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("depth", sorted(EXACT_PARAMS))
def test_option_a_parameter_count_is_the_papers(depth):
    count = n_params(models.build(f"resnet{depth}", "A"))
    assert count == EXACT_PARAMS[depth] == reference_count(depth)
    assert count == pytest.approx(PAPER_PARAMS[depth], rel=0.025)  # the table's rounding


@pytest.mark.parametrize("depth", sorted(EXACT_PARAMS))
def test_plain_has_same_count_as_option_a_and_b_has_more(depth):
    a = n_params(models.build(f"resnet{depth}", "A"))
    assert n_params(models.build(f"plain{depth}", "A")) == a
    assert n_params(models.build(f"plain{depth}", "B")) == a  # plain nets have no shortcut at all
    b = n_params(models.build(f"resnet{depth}", "B"))
    # option B adds a 1x1 conv + BN projection at the two stage transitions: 16->32 and 32->64
    assert b == a + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_option_a_shortcut_is_subsample_and_zero_pad():
    block = models.BasicBlock(16, 32, stride=2, residual=True, shortcut="A")
    x = torch.randn(2, 16, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and torch.equal(y[:, 16:], torch.zeros(2, 16, 4, 4))


def test_plain_block_has_no_shortcut_path():
    torch.manual_seed(0)
    block = models.BasicBlock(16, 16, stride=1, residual=False, shortcut="A").eval()
    x = torch.randn(1, 16, 8, 8)
    manual = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
    assert torch.equal(block(x), manual)
    block.residual = True
    assert torch.allclose(block(x), torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))) + x))


@pytest.mark.parametrize("arch", ["resnet20", "plain20"])
def test_single_channel_input(arch):
    model = models.build(arch, "A", num_classes=10, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert n_params(model) == reference_count(20, in_channels=1)


def test_num_classes():
    model = models.build("resnet20", "B", num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert n_params(model) == n_params(models.build("resnet20", "B")) + 64 * 90 + 90


def test_bad_depth_is_rejected():
    with pytest.raises(AssertionError):
        models.CifarResNet(21, residual=True)


# --------------------------------------------------------------------------- every registered workload


def _spec(workload: str, dataset: str) -> RunSpec:
    data = {"dataset": dataset, "root": None if dataset == "mnist_sample" else "/unused", "val_size": 100}
    return RunSpec.model_validate({"name": "unit", "workload": workload, "data": data})


@pytest.mark.parametrize("dataset", ["cifar10", "mnist_sample"])
@pytest.mark.parametrize("name", registry.names())
def test_every_workload_builds_its_default_model(name, dataset):
    workload = registry.get(name)
    assert workload.name == name
    if workload.datasets and dataset not in workload.datasets:
        pytest.skip(f"{name} takes {workload.datasets}")
    spec = registry.workload_class(name).resolve_sections(_spec(name, dataset))
    workload = registry.get(name, spec.options)
    workload.validate(spec)
    info = data.info(DataSpec(dataset=dataset, root="unused" if dataset != "mnist_sample" else None))
    workload.setup(RunContext(spec.train.epochs, str(spec.run_dir), spec.data, info))
    torch.manual_seed(0)
    model = workload.build_model(spec.model, info)
    images = torch.randn(2, info.in_channels, info.image_size, info.image_size)
    labels = torch.tensor([0, info.num_classes - 1])
    loss, logits = workload.train_step(model, images, labels, torch.nn.CrossEntropyLoss())
    assert logits.shape == (2, info.num_classes)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_registry_knows_resnet_cifar():
    assert "resnet_cifar" in registry.names()
