"""A workload from outside bitfleet's tree (tests/workloads/regression.py, registered by entry point) trains
on a real local Ray with its own loss, reports its own metrics and ranks its checkpoints by its own one."""
from __future__ import annotations

import json

import pytest

from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_regression_workload_ranks_its_checkpoints_by_val_mse(ray_cluster, tmp_path):
    spec = tmp_path / "regression.yaml"
    spec.write_text(json.dumps({  # JSON is YAML
        "name": "regress", "workload": "regression", "model": {"hidden": 16},
        "data": {"dataset": "mnist_sample", "val_size": 500},
        "train": {"epochs": 4, "batch_size": 64, "max_steps_per_epoch": 6, "optimizer": {"lr": 0.02},
                  "lr_schedule": {"type": "constant"}},
        "scaling": {"num_workers": 1}, "failure": {"max_failures": 2, "keep": 1},
        "storage_path": str(tmp_path / "results"),
    }))
    log = finish(bitfleet(ray_cluster, tmp_path / "driver.log", "run", str(spec), "--address", ray_cluster.address))

    run_dir = tmp_path / "results" / "regress"
    history = read_metrics(run_dir)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    assert all({"train/mse", "val/mse", "val/mae", "test/mse"} <= set(m) and "test/acc" not in m for m in history)
    assert history[-1]["train/mse"] < history[0]["train/mse"]  # it learns
    result = json.loads((run_dir / "result.json").read_text())
    best_epoch = min(history, key=lambda m: m["val/mse"])
    assert result["best"]["val/mse"] == best_epoch["val/mse"] and result["best"]["epoch"] == best_epoch["epoch"]
    assert "no metric declares" not in log, log[-2000:]  # its metrics reach Prometheus
    assert json.loads((run_dir / "config.json").read_text())["spec"]["model"] == {"hidden": 16}
