"""The tap_ppo pipeline on a real Ray cluster: float -> qat -> ppo (RLlib, env runners as Ray actors) ->
eval on synthetic CIFAR-10 pickles; its driver killed inside the PPO search, which the rerun continues from
its checkpoint; then a rerun that skips all four stages."""
from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

from bitfleet import evaluation
from bitfleet.data import synthetic
from tests.integration.conftest import read_metrics, wait_until
from tests.integration.test_runs import bitfleet, finish, stage_states

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def tiny_lenet5_pipeline(tmp_path) -> str:
    raw = yaml.safe_load(open("workloads/tap_ppo/specs/lenet5.yaml"))
    root = tmp_path / "cifar"
    synthetic.write("cifar10", root, n_train=320, n_test=100, seed=0)
    raw["data"].update(root=str(root), val_size=64, loader_workers=0)
    raw["train"].update(epochs=2, batch_size=64, eval_batch_size=100)
    raw["storage_path"] = str(tmp_path / "runs")
    raw["failure"]["max_failures"] = 2
    raw["tap_ppo"].update(episodes=48, calibration_batch=64)  # 6 PPO iterations of 8 episodes
    raw["tap_ppo"]["ppo"].update(train_batch_size=32, minibatch_size=16, num_epochs=2)
    raw["stages"][1]["overrides"]["train.epochs"] = 1
    raw["stages"][2]["overrides"].update({"scaling.num_workers": 1})
    path = tmp_path / "lenet5.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_four_stages_run_a_killed_search_continues_and_a_rerun_skips_them(ray_cluster, tmp_path):
    spec = tiny_lenet5_pipeline(tmp_path)
    folder = tmp_path / "runs" / "tap-lenet5"
    search = folder / "ppo" / "ppo_checkpoint" / "bitfleet.json"
    driver = bitfleet(ray_cluster, tmp_path / "killed.log", "run", spec, "--address", ray_cluster.address)
    wait_until(search.is_file, 420, "the PPO search's first checkpoint")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, and the stage with it, dies inside the search
    driver.wait()
    assert not (folder / "ppo" / "stage.json").exists(), "the search ended before the kill: make it longer"
    saved = json.loads(search.read_text())["episodes"]
    before = (folder / "ppo" / "episodes.jsonl").read_text().splitlines()[:saved]

    out = finish(bitfleet(ray_cluster, tmp_path / "driver.log", "run", spec, "--address", ray_cluster.address))
    assert "stage float started" not in out and f"({saved} episodes)" in out and "PPO resumed at iteration" in out
    assert [m["epoch"] for m in read_metrics(folder / "float")] == [1, 2]
    qat = read_metrics(folder / "qat")
    assert [m["epoch"] for m in qat] == [1] and "qat/int8_calib_acc" in qat[-1]

    stats = json.loads((folder / "qat" / "int8.json").read_text())
    assert stats["record_points"] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(3 <= t <= 255 for t in stats["tmax"].values())
    assert sum(stats["histograms"]["fc1"]) == 64 * 120  # calibration images x fc1 outputs

    lines = (folder / "ppo" / "episodes.jsonl").read_text().splitlines()
    assert lines[:saved] == before  # the episodes before the checkpoint kept, none searched twice
    episodes = [json.loads(line) for line in lines]
    best = json.loads((folder / "ppo" / "lenet5_ppo_result.json").read_text())
    assert len(episodes) >= 48 and best["reward"] == max(e["reward"] for e in episodes)
    progress = json.loads((folder / "ppo" / "ppo_progress.json").read_text())
    assert [p["iteration"] for p in progress] == list(range(1, len(progress) + 1))
    for name, codes in best["layers"].items():
        assert 0 < codes["b1"] < codes["b2"] < codes["tmax"] == stats["tmax"][name]

    result = json.loads((folder / "eval" / "eval.json").read_text())
    assert result["drop"] == pytest.approx(result["teacher_int8/acc"] - result["student_tap/acc"])
    # `bitfleet eval` of the QAT stage measures its INT8 network: the eval stage's teacher, the calibration's
    int8 = evaluation.evaluate_run(str(folder / "qat"), out=str(tmp_path / "int8.json"))
    assert int8["measured"] == "deployed form" and int8["test/acc"] == result["teacher_int8/acc"]
    calibration = evaluation.evaluate_run(str(folder / "qat"), "val", out=str(tmp_path / "int8.json"))
    assert calibration["val/acc"] == qat[-1]["qat/int8_calib_acc"] == stats["int8_calib_acc"]
    assert set(result["targets"]) == {"teacher_int8/acc", "student_tap/acc"}
    assert result["levels"] == {name: c["levels"] for name, c in best["layers"].items()}

    again = finish(bitfleet(ray_cluster, tmp_path / "rerun.log", "run", spec, "--address", ray_cluster.address))
    assert stage_states(again) == dict.fromkeys(["float", "qat", "ppo", "eval"], "skipped")
