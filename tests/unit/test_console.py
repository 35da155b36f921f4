"""The driver's console and trackers without Ray: durations and ETAs, one-line failures, the CLI basics
(--version, list, validate --print), TensorBoard event files read back by TensorBoard's own reader and a
real local MLflow store."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from bitfleet import cli, progress
from bitfleet.engine.events import Meter
from bitfleet.errors import failure_line
from bitfleet.spec import TrackingSpec
from bitfleet.tracking import Tracker

QUICKSTART = "workloads/lbpnet/specs/quickstart.yaml"


def test_durations():
    assert [progress.duration(s) for s in (0, 42.4, 425, 3 * 3600 + 125, 51 * 3600)] == \
        ["0s", "42s", "7m05s", "3h02m", "2d03h"]
    assert progress.duration(None) == progress.duration(float("nan")) == "?"


def test_meter_etas_count_the_rest_of_the_epoch_its_evaluation_and_the_later_epochs():
    meter = Meter(every=10, steps_per_epoch=100, epochs=5)
    meter.evaluated(30.0)  # the last evaluation took 30 s
    due = [meter.step(step, 0.5, 0.1, 32) for step in range(1, 21)]  # 20 steps of 0.5 s, 0.1 s of it waiting
    assert [i + 1 for i, d in enumerate(due) if d] == [10, 20]
    fields = meter.snapshot(epoch=1, step_in_epoch=20, global_step=120, loss=2.0, lr=0.1)
    assert fields["epoch"] == 2 and fields["step"] == 20 and fields["global_step"] == 120
    assert fields["eta_epoch_s"] == pytest.approx(80 * 0.5)
    assert fields["eta_run_s"] == pytest.approx(80 * 0.5 + 30 + 3 * (100 * 0.5 + 30))  # epochs 3, 4, 5 to go
    assert fields["images_per_s"] == pytest.approx(32 / 0.5) and fields["data_wait"] == pytest.approx(0.2)
    assert not meter.step(100, 0.5, 0.0, 32)  # the epoch's last step: its epoch line follows instead


def test_the_epoch_line_shows_every_evaluated_model_of_each_split_and_no_telemetry():
    metrics = {"epoch": 3, "lr": 0.05, "images_per_s": 530.4, "test/loss": 0.38, "test/acc": 88.9,
               "train/loss": 0.41, "train/acc": 87.5, "ema/test/acc": 89.2, "uncalibrated/test/acc": 80.0,
               "rbnn/flip_ratio": 0.01, "restores": 0}
    assert progress.epoch_line("r", metrics, 8) == (
        "[r] epoch 3/8  train loss 0.41 acc 87.5  test loss 0.38 acc 88.9  ema/test acc 89.2  "
        "uncalibrated/test acc 80  lr 0.05  530 img/s")


def test_the_summary_puts_each_target_beside_its_value(tmp_path, capsys):
    from bitfleet.resolve import validate_spec
    from bitfleet.scheduler.watch import show_summary

    (tmp_path / "metrics.json").write_text(json.dumps([{"epoch": 2, "images_per_s": 100.0, "restores": 1,
                                                        "test/acc": 60.0, "ema/test/acc": 62.5}]))
    spec = validate_spec({"name": "s", "workload": "resnet_cifar", "data": {"dataset": "mnist_sample"},
                          "train": {"epochs": 2},
                          "targets": {"test/acc": 91.25, "ema/test/acc": [60, 70], "test/acc5": None}})
    show_summary(spec, {"run_dir": str(tmp_path), "best": None}, 12.0, "test/acc")
    out = capsys.readouterr().out
    assert "60 vs paper 91.25 (gap -31.25)" in out and "62.5 vs expected [60, 70] (within)" in out
    assert "final ema/test" in out and "restores" in out


def test_a_workers_error_is_the_last_line_of_its_traceback():
    ray_style = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call "
                 "last):\n  File \"x.py\", line 3, in f\n    raise ValueError('bad')\nValueError: data.root: gone")
    assert failure_line(RuntimeError(ray_style)) == "ValueError: data.root: gone"
    assert failure_line(FileNotFoundError("/x: no such run folder")) == "/x: no such run folder"
    assert failure_line(KeyError("epoch")) == "KeyError: 'epoch'"


def test_version_list_and_the_resolved_spec(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip().startswith("bitfleet 0.")
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in ("lbpnet:", "rbnn:", "resnet_cifar:", "tap_ppo:", "resnet20_1w1a", "lbpnet/specs/quickstart.yaml"):
        assert name in listed
    assert cli.main(["validate", QUICKSTART, "--print", "-o", "train.epochs=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["epochs"] == 3 and resolved["train"]["print_freq"] == 100  # a default, filled in
    assert resolved["lbpnet"]["hard_finetune"]["start_epoch"] == 7  # the workload's own section, typed


def epoch_event(epoch: int) -> dict:
    return {"kind": "epoch", "run": "r", "epochs": 2, "histograms": {"rbnn/weights": [0.1, -0.2, 0.3]},
            "metrics": {"epoch": epoch, "train/loss": 1.0 / epoch, "test/acc": 50.0 + epoch, "lr": 0.1,
                        "images_per_s": 100.0, "rbnn/flip_ratio": 0.01}}


def progress_event(step: int) -> dict:
    return {"kind": "progress", "run": "r", "global_step": step, "loss": 2.0, "lr": 0.1, "images_per_s": 90.0,
            "data_wait": 0.05}


def test_tensorboard_event_files_hold_the_epochs_the_steps_and_the_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(TrackingSpec(), str(tmp_path), "r")
    tracker.progress(progress_event(5))
    tracker.epoch(epoch_event(1))
    tracker.epoch(epoch_event(2))
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "test/acc", "lr", "images_per_s", "rbnn/flip_ratio", "step/loss", "step/lr",
            "step/images_per_s", "step/data_wait"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("test/acc")] == [(1, 51.0), (2, 52.0)]
    assert [e.step for e in events.Scalars("step/loss")] == [5]
    assert "rbnn/weights" in tags["histograms"]


def test_mlflow_run_with_the_specs_params_and_the_metrics_continued_by_a_rerun(tmp_path):
    pytest.importorskip("mlflow")  # the `test` extra installs it
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "config.json").write_text(json.dumps({"spec": {"train": {"epochs": 2}, "name": "r"}}))
    tracking = TrackingSpec.model_validate({"tensorboard": False, "mlflow": {"uri": uri, "experiment": "exp"}})
    first = Tracker(tracking, str(tmp_path), "r")
    first.epoch(epoch_event(1))
    first.close("KILLED")
    second = Tracker(tracking, str(tmp_path), "r")  # the same run, rerun: the same MLflow run goes on
    second.epoch(epoch_event(2))
    second.close()
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_name == "r" and run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test/acc")] == [(1, 51.0), (2, 52.0)]


def test_an_unreachable_cluster_fails_at_once_naming_the_address():
    import socket
    import time

    from bitfleet.scheduler.launch import reachable

    with socket.socket() as closed:  # a port that was free a moment ago: nothing listens on it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5
    reachable("auto")  # left to Ray: a local cluster's address file, or a new one


@pytest.mark.parametrize("width", [60, 80, 200])
def test_a_live_bar_keeps_where_the_run_is_and_then_the_bar_on_a_narrow_terminal(width, monkeypatch):
    import io

    from rich.console import Console
    from rich.progress import Progress

    from bitfleet import console

    text = io.StringIO()
    terminal = Console(file=text, width=width, force_terminal=True, color_system=None)
    monkeypatch.setattr(console, "_bars", Progress(*console._bars.columns, console=terminal))
    monkeypatch.setitem(console._state, "live", True)
    console.show_progress({"run": "a-longer-run-name", "epoch": 3, "epochs": 120, "step": 500, "steps": 5005,
                           "loss": 2.3, "lr": 0.0987, "images_per_s": 812.0, "data_wait": 0.04,
                           "eta_epoch_s": 3720.0, "eta_run_s": 442000.0})
    console.end_progress("a-longer-run-name")
    drawn = [line.replace("\x1b[2K", "") for line in re.split(r"[\r\n]", text.getvalue()) if "500/5005" in line][-1]
    assert drawn.startswith("[a-longer-run-name] epoch 3/120 step 500/5005 ") and len(drawn) <= width
    assert ("━" in drawn and "ETA 1h02m" in drawn) == (width >= 80)  # the stats are cut short first
    assert ("ETA 1h02m / run 5d02h  loss 2.3" in drawn) == (width > 80)
