"""The tap_ppo pipeline on a real Ray cluster: float -> qat -> ppo (RLlib, env runners as Ray actors) ->
eval on synthetic CIFAR-10 pickles, then a rerun that skips all four stages."""
from __future__ import annotations

import json

import pytest
import yaml

from bitfleet.data import synthetic
from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def tiny_lenet5_pipeline(tmp_path) -> str:
    raw = yaml.safe_load(open("workloads/tap_ppo/specs/lenet5.yaml"))
    root = tmp_path / "cifar"
    synthetic.write("cifar10", root, n_train=320, n_test=100, seed=0)
    raw["data"].update(root=str(root), val_size=64, loader_workers=0)
    raw["train"].update(epochs=2, batch_size=64, eval_batch_size=100)
    raw["storage_path"] = str(tmp_path / "runs")
    raw["failure"]["max_failures"] = 2
    raw["tap_ppo"].update(episodes=24, calibration_batch=64)
    raw["tap_ppo"]["ppo"].update(train_batch_size=32, minibatch_size=16, num_epochs=2)
    raw["stages"][1]["overrides"]["train.epochs"] = 1
    raw["stages"][2]["overrides"].update({"scaling.num_workers": 1})
    path = tmp_path / "lenet5.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_four_stages_run_and_a_rerun_skips_them(ray_cluster, tmp_path):
    spec = tiny_lenet5_pipeline(tmp_path)
    out = finish(bitfleet(ray_cluster, tmp_path / "driver.log", "run", spec, "--address", ray_cluster.address))
    folder = tmp_path / "runs" / "tap-lenet5"
    assert [m["epoch"] for m in read_metrics(folder / "float")] == [1, 2]
    qat = read_metrics(folder / "qat")
    assert [m["epoch"] for m in qat] == [1] and "qat/int8_calib_acc" in qat[-1]

    stats = json.loads((folder / "qat" / "int8.json").read_text())
    assert stats["record_points"] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(3 <= t <= 255 for t in stats["tmax"].values())
    assert sum(stats["histograms"]["fc1"]) == 64 * 120  # calibration images x fc1 outputs

    episodes = [json.loads(line) for line in (folder / "ppo" / "episodes.jsonl").read_text().splitlines()]
    best = json.loads((folder / "ppo" / "tap_result.json").read_text())
    assert len(episodes) >= 24 and best["reward"] == max(e["reward"] for e in episodes)
    for name, codes in best["layers"].items():
        assert 0 < codes["b1"] < codes["b2"] < codes["tmax"] == stats["tmax"][name]
    assert "PPO iteration 1:" in out

    result = json.loads((folder / "eval" / "eval.json").read_text())
    assert result["drop"] == pytest.approx(result["teacher_int8/acc"] - result["student_tap/acc"])
    assert set(result["targets"]) == {"teacher_int8/acc", "student_tap/acc"}
    assert result["levels"] == {name: c["levels"] for name, c in best["layers"].items()}

    again = finish(bitfleet(ray_cluster, tmp_path / "rerun.log", "run", spec, "--address", ray_cluster.address))
    states = json.loads(again[again.index("{"):])
    assert {name: s["state"] for name, s in states.items()} == dict.fromkeys(["float", "qat", "ppo", "eval"], "skipped")
