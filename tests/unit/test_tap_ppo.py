"""TAP-PPO numeric core (seed 003): the TAP map, tmax calibration, the networks, INT8 QAT, record points,
the TAP student and attention transfer. No Ray."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workloads.tap_ppo import quant
from workloads.tap_ppo.models import ARCHS, build, fuse
from workloads.tap_ppo.tap import STEPS, TapCodes, levels, saved_fraction, tap_map, tmax_from_histogram

pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: these small batches gain nothing from two, a busy machine makes
    two threads several times slower, and the trained numbers no longer depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_codes(rng: random.Random) -> TapCodes:
    tmax = rng.randint(3, 255)
    b1 = rng.randint(1, tmax - 2)
    b2 = rng.randint(b1 + 1, tmax - 1)
    return TapCodes(tmax, b1, b2, tuple(rng.choice(STEPS) for _ in range(3)))


RANDOM_CODES = [random_codes(random.Random(i)) for i in range(300)]


def reference_tap(code: int, c: TapCodes) -> int:
    """TAP of one code, written as the definition reads: clip, find the segment, round the offset down."""
    x = min(code, c.tmax)
    start, step = (0, c.steps[0]) if x < c.b1 else (c.b1, c.steps[1]) if x < c.b2 else (c.b2, c.steps[2])
    return start + (x - start) // step * step


# --- the TAP map -------------------------------------------------------------------------------------

def test_tap_map_matches_the_definition_code_by_code():
    codes = torch.arange(256)
    for c in RANDOM_CODES[:50]:
        assert tap_map(codes, c).tolist() == [reference_tap(k, c) for k in range(256)]


def test_tap_map_is_monotone_idempotent_and_clipped():
    codes = torch.arange(256, dtype=torch.uint8)
    for c in RANDOM_CODES:
        m = tap_map(codes, c)
        assert m.dtype == torch.uint8
        assert bool((m[1:] >= m[:-1]).all())
        assert torch.equal(tap_map(m, c), m)
        assert int(m.max()) <= c.tmax
        assert bool((m <= codes).all())  # every code is rounded down, never up
        assert bool((m[c.tmax + 1:] == m[c.tmax]).all())  # codes above tmax all land where tmax lands
        assert bool((m[[0, c.b1, c.b2]] == torch.tensor([0, c.b1, c.b2], dtype=torch.uint8)).all())


def test_tap_map_is_the_identity_below_tmax_with_unit_steps_and_keeps_dtype_and_shape():
    c = TapCodes(tmax=40, b1=10, b2=20, steps=(1, 1, 1))
    codes = torch.arange(41)
    assert torch.equal(tap_map(codes, c), codes)
    batch = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.int64)
    out = tap_map(batch, c)
    assert out.dtype == torch.int64 and out.shape == batch.shape
    assert torch.equal(out, batch.clamp(max=40))
    assert torch.equal(tap_map(batch.to(torch.uint8), c), out.to(torch.uint8))


def test_tap_map_example_by_hand():
    c = TapCodes(tmax=20, b1=5, b2=12, steps=(2, 4, 8))
    # [0,5) step 2 -> 0,0,2,2,4; [5,12) step 4 from 5 -> 5x4, 9x3; [12,20] step 8 from 12 -> 12x8, 20; >20 -> 20
    expected = [0, 0, 2, 2, 4, 5, 5, 5, 5, 9, 9, 9] + [12] * 8 + [20, 20, 20]
    assert tap_map(torch.arange(23), c).tolist() == expected
    assert levels(c) == len(set(expected)) == 7
    assert saved_fraction(c) == pytest.approx(1 - 7 / 21)


def test_levels_closed_form_counts_the_distinct_values():
    for c in RANDOM_CODES:
        unique = len(torch.unique(tap_map(torch.arange(c.tmax + 1), c)))
        assert levels(c) == unique
        assert saved_fraction(c) == pytest.approx(1 - unique / (c.tmax + 1))


@pytest.mark.parametrize("kwargs, field", [
    ({"tmax": 2, "b1": 1, "b2": 1, "steps": (1, 1, 1)}, "tmax"),
    ({"tmax": 256, "b1": 1, "b2": 2, "steps": (1, 1, 1)}, "tmax"),
    ({"tmax": 30.0, "b1": 1, "b2": 2, "steps": (1, 1, 1)}, "tmax"),
    ({"tmax": 30, "b1": 0, "b2": 2, "steps": (1, 1, 1)}, "b1"),
    ({"tmax": 30, "b1": 29, "b2": 29, "steps": (1, 1, 1)}, "b1"),
    ({"tmax": 30, "b1": 5, "b2": 5, "steps": (1, 1, 1)}, "b2"),
    ({"tmax": 30, "b1": 5, "b2": 30, "steps": (1, 1, 1)}, "b2"),
    ({"tmax": 30, "b1": 5, "b2": 10, "steps": (1, 3, 1)}, "steps"),
    ({"tmax": 30, "b1": 5, "b2": 10, "steps": (1, 2)}, "steps"),
    ({"tmax": 30, "b1": 5, "b2": 10, "steps": (1, 2, 32)}, "steps"),
])
def test_tap_codes_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TapCodes(**kwargs)


def test_tap_codes_round_trip_through_json():
    c = TapCodes(tmax=37, b1=6, b2=19, steps=[2, 4, 16])
    data = json.loads(json.dumps(c.to_dict()))
    assert data == {"tmax": 37, "b1": 6, "b2": 19, "steps": [2, 4, 16], "levels": levels(c)}
    assert TapCodes.from_dict(data) == c and c.steps == (2, 4, 16)
    with pytest.raises(ValueError, match="^levels:"):
        TapCodes.from_dict({**data, "levels": data["levels"] + 1})


# --- tmax from a histogram ---------------------------------------------------------------------------

def numpy_tmax(hist: np.ndarray) -> int:
    codes = np.repeat(np.arange(256), hist)
    nonzero = codes[codes > 0]
    p90 = np.percentile(nonzero, 90) if nonzero.size else 0.0
    # + 1e-9: the exact percentile is rational; numpy's float may land a hair below a whole number
    return int(min(max(math.floor(p90 + 1e-9) + 10, 3), 255))


def test_tmax_from_histogram_matches_numpy_percentile():
    rng = np.random.default_rng(0)
    for trial in range(300):
        hist = rng.integers(0, 50, 256) * (rng.random(256) < rng.uniform(0.02, 1.0))
        hist[0] = rng.integers(0, 10_000)  # ReLU zeros: excluded
        if trial % 3 == 0:  # a ReLU-like decaying histogram, as record points give
            hist = (rng.exponential(1.0, 256) * 1000 * np.exp(-np.arange(256) / rng.uniform(2, 60))).astype(np.int64)
        assert tmax_from_histogram(torch.from_numpy(hist)) == numpy_tmax(hist), trial


def test_tmax_from_histogram_edges():
    hist = torch.zeros(256, dtype=torch.int64)
    assert tmax_from_histogram(hist) == 10  # no live code
    hist[0] = 1000
    assert tmax_from_histogram(hist) == 10  # zeros do not count
    hist[250] = 5
    assert tmax_from_histogram(hist) == 255  # clamped
    with pytest.raises(ValueError, match="^hist:"):
        tmax_from_histogram(torch.zeros(128))


# --- networks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_builds_runs_and_names_its_record_points(arch):
    torch.manual_seed(0)
    model = build(arch).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert set(model.attention_layers) <= set(model.record_points)
    for name in model.record_points:
        point = model.get_submodule(name)
        assert isinstance(point, nn.Sequential) and isinstance(point[-1], nn.ReLU)
    assert "classifier" not in model.record_points


def test_record_point_counts_and_sizes():
    sizes = {a: sum(p.numel() for p in build(a).parameters()) for a in ARCHS}
    assert [len(build(a).record_points) for a in ("lenet5", "alexnet", "vgg16")] == [4, 7, 13]
    assert 2.5e6 < sizes["alexnet"] < 3.5e6 and 14e6 < sizes["vgg16"] < 16e6


def test_lenet5_parameters_match_the_seed_structure_by_hand():
    model = build("lenet5")
    by_hand = {"conv1": 3 * 6 * 25 + 6, "conv2": 6 * 16 * 25 + 16, "fc1": 400 * 120 + 120,
               "fc2": 120 * 84 + 84, "classifier": 84 * 10 + 10}
    assert by_hand == {"conv1": 456, "conv2": 2416, "fc1": 48120, "fc2": 10164, "classifier": 850}
    for name, count in by_hand.items():
        assert sum(p.numel() for p in model.get_submodule(name).parameters()) == count
    assert sum(p.numel() for p in model.parameters()) == 62006


@pytest.mark.parametrize("arch", ["lenet5", "vgg16"])
def test_fusing_for_inference_keeps_the_function(arch):
    torch.manual_seed(0)
    model = build(arch)
    if arch == "vgg16":  # non-trivial BN statistics to fold
        with torch.no_grad():
            model.train()(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    fused = fuse(model)
    assert fused.get_submodule(model.record_points[0] + ".relu").__class__ is nn.Identity
    assert torch.allclose(fused(x), expected, atol=1e-4, rtol=1e-4)


# --- QAT, conversion, histograms ---------------------------------------------------------------------

def synthetic_cifar(n: int, seed: int, noise: float = 8.0):
    """Ten smooth random colour templates at 32x32 plus heavy pixel noise: learnable, not trivially."""
    templates = F.interpolate(torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                              size=32, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return templates[labels] + noise * torch.randn(n, 3, 32, 32, generator=g), labels


def batches(images, labels, size):
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


def fit(model, data, epochs, lr, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for images, labels in data:
            opt.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            opt.step()
    return model


@pytest.fixture(scope="module")
def trained():
    """Float LeNet-5 (6 epochs = 300 steps), QAT from its weights (2 epochs), frozen, converted to INT8."""
    torch.manual_seed(0)
    train = batches(*synthetic_cifar(3200, seed=1), 64)
    test = batches(*synthetic_cifar(2000, seed=2), 500)
    float_model = fit(build("lenet5"), train, epochs=6, lr=2e-3, seed=0)
    qat = quant.qat_from_float("lenet5", float_model.state_dict())
    assert torch.equal(qat.conv1.conv.weight, float_model.conv1.conv.weight)
    fit(qat, train, epochs=2, lr=5e-4, seed=1)
    quant.freeze(qat)
    int8 = quant.convert_int8(qat)
    return {"float": float_model, "qat": qat, "int8": int8, "test": test,
            "acc": {"float": quant.accuracy(float_model, test), "fake_quant": quant.accuracy(qat, test),
                    "int8": quant.accuracy(int8, test)}}


def test_int8_accuracy_is_within_a_point_of_fake_quant(trained):
    acc = trained["acc"]
    print("accuracies (%):", acc)
    assert acc["float"] > 50 and acc["fake_quant"] > 50  # chance is 10
    assert abs(acc["int8"] - acc["fake_quant"]) <= 1.0


def test_record_points_output_quint8_codes_and_histograms_count_them(trained):
    int8, test = trained["int8"], trained["test"][:2]
    layers = int8.record_points
    hists = quant.histograms(int8, test, layers)
    codes = {name: [] for name in layers}
    with torch.no_grad(), quant.RecordPoints(int8, layers) as rec:
        for images, _ in test:
            int8(images)
            for name in layers:
                out = rec.outputs[name]
                assert out.dtype == torch.quint8 and out.q_zero_point() == 0
                codes[name].append(quant.output_codes(out).flatten().numpy())
    for name in layers:
        flat = np.concatenate(codes[name])
        assert hists[name].dtype == torch.int64 and int(hists[name].sum()) == flat.size
        assert hists[name].tolist() == np.histogram(flat, bins=256, range=(0, 256))[0].tolist()
        assert int(hists[name][1:].sum()) > 0  # live activations
        assert 3 <= tmax_from_histogram(hists[name]) <= 255


def test_apply_tap_maps_the_codes_exactly_and_unit_steps_change_nothing(trained):
    int8, (images, _) = trained["int8"], trained["test"][0]
    layers = int8.record_points
    hists = quant.histograms(int8, [images], layers)
    codes = {}
    for i, name in enumerate(layers):
        tmax = tmax_from_histogram(hists[name])
        codes[name] = TapCodes(tmax, tmax // 4, tmax // 2, (STEPS[i % 3 + 1], STEPS[(i + 1) % 3 + 1], 16))
    with torch.no_grad():
        plain = int8(images)
        with quant.RecordPoints(int8, layers) as before, quant.apply_tap(int8, codes), \
                quant.RecordPoints(int8, layers) as after:
            tapped = int8(images)
        for name in layers:  # hooks run in order: `before` sees the codes, `after` their replacement
            original, mapped = before.outputs[name], after.outputs[name]
            assert torch.equal(mapped.int_repr(), tap_map(original.int_repr(), codes[name]))
            assert mapped.q_scale() == original.q_scale() and mapped.q_zero_point() == original.q_zero_point()
        assert not torch.equal(tapped, plain)
        assert torch.equal(int8(images), plain)  # hooks removed on exit
        identity = {name: TapCodes(255, 1, 2, (1, 1, 1)) for name in layers}
        with quant.apply_tap(int8, identity):
            assert torch.equal(int8(images), plain)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_goes_from_float_weights_through_qat_to_int8_with_tap(arch):
    torch.manual_seed(0)
    float_model = build(arch)
    qat = quant.qat_from_float(arch, float_model.state_dict())
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(qat(images), labels).backward()  # fake-quant training step runs
    int8 = quant.convert_int8(quant.freeze(qat))
    hists = quant.histograms(int8, [images], int8.record_points)
    codes = {n: TapCodes(tmax_from_histogram(h), 2, 5, (2, 4, 8)) for n, h in hists.items()}
    with torch.no_grad(), quant.apply_tap(int8, codes), quant.RecordPoints(int8, int8.attention_layers) as rec:
        assert int8(images).shape == (4, 10)
    for name in int8.attention_layers:
        assert rec.outputs[name].dtype == torch.quint8
        assert int(rec.outputs[name].int_repr().max()) <= codes[name].tmax


# --- attention transfer and accuracy -----------------------------------------------------------------

def test_attention_map_by_hand():
    f = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 1.0]]]])  # (1, 2, 2, 2)
    # mean_c f^2 = [1, 2, 2, 1], ||.||_2 = sqrt(10)
    assert torch.allclose(quant.attention_map(f), torch.tensor([[1.0, 2.0, 2.0, 1.0]]) / math.sqrt(10))
    assert torch.allclose(quant.attention_map(torch.tensor([[3.0, -4.0]])),
                          torch.tensor([[9.0, 16.0]]) / math.sqrt(337))
    q = torch.quantize_per_tensor(f, 0.5, 0, torch.quint8)
    assert torch.allclose(quant.attention_map(q), quant.attention_map(f))
    for shape in [(4, 8, 5, 5), (4, 30)]:
        a = quant.attention_map(torch.randn(shape))
        assert a.shape == (4, 25 if len(shape) == 4 else 30)
        assert torch.allclose(a.norm(dim=1), torch.ones(4))


def test_attention_loss_is_the_mean_l2_distance_of_the_maps():
    torch.manual_seed(0)
    t = {"conv2": torch.randn(3, 4, 5, 5), "fc1": torch.randn(3, 7)}
    s = {"conv2": torch.randn(3, 4, 5, 5), "fc1": torch.randn(3, 7)}
    assert float(quant.attention_loss(t, t, ["conv2", "fc1"])) == 0.0
    loss = float(quant.attention_loss(t, s, ["conv2", "fc1"]))

    def np_map(x):
        q = (x.numpy() ** 2).mean(1).reshape(len(x), -1) if x.dim() == 4 else x.numpy() ** 2
        return q / np.sqrt((q ** 2).sum(1, keepdims=True))
    expected = np.mean([np.linalg.norm(np_map(t[n]) - np_map(s[n]), axis=1).mean() for n in ("conv2", "fc1")])
    assert loss > 0 and loss == pytest.approx(expected, rel=1e-5)


def test_accuracy_counts_top1_and_restores_the_mode():
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    model = nn.Identity().train()
    assert quant.accuracy(model, [(logits[:2], torch.tensor([0, 1])), (logits[2:], torch.tensor([1, 1]))]) == 75.0
    assert model.training
