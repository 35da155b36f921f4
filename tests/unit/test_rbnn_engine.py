"""RBNN's packed engine: XNOR-popcount convolutions equal torch's, and every exported architecture predicts
what the torch model predicts — with its binarized layers' outputs equal bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitfleet import registry
from bitfleet.data import info, mnist, raw_split, synthetic
from bitfleet.data.transforms import normalise
from bitfleet.errors import SpecError
from bitfleet.export import load_engine, write_engine
from bitfleet.spec import DataSpec
from workloads.rbnn import models, xnor
from workloads.rbnn.packed import PackedRBNN

ARCHS = ["resnet20_1w1a", "resnet20_bireal_1w1a", "vgg_small_1w1a", "resnet18_1w1a"]  # resnet34: resnet18's code


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics and affines, some negative scales: every threshold direction, zeros rare."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.5)
                m.bias.normal_(0, 0.5)
            if hasattr(m, "rotate"):
                m.scale.mul_(torch.where(torch.rand_like(m.scale) < 0.2, -1.0, 1.0))
    return model.eval()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    synthetic.write("cifar10", root, n_train=10, n_test=24)
    spec = DataSpec(dataset="cifar10", root=str(root))
    return spec, raw_split(spec, "test")[0]


def torch_predictions(model, spec, codes: torch.Tensor) -> torch.Tensor:
    data = info(spec)
    with torch.no_grad():
        return model(normalise(data.mean, data.std)(codes))


@pytest.mark.parametrize("stride,pad,channels,zeros", [(1, 1, 64, False), (2, 1, 13, True), (1, 0, 130, True)])
def test_xnor_convolution_equals_torch_with_borders_and_exact_zeros(stride, pad, channels, zeros):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, channels, 9, 9, generator=generator)
    if zeros:  # sign(0) = 0: neither +1 nor -1
        x[0, 2, 3, 3] = 0
        x[1, :, 0, 0] = 0
    w = torch.sign(torch.randn(20, channels, 3, 3, generator=generator))
    expected = torch.nn.functional.conv2d(torch.sign(x), w, stride=stride, padding=pad).numpy().transpose(0, 2, 3, 1)
    signs = w.numpy().transpose(0, 2, 3, 1)
    conv = xnor.BinaryConv(xnor.pack_weights(signs), signs, 3, stride, pad)
    assert np.array_equal(conv(*xnor.pack_signs(x.numpy().transpose(0, 2, 3, 1))), expected)


@pytest.mark.parametrize("stride,pad,k", [(1, 1, 3), (2, 3, 7)])
def test_first_layer_is_summed_as_onednn_sums_it(stride, pad, k):
    conv = torch.nn.Conv2d(3, 16, k, stride, pad, bias=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = conv(x).numpy().transpose(0, 2, 3, 1)
    weight = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
    got = xnor.conv_fma(x.numpy().transpose(0, 2, 3, 1), weight, stride, pad)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_predicts_what_torch_predicts_on_synthetic_cifar(arch, cifar, tmp_path):
    spec, codes = cifar
    torch.manual_seed(0)
    model = randomised(models.build(arch, 10, 3, 32))
    write_engine(registry.get("rbnn"), model, None, spec, tmp_path / "engine.npz")
    engine, header = load_engine(tmp_path / "engine.npz")
    expected = torch_predictions(model, spec, codes).numpy()
    logits = engine.logits(codes.numpy())
    assert header["workload"] == "rbnn" and np.array_equal(logits.argmax(1), expected.argmax(1))
    assert np.allclose(logits, expected, atol=1e-4, rtol=1e-4)  # the float head's rounding only
    exact = {k: bool(v) for k, v in np.load(tmp_path / "engine.npz").items() if k.endswith(".exact")}
    assert exact and all(exact.values()), exact  # every float layer's rounding checked at export


def test_binarized_stream_is_bit_exact_before_the_head(cifar, tmp_path):
    """Bi-Real ResNet-20: the engine's stream at the global pool equals torch's, float for float."""
    spec, codes = cifar
    torch.manual_seed(1)
    model = randomised(models.build("resnet20_bireal_1w1a", 10, 3, 32))
    write_engine(registry.get("rbnn"), model, None, spec, tmp_path / "engine.npz")
    engine = PackedRBNN(tmp_path / "engine.npz")
    pool = next(i for i, op in enumerate(engine.ops) if op["op"] == "global_avg_pool")
    engine.ops = engine.ops[:pool]
    captured = {}
    model.layers.register_forward_hook(lambda module, args, out: captured.setdefault("x", out))
    torch_predictions(model, spec, codes)
    assert np.array_equal(engine.logits(codes.numpy()), captured["x"].numpy().transpose(0, 2, 3, 1))


def test_embedded_digits_and_the_imagenet_form(tmp_path):
    _, (digits, _) = mnist.embedded_sample()
    sample = DataSpec(dataset="mnist_sample")
    torch.manual_seed(0)
    model = randomised(models.build("resnet20_1w1a", 10, 1, 28))
    write_engine(registry.get("rbnn"), model, None, sample, tmp_path / "digits.npz")
    expected = torch_predictions(model, sample, digits[:200]).argmax(1).numpy()
    assert np.array_equal(PackedRBNN(tmp_path / "digits.npz").predict(digits[:200].numpy()), expected)
    imagenet = models.build("resnet18_1w1a", 12, 3, 72)  # > 64 px: 7x7 stem, max pool, downsampling shortcuts
    randomised(imagenet)
    codes = torch.randint(0, 256, (4, 3, 72, 72), dtype=torch.uint8)
    folder = DataSpec(dataset="imagenet", root=str(tmp_path), crop_size=72)  # only its normalisation is read
    write_engine(registry.get("rbnn"), imagenet, None, folder, tmp_path / "imagenet.npz")
    expected = torch_predictions(imagenet, folder, codes).numpy()
    logits = PackedRBNN(tmp_path / "imagenet.npz").logits(codes.numpy())
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert np.allclose(logits, expected, atol=1e-3)  # the real 1x1 shortcut convs: oneDNN's own summation order


def test_what_cannot_be_packed_is_refused_with_the_field(tmp_path):
    for arch, field in (("mobilenetv1_bireal_025_1w1a", "model.arch"),):
        with pytest.raises(SpecError, match=field):
            write_engine(registry.get("rbnn"), models.build(arch, 10, 3, 32).eval(), None,
                         DataSpec(dataset="mnist_sample"), tmp_path / "x.npz")
    a32 = models.build("resnet20_1w1a", 10, 3, 32, a32=True).eval()
    with pytest.raises(SpecError, match="model.a32"):
        write_engine(registry.get("rbnn"), a32, None, DataSpec(dataset="mnist_sample"), tmp_path / "x.npz")


def test_weights_exactly_zero_count_as_torch_counts_them():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 7, 7, generator=generator)
    x[0, 5, 2, 2] = 0
    w = torch.sign(torch.randn(6, 20, 3, 3, generator=generator))
    w[1, 5, 0, 0] = w[4, 0, 2, 1] = w[4, 19, 1, 1] = 0  # sign(0) = 0: such a weight adds nothing
    expected = torch.nn.functional.conv2d(torch.sign(x), w, stride=2, padding=1).numpy().transpose(0, 2, 3, 1)
    signs = w.numpy().transpose(0, 2, 3, 1)
    packed_as = np.where(signs == 0, 1, signs)
    conv = xnor.BinaryConv(xnor.pack_weights(signs), packed_as, 3, 2, 1, np.argwhere(signs == 0))
    assert np.array_equal(conv(*xnor.pack_signs(x.numpy().transpose(0, 2, 3, 1))), expected)
