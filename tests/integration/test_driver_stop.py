"""SIGTERM to the driver of a pipeline and of a sweep, on a real local cluster: the running training stage
(or trial) checkpoints at its next step and stops, nothing else starts, the driver exits 143 saying how
to continue, and the same command continues from that step. (A single run's driver: test_step_checkpoints.)
"""
from __future__ import annotations

import json
import re
import signal

import pytest
import yaml

from tests.conftest import write_spec
from tests.integration.conftest import read_metrics, wait_until
from tests.integration.test_runs import bitfleet, finish
from tests.integration.test_sweep_run import TINY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

LONG_EPOCHS = ["failure.checkpoint_every_steps=null", "failure.checkpoint_every_minutes=null",
               "failure.max_failures=3"]  # only the signal makes a mid-epoch checkpoint


def stop_with_sigterm(driver, when, what: str) -> str:
    """SIGTERM the driver once `when()` holds; it must exit 143 saying the same command continues."""
    wait_until(when, 400, what)
    driver.send_signal(signal.SIGTERM)
    driver.wait(timeout=300)
    said = driver.log.read_text()
    assert driver.returncode == 143, said[-4000:]
    assert "rerun the same command to continue" in said
    return said


def test_sigterm_to_a_pipelines_driver_stops_its_running_stage_at_a_step(ray_cluster, mnist_root, tmp_path):
    path = write_spec(tmp_path, "pipe", mnist_root, tmp_path / "results", epochs=2, max_steps_per_epoch=32)
    spec = yaml.safe_load(path.read_text())
    spec["stages"] = [{"name": "first"}, {"name": "second", "needs": ["first"], "init_from": "first",
                                          "overrides": {"train.epochs": 1, "train.max_steps_per_epoch": 4}}]
    path.write_text(yaml.safe_dump(spec))
    args = ["run", str(path), "--address", ray_cluster.address, *[x for o in LONG_EPOCHS for x in ("-o", o)]]
    first_stage = tmp_path / "results" / "pipe" / "first"

    said = stop_with_sigterm(bitfleet(ray_cluster, tmp_path / "driver-1.log", *args),
                             lambda: len(read_metrics(first_stage)) >= 1, "the first stage's epoch 1")
    assert "pipeline pipe stopped: stage(s) first at a checkpoint, 1 not started" in said
    assert not (tmp_path / "results" / "pipe" / "second").exists()  # nothing started after the request

    out = finish(bitfleet(ray_cluster, tmp_path / "driver-2.log", *args), 600)
    assert re.search(r"restored from checkpoint at epoch [12], step \d+", out), out[-4000:]  # mid-epoch
    assert [m["epoch"] for m in read_metrics(first_stage)] == [1, 2]
    assert json.loads((tmp_path / "results" / "pipe" / "second" / "stage.json").read_text())["state"] == "completed"


def test_sigterm_to_a_sweeps_driver_stops_its_trials_at_a_step_and_the_rerun_continues(ray_cluster, tmp_path):
    spec = "workloads/rbnn/specs/cifar10_resnet20_tsweep.yaml"
    overrides = [f"storage_path={tmp_path}", *TINY, *LONG_EPOCHS, "train.max_steps_per_epoch=32", "train.epochs=2",
                 "sweep.num_samples=2", "sweep.max_concurrent=1", "sweep.scheduler={type: fifo}"]
    args = ["sweep", spec, "--address", ray_cluster.address, *[x for o in overrides for x in ("-o", o)]]
    sweep_dir = tmp_path / "rbnn-cifar10-resnet20-tsweep"

    def a_trial_finished_an_epoch():
        return any(read_metrics(run) for run in (sweep_dir / "runs").glob("*"))

    stop_with_sigterm(bitfleet(ray_cluster, tmp_path / "driver-1.log", *args), a_trial_finished_an_epoch,
                      "a trial's first epoch")
    out = finish(bitfleet(ray_cluster, tmp_path / "driver-2.log", *args), 600)
    assert re.search(r"restored from checkpoint at epoch [12], step \d+", out), out[-4000:]  # mid-epoch
    rows = json.loads((sweep_dir / "trials.json").read_text())
    assert len(rows) == 2
    assert all(r["state"] == "COMPLETED" and [h["epoch"] for h in r["history"]] == [1, 2] for r in rows)
    # the trials' epochs reach the sweep driver's console and each trial run's TensorBoard files
    for row in rows:
        assert re.search(rf"\[{row['trial']}-\w+\] epoch 2/2  train loss", out), out[-3000:]
        assert list((sweep_dir / "runs" / row["runs"][-1] / "tensorboard").glob("events.out.tfevents.*"))
