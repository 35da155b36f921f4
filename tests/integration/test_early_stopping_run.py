"""Early stopping on a real cluster: the run ends after the epoch its patience ran out, says so, keeps that
epoch's checkpoint, and a rerun of the same command restores it and ends at once, training nothing more."""
from __future__ import annotations

import json

import pytest

from tests.conftest import write_spec
from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_run_stops_early_cleanly_and_a_rerun_stays_stopped(ray_cluster, mnist_root, tmp_path):
    # no epoch can improve on the first by more than 100 accuracy points: patience 2 ends it after epoch 3 of 6
    spec = write_spec(tmp_path, "stops", mnist_root, tmp_path / "results", epochs=6, max_steps_per_epoch=4,
                      early_stopping={"patience": 2, "min_delta": 100.0})
    run = ["run", str(spec), "--address", ray_cluster.address]
    log = finish(bitfleet(ray_cluster, tmp_path / "driver.log", *run))
    run_dir = tmp_path / "results" / "stops"
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert "early stopping: test/acc has not improved by more than 100 for 2 epochs" in log
    assert "stopped after epoch 3 of 6" in log
    result = json.loads((run_dir / "result.json").read_text())
    assert result["final"]["epoch"] == 3 and result["last_checkpoint"]  # the stopping epoch was checkpointed

    rerun = finish(bitfleet(ray_cluster, tmp_path / "rerun.log", *run))
    assert "restored from checkpoint at epoch 3" in rerun and "stopped after epoch 3 of 6" in rerun
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]  # nothing trained after the stop
