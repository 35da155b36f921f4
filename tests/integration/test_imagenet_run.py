"""The ImageNet data plane on a real Ray cluster: rbnn's resnet18_1w1a on a synthetic JPEG class-folder set
(with one corrupt file, found by `bitfleet data check` and left out), two workers, DALI decoding on CPU."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bitfleet import cli
from bitfleet.data import synthetic
from tests.integration.conftest import read_metrics
from tests.integration.test_rbnn_run import run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_resnet18_1w1a_two_workers_dali_on_cpu(ray_cluster, tmp_path, capsys):
    root = tmp_path / "folders"
    synthetic.write_jpeg_folders("image_folder", root, 48, 24, np.random.default_rng(0), num_classes=12)
    first_class = root / "train" / "n01440764"
    (first_class / "truncated.JPEG").write_bytes(sorted(first_class.glob("*.JPEG"))[0].read_bytes()[:300])
    assert cli.main(["data", "check", str(root), "--workers", "2"]) == 1  # found, reported, recorded
    assert "unreadable: train/n01440764/truncated.JPEG" in capsys.readouterr().out

    run(ray_cluster, tmp_path, "workloads/rbnn/specs/imagenet_resnet18_1w1a.yaml", "name=rbnn-dali",
        "data.dataset=image_folder", f"data.root={root}", "data.loader_workers=1", "data.crop_size=72",
        "data.resize_size=80", "scaling.use_gpu=false", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        "train.epochs=2", "train.batch_size=16", "train.eval_batch_size=8", "train.amp=false")
    metrics = read_metrics(tmp_path / "rbnn-dali")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["train/loss"]) and 0 <= m["test/acc"] <= m["test/acc5"] <= 100 for m in metrics)
