"""BN recalibration (bitfleet.engine.batchnorm) and its use in rbnn: the re-estimated running statistics
against statistics computed by hand on the same batches, pooling over ranks, the rbnn spec field."""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from torch import nn

from bitfleet.data import info
from bitfleet.engine import batchnorm
from bitfleet.engine.callbacks import RunContext, TrainState
from bitfleet.resolve import load_spec
from workloads.rbnn.models import build
from workloads.rbnn.workload import RBNN


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5)
    )


def loader(count, shift=0.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=g) * 2 + shift, torch.zeros(6)) for _ in range(count)]


def by_hand(net, batches):
    """Per-BN (mean, unbiased var) of each batch in train mode, averaged over batches, with functional ops."""
    conv1, bn1, _, conv2, _ = net
    sums = [[0, 0], [0, 0]]
    for x, _ in batches:
        h1 = conv1(x)
        m1, v1 = h1.mean((0, 2, 3)), h1.var((0, 2, 3))
        h1n = (h1 - m1.view(1, -1, 1, 1)) / (h1.var((0, 2, 3), unbiased=False).view(1, -1, 1, 1) + bn1.eps).sqrt()
        h2 = conv2(F.relu(h1n * bn1.weight.view(1, -1, 1, 1) + bn1.bias.view(1, -1, 1, 1)))
        for i, (m, v) in enumerate([(m1, v1), (h2.mean((0, 2, 3)), h2.var((0, 2, 3)))]):
            sums[i][0] += m / len(batches)
            sums[i][1] += v / len(batches)
    return sums


@torch.no_grad()
def test_recalibrated_statistics_are_the_batch_statistics_averaged_over_batches():
    net = small_net()
    with torch.no_grad():  # non-trivial affine BN, so the second layer's input depends on it
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.uniform_(-1, 1)
    data = loader(5, shift=1.5)
    expected = by_hand(net, data[:3])
    net[1].eval()  # a frozen BN is recalibrated all the same, then left frozen
    net[4].momentum = 0.3
    assert batchnorm.recalibrate(net, data, batches=3) == 3  # stops after 3 of the 5 batches
    for bn, (mean, var) in zip([net[1], net[4]], expected):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
        assert bn.num_batches_tracked.item() == 3
    assert (net[1].momentum, net[4].momentum) == (0.1, 0.3)  # momenta restored
    assert net.training and not net[1].training and net[4].training  # modes restored


def test_nothing_to_do_without_batches_or_batchnorm():
    net = small_net()
    before = copy.deepcopy(net.state_dict())
    assert batchnorm.recalibrate(net, loader(2), batches=0) == 0
    assert batchnorm.recalibrate(nn.Linear(3, 2), loader(2), batches=2) == 0
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def _rank(rank, world, init, shared, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        net = small_net()
        shard = shared[rank]
        batchnorm.recalibrate(net, shard, batches=len(shard))
        if rank == 0:
            torch.save({k: v for k, v in net.state_dict().items() if "running" in k}, out)
        own = small_net()  # every buffer (float statistics, int64 counters) set to this rank's own value
        for buffer in own.buffers():
            buffer.fill_(rank + 1)
        batchnorm.broadcast_buffers(own)
        torch.save(dict(own.named_buffers()), f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


SHARDS = [loader(1, shift=0.0, seed=1), loader(1, shift=4.0, seed=2)]  # two ranks whose shards differ in mean


@pytest.fixture(scope="module")
def two_ranks():
    """What two gloo ranks computed: rank 0's pooled statistics, and each rank's buffers after the broadcast."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stats.pt")
        mp.spawn(_rank, args=(2, os.path.join(tmp, "init"), SHARDS, out), nprocs=2, join=True)
        return torch.load(out), [torch.load(f"{out}.rank{rank}") for rank in range(2)]


def test_statistics_are_pooled_over_ranks_with_different_shards(two_ranks):
    """Two ranks whose shards differ in mean: the pooled variance is the variance of all the data (not the
    mean of the two ranks' variances, which would miss the spread between them)."""
    pooled, shards = two_ranks[0], SHARDS
    net = small_net()
    whole = [(torch.cat([shards[0][0][0], shards[1][0][0]]), None)]
    (mean, var), _ = by_hand(net, whole)
    torch.testing.assert_close(pooled["1.running_mean"], mean, rtol=1e-4, atol=1e-4)
    # per-rank variances are unbiased over 6*6*6 = 216 values: within 1/215 of the whole data's variance
    torch.testing.assert_close(pooled["1.running_var"], var, rtol=1e-2, atol=1e-3)
    naive = []  # the mean of the two ranks' variances: what pooling without the spread would give
    for shard in shards:
        single = small_net()
        batchnorm.recalibrate(single, shard, batches=1)
        naive.append(single[1].running_var)
    naive = (naive[0] + naive[1]) / 2
    assert (pooled["1.running_var"] > naive).all() and not torch.allclose(naive, var, rtol=0.1)


def test_every_rank_ends_with_rank_0s_buffers(two_ranks):
    ranks = two_ranks[1]
    assert ranks[0].keys() == ranks[1].keys() and any(k.endswith("num_batches_tracked") for k in ranks[1])
    for name, value in ranks[1].items():
        assert torch.equal(value, ranks[0][name]) and (value == 1).all(), name
        assert value.dtype == small_net().get_buffer(name).dtype


def mnist_state(model, eval_model=None):
    torch.manual_seed(0)
    batches = [(torch.randn(16, 1, 28, 28), torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    return TrainState(model, None, epochs=2, eval_model=eval_model or model, train_loader=batches)


def rbnn_spec(tmp_path, *overrides):
    return load_spec("workloads/rbnn/specs/quickstart.yaml", [f"storage_path={tmp_path}", *overrides])


def recalibration(spec):
    run = RunContext(spec.train.epochs, str(spec.run_dir), spec.data, info(spec.data))
    return next(c for c in RBNN(spec.options).callbacks(run) if isinstance(c, batchnorm.BNRecalibration))


@pytest.mark.parametrize("arch", ["mobilenetv1_bireal_025_1w1a", "resnet20_1w1a"])
def test_rbnn_callback_recalibrates_every_evaluated_model_and_reports_the_accuracy_before(tmp_path, arch):
    model = build(arch, 10, 1, 28)
    ema = copy.deepcopy(model)  # the trained weights and their EMA are both evaluated
    state = mnist_state(model, ema)
    state.evaluated = {"": model, "ema/": ema}
    seen = []

    def evaluate(evaluated):  # the loop's evaluation: here a record of the statistics it was given
        seen.append(copy.deepcopy(evaluated.state_dict()))
        return {"test/loss": 2.0, "test/acc": 12.5, "test/acc5": 50.0}

    state.evaluate = evaluate
    callback = recalibration(rbnn_spec(tmp_path, f"model.arch={arch}"))
    assert callback.batches == 20  # the quickstart's
    trained = copy.deepcopy(model.state_dict())
    callback.on_eval_start(state)
    for evaluated in (model, ema):
        norms = batchnorm.batch_norms(evaluated)
        assert all(bn.num_batches_tracked.item() == 3 for bn in norms)  # the loader had 3 of the 20 batches
        assert any(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in norms)
    # the trained weights were evaluated once, before recalibration, with the statistics they trained with
    assert len(seen) == 1 and all(torch.equal(v, trained[k]) for k, v in seen[0].items())
    assert {k: v for k, v in state.metrics.items() if k.startswith("uncalibrated/")} == {
        "uncalibrated/test/loss": 2.0, "uncalibrated/test/acc": 12.5, "uncalibrated/test/acc5": 50.0}
    assert state.metrics["bn/recalibrated_batches"] == 3.0  # what was used


def test_recalibration_is_off_in_the_paper_presets(tmp_path):
    assert RBNN.Options().bn_recalibration_batches == 0  # the paper's evaluation protocol
    for preset in ("cifar10_resnet20_1w1a", "cifar10_mobilenetv1_bireal_05_1w1a", "cifar100_resnet18_1w1a"):
        raw = yaml.safe_load(open(f"workloads/rbnn/specs/{preset}.yaml"))
        assert RBNN.Options.model_validate(raw.get("rbnn", {})).bn_recalibration_batches == 0, preset


def test_rbnn_recalibration_can_be_turned_off(tmp_path):
    callback = recalibration(rbnn_spec(tmp_path, "rbnn.bn_recalibration_batches=0"))
    model = build("mobilenetv1_bireal_025_1w1a", 10, 1, 28)
    before = copy.deepcopy(model.state_dict())
    state = mnist_state(model)
    callback.on_eval_start(state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not state.metrics
