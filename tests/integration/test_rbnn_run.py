"""Short rbnn runs on a real Ray cluster: resnet20_1w1a on synthetic CIFAR-10 pickles and the quickstart on
the embedded MNIST sample, with rotation updates, the BN-only stage and weight histograms, and a second
stage started from the first run's weights (`train.init_from`)."""
from __future__ import annotations

import math

import pytest
import torch

from bitfleet.data import synthetic
from bitfleet.engine import checkpoint
from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def run(cluster, tmp_path, spec, *overrides):
    args = ["run", spec, "--address", cluster.address]
    for item in [f"storage_path={tmp_path}", "failure.max_failures=2", *overrides]:
        args += ["-o", item]
    finish(bitfleet(cluster, tmp_path / "driver.log", *args))


def test_resnet20_1w1a_on_cifar_pickles(ray_cluster, tmp_path):
    root = tmp_path / "cifar"
    synthetic.write("cifar10", root, n_train=256, n_test=64, seed=0)
    run(ray_cluster, tmp_path, "workloads/rbnn/specs/cifar10_resnet20_1w1a.yaml", "name=rbnn-cifar",
        f"data.root={root}", "data.loader_workers=0", "train.epochs=3", "train.batch_size=64",
        "train.eval_batch_size=64", "rbnn.rotation_update=1", "rbnn.bn_only_epochs=1")
    metrics = read_metrics(tmp_path / "rbnn-cifar")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["rbnn/t"] == pytest.approx(1e-2) and metrics[1]["rbnn/t"] > metrics[0]["rbnn/t"]
    assert all(m["rbnn/rotation_error_after"] <= m["rbnn/rotation_error_before"] + 1e-6 for m in metrics[:2])
    assert "rbnn/rotation_error_after" not in metrics[2] and metrics[2]["rbnn/bn_only"] == 1.0
    assert 0 <= metrics[1]["rbnn/flip_ratio"] <= 1

    # a second stage starting from the first run's weights (ReActNet's stage 2 path): with a vanishing lr the
    # binarized convs' weights it ends with are the ones it started from
    run(ray_cluster, tmp_path, "workloads/rbnn/specs/cifar10_resnet20_1w1a.yaml", "name=rbnn-stage2",
        f"data.root={root}", "data.loader_workers=0", "train.epochs=1", "train.batch_size=64",
        "train.optimizer.lr=1.0e-12", "train.optimizer.weight_decay=0.0", f"train.init_from={tmp_path / 'rbnn-cifar'}")
    start = checkpoint.load(checkpoint.find(tmp_path / "rbnn-cifar"))["model"]
    end = checkpoint.load(checkpoint.find(tmp_path / "rbnn-stage2"))["model"]
    convs = [k for k in start if k.endswith("conv.weight")]
    assert convs and all(torch.allclose(start[k], end[k], atol=1e-6) for k in convs)


def test_quickstart_on_the_embedded_mnist_sample(ray_cluster, tmp_path):
    run(ray_cluster, tmp_path, "workloads/rbnn/specs/quickstart.yaml", "name=rbnn-quick", "train.epochs=2",
        "train.max_steps_per_epoch=6", "train.max_eval_steps=2", "rbnn.weight_hist=1", "rbnn.bn_only_epochs=0")
    metrics = read_metrics(tmp_path / "rbnn-quick")
    assert [m["epoch"] for m in metrics] == [1, 2] and math.isfinite(metrics[-1]["train/loss"])
    assert (sorted(p.name for p in (tmp_path / "rbnn-quick" / "weight_hist").glob("*.png"))
            == ["epoch_0001.png", "epoch_0002.png"])
