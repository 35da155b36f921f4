"""The lbpnet quickstart on a real Ray cluster (shortened by overrides), then its integer export.

The run uses the quickstart spec as shipped, on the synthetic IDX MNIST with a validation split: every
callback runs (freeze, temperatures, hard fine-tune with BN recalibration, guard, telemetry), and the
exported integer engine must predict what the checkpointed model's hard path predicts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bitfleet import export
from bitfleet.data import build_datasets
from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish
from workloads.lbpnet.intengine import IntegerLBPNet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

QUICKSTART = "workloads/lbpnet/specs/quickstart.yaml"


def test_quickstart_runs_reports_telemetry_and_exports_an_equal_integer_engine(ray_cluster, mnist_root, tmp_path):
    overrides = [
        "name=lbpnet-quick", f"storage_path={tmp_path}", "data.dataset=mnist", f"data.root={mnist_root}",
        "data.val_size=128", "train.epochs=3", "train.max_steps_per_epoch=4", "train.batch_size=64",
        "lbpnet.freeze_schedule.freeze_offsets_epochs=1", "lbpnet.hard_finetune.start_epoch=2",
        "lbpnet.hard_finetune.bn_recal_batches=2", "failure.max_failures=2",
    ]
    args = ["run", QUICKSTART, "--address", ray_cluster.address]
    for item in overrides:
        args += ["-o", item]
    finish(bitfleet(ray_cluster, tmp_path / "driver.log", *args))

    run_dir = tmp_path / "lbpnet-quick"
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    last = metrics[-1]
    for key in ("val/acc", "test/acc", "lbp/alpha", "rp/tau", "rp/alive_soft", "rp/alive_hard", "guard/collapse_events",
                "paper/size_bytes", "paper/gops", "paper/cmp"):
        assert key in last, key
    assert metrics[0]["lbp/alpha"] > last["lbp/alpha"]  # annealed from 1.5 towards 0.1
    assert last.get("hard_finetune/active") == 1.0 and last.get("bn/recalibrated_batches") == 2.0

    out = tmp_path / "engine.npz"
    finish(bitfleet(ray_cluster, tmp_path / "export.log", "export", str(run_dir), "--out", str(out)))
    spec, _, model = export.load_model(run_dir)
    test = build_datasets(spec.data).test
    images, _ = next(iter(DataLoader(test, batch_size=len(test))))
    with torch.no_grad():
        expected = model(images).argmax(1).numpy()
    codes = np.stack([test.data[i].numpy()[None] for i in range(len(test))])  # the raw uint8 IDX pixels
    assert np.array_equal(IntegerLBPNet(out).predict(codes), expected)
