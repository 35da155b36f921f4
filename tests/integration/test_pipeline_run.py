"""A pipeline on a real Ray cluster: two training stages (the second starting from the first's weights),
a report stage over both, a rerun that skips them all, and a failing stage named in the error."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from bitfleet.data import synthetic
from bitfleet.engine import checkpoint
from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish, stage_states

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

QUICK = {"train.epochs": 1, "train.max_steps_per_epoch": 3, "train.max_eval_steps": 1}


def write_pipeline(tmp_path, stages) -> str:
    spec = {
        "name": "pipe", "workload": "resnet_cifar", "model": {"arch": "resnet20", "shortcut": "A"},
        "data": {"dataset": "mnist_sample"}, "train": {"batch_size": 32, "eval_batch_size": 256},
        "scaling": {"num_workers": 1}, "failure": {"max_failures": 1}, "storage_path": str(tmp_path / "runs"),
        "stages": stages,
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_stages_run_in_order_hand_on_weights_and_a_rerun_skips_them(ray_cluster, tmp_path):
    spec = write_pipeline(tmp_path, [
        {"name": "first", "overrides": QUICK},
        {"name": "second", "needs": ["first"], "init_from": "first",
         "overrides": {**QUICK, "train.optimizer.lr": 1.0e-12, "train.optimizer.weight_decay": 0.0}},
        {"name": "report", "task": "report", "needs": ["first", "second"]},
    ])
    out = finish(bitfleet(ray_cluster, tmp_path / "driver.log", "run", spec, "--address", ray_cluster.address))
    folder = tmp_path / "runs" / "pipe"
    records = {name: json.loads((folder / name / "stage.json").read_text()) for name in ("first", "second", "report")}
    assert all(r["state"] == "completed" for r in records.values())
    assert out.index("stage first completed") < out.index("stage second started") < out.index("stage report started")
    assert ([m["epoch"] for m in read_metrics(folder / "first")] == [1]
            == [m["epoch"] for m in read_metrics(folder / "second")])
    first = checkpoint.load(checkpoint.find(folder / "first"))["model"]
    second = checkpoint.load(checkpoint.find(folder / "second"))["model"]
    convs = [k for k in first if k.endswith("conv1.weight")]
    assert convs and all(torch.allclose(first[k], second[k], atol=1e-6) for k in convs)  # started from first's
    summary = json.loads((folder / "report" / "summary.json").read_text())
    assert len(summary) == 2 and (folder / "report" / "test_accuracy.png").is_file()

    stamps = {name: (folder / name / "stage.json").stat().st_mtime_ns for name in records}
    again = finish(bitfleet(ray_cluster, tmp_path / "rerun.log", "run", spec, "--address", ray_cluster.address))
    assert "started" not in again and stage_states(again)["second"] == "skipped"
    assert stamps == {name: (folder / name / "stage.json").stat().st_mtime_ns for name in records}


def test_a_failing_stage_is_named_and_stops_the_stages_after_it(ray_cluster, tmp_path):
    root = tmp_path / "jpeg"
    synthetic.write_jpeg_folders("image_folder", root, 16, 8, np.random.default_rng(0), num_classes=4)
    for path in (root / "train").glob("*/*.JPEG"):  # corrupt, and never `bitfleet data check`ed
        path.write_bytes(path.read_bytes()[:120])
    spec = write_pipeline(tmp_path, [
        {"name": "fine", "overrides": QUICK},
        {"name": "broken", "overrides": {**QUICK, "failure.max_failures": 0, "data.dataset": "image_folder",
                                         "data.root": str(root), "data.crop_size": 32, "data.resize_size": 32}},
        {"name": "after", "needs": ["broken"], "overrides": QUICK},
    ])
    process = bitfleet(ray_cluster, tmp_path / "driver.log", "run", spec, "--address", ray_cluster.address)
    process.wait(timeout=420)
    out = process.log.read_text()
    assert process.returncode == 1
    assert "bitfleet: pipeline pipe: stage 'broken' failed" in out and "cannot decode" in out
    # independent stages of one worker each start together on the 2-CPU cluster
    assert max(out.index("stage fine started"), out.index("stage broken started")) < out.index("stage fine completed")
    assert not (tmp_path / "runs" / "pipe" / "after").exists()
    assert json.loads((tmp_path / "runs" / "pipe" / "fine" / "stage.json").read_text())["state"] == "completed"
