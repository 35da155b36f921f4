"""Watching a real run on a real local Ray: the console a user sees by default (progress lines every
`train.print_freq` steps, each once, with ETAs; no Ray chatter; the end-of-run table), TensorBoard event
files and an MLflow run written by the driver; then the same run extended on a terminal (a pseudo-tty):
live bars, and the same MLflow run going on."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import write_spec
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROGRESS = re.compile(r"^\[watched\] epoch (\d)/(\d) step (\d)/6  loss \S+  lr \S+  \d+ img/s  data \d+%  "
                      r"ETA epoch \S+ run \S+$", re.M)


def test_the_console_the_trackers_and_a_terminal(ray_cluster, mnist_root, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = write_spec(tmp_path, "watched", mnist_root, tmp_path / "results", epochs=2, batch_size=32,
                      max_steps_per_epoch=6, print_freq=2, max_eval_steps=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", str(spec), "--address", ray_cluster.address, "-o", f"tracking.mlflow={{uri: '{uri}'}}"]
    out = finish(bitfleet(ray_cluster, tmp_path / "driver.log", *args, verbose=False))

    lines = PROGRESS.findall(out)
    assert sorted(lines) == [("1", "2", "2"), ("1", "2", "4"), ("2", "2", "2"), ("2", "2", "4")], out  # each once
    assert len(re.findall(r"^\[watched\] epoch [12]/2  train loss", out, re.M)) == 2
    for chatter in ("TrainingReport(", "Moving model to device", "core_worker", "RayTrainWorker pid="):
        assert chatter not in out
    assert "watched: summary" in out and "best checkpoint" in out and "wall time" in out

    run_dir = tmp_path / "results" / "watched"
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("test/acc")] == [1, 2]
    assert [e.step for e in events.Scalars("step/loss")] == [2, 4, 8, 10]  # global steps of the progress lines

    # extended by one epoch, on a terminal: live bars; the MLflow run goes on
    extend = [sys.executable, "-m", "bitfleet.cli", *args, "-o", "train.epochs=3"]
    tty = subprocess.run(["script", "-qec", shlex.join(extend), "/dev/null"], env=ray_cluster.env,
                         capture_output=True, text=True, timeout=500)
    assert tty.returncode == 0, tty.stdout[-3000:]
    assert "━" in tty.stdout and "\x1b[" in tty.stdout  # rich's bar, drawn with terminal escapes
    assert "restored from checkpoint at epoch 2" in tty.stdout

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("watched").experiment_id])
    assert run.data.params["train.batch_size"] == "32"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")] == [1, 2, 3]
