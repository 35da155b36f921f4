"""Sweeps on a real Ray cluster, with the shipped rbnn sweep specs shrunk by overrides to the embedded MNIST
sample: ASHA stopping trials early, a sweep whose driver is killed and resumed without rerunning finished
trials, the best trial's spec accepted by `bitfleet validate`, and a PBT exploit continuing from the
donor's epoch with the mutated temperatures."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from bitfleet import cli
from tests.integration.conftest import wait_until
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(960)]

TINY = ["data.dataset=mnist_sample", "data.loader_workers=0", "scaling.cpus_per_worker=1",
        "train.max_steps_per_epoch=4", "train.max_eval_steps=1", "train.batch_size=64", "failure.max_failures=2"]


def sweep_command(cluster, tmp_path, spec, *overrides):
    args = ["sweep", spec, "--address", cluster.address]
    for item in [f"storage_path={tmp_path}", *TINY, *overrides]:
        args += ["-o", item]
    return args


def trial_folders(sweep_dir) -> dict[str, str]:
    """Trial id -> its folder's name, from Tune's own record of the experiment."""
    from ray.tune import ExperimentAnalysis

    return {trial.trial_id: Path(trial.path).name for trial in ExperimentAnalysis(str(sweep_dir)).trials}


def trial_states(sweep_dir) -> dict[str, str]:
    """Tune's own record of each trial's status (its experiment state file), read while the sweep runs.
    Tune rewrites that file in place, so a read can catch it half written: that poll sees no trials."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    try:
        trials = json.loads(states[-1].read_text()).get("trial_data", []) if states else []
    except (json.JSONDecodeError, FileNotFoundError):
        return {}
    return {json.loads(meta)["trial_id"]: json.loads(meta)["status"] for meta, _ in trials}


def ended(sweep_dir) -> list[str]:
    return [trial for trial, state in trial_states(sweep_dir).items() if state == "TERMINATED"]


def test_asha_sweep_stops_trials_early_and_resumes_after_its_driver_dies(ray_cluster, tmp_path):
    spec = "workloads/rbnn/specs/cifar10_resnet20_tsweep.yaml"
    # One trial at a time, so ASHA's decisions do not hang on which of two trials reports first: the
    # seeded second trial is worse than the first at epoch 1 (8.2% against 10.7% test accuracy) and is
    # stopped there. The driver dies once both have ended; Tune keeps no scheduler state across it.
    args = sweep_command(ray_cluster, tmp_path, spec, "train.epochs=3", "sweep.num_samples=4",
                         "sweep.max_concurrent=1", "sweep.scheduler.grace_period=1")
    sweep_dir = tmp_path / "rbnn-cifar10-resnet20-tsweep"
    driver = bitfleet(ray_cluster, tmp_path / "first.log", *args)
    finished = wait_until(lambda: len(done := ended(sweep_dir)) >= 2 and done, 400, "two finished trials")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-sweep; its trials die with it
    driver.wait()
    segments = {t: sorted(p.name for p in (sweep_dir / "runs").glob(f"{t}-*")) for t in finished}

    out = finish(bitfleet(ray_cluster, tmp_path / "second.log", *args), timeout_s=500)
    assert "resuming the sweep" in out
    for trial, runs in segments.items():  # a finished trial is not run again
        assert sorted(p.name for p in (sweep_dir / "runs").glob(f"{trial}-*")) == runs
    rows = json.loads((sweep_dir / "trials.json").read_text())
    assert sorted(r["trial"] for r in rows) == sorted(trial_folders(sweep_dir))  # a row per trial, by its id
    assert len(rows) == 4 and all(r["state"] in ("COMPLETED", "STOPPED") and r["history"] for r in rows)
    stopped = {r["trial"] for r in rows if r["state"] == "STOPPED" and r["epochs"] < 3}
    assert stopped & set(finished), f"ASHA stopped no trial of the first driver (stopped: {stopped})"
    assert any(r["state"] == "COMPLETED" and r["epochs"] == 3 for r in rows)
    header = (sweep_dir / "trials.csv").read_text().splitlines()[0]
    assert header == "trial,state,epochs,test/acc,rbnn.tmin,rbnn.tmax,rbnn.rotation_update,train.lr_schedule.type"
    best = max((r for r in rows if r["test/acc"] is not None), key=lambda r: r["test/acc"])
    assert f"best: trial {best['trial']}" in out
    assert cli.main(["validate", str(sweep_dir / "best_spec.yaml")]) == 0
    assert (sweep_dir / "sweep_test_acc_vs_rbnn.tmin.png").is_file()


def test_pbt_exploit_continues_from_the_donors_epoch_with_mutated_values(ray_cluster, tmp_path):
    # synch: both trials are ranked at every epoch, so an exploit happens however late one of them starts
    spec = "workloads/rbnn/specs/cifar10_resnet20_tsweep_pbt.yaml"
    args = sweep_command(ray_cluster, tmp_path, spec, "train.epochs=3", "sweep.num_samples=2",
                         "sweep.scheduler.perturbation_interval=1", "sweep.scheduler.quantile_fraction=0.5",
                         "sweep.scheduler.synch=true")
    finish(bitfleet(ray_cluster, tmp_path / "driver.log", *args), timeout_s=900)  # 246 s idle, over 550 s at load 12
    sweep_dir = tmp_path / "rbnn-cifar10-resnet20-tsweep-pbt"
    rows = json.loads((sweep_dir / "trials.json").read_text())
    folders = trial_folders(sweep_dir)
    assert len(folders) == 2 and sorted(r["trial"] for r in rows) == sorted(folders)  # its own id, not a donor's
    assert all(r["state"] == "COMPLETED" and [h["epoch"] for h in r["history"]] == [1, 2, 3] for r in rows)
    restarted, donors = [], []
    for row in rows:
        for run in row["runs"][1:]:  # a later start of the trial: after a pause, or an exploit of a donor
            config = json.loads((sweep_dir / "runs" / run / "config.json").read_text())["spec"]
            resume_from = Path(config["train"]["resume_from"])  # a Tune checkpoint: <trial folder>/checkpoint_*
            if resume_from.parent.name != folders[row["trial"]]:
                donors.append(resume_from)
            # never started at its last epoch: a trial's last epoch is not perturbed
            metrics = json.loads((sweep_dir / "runs" / run / "metrics.json").read_text())
            # a restored run carries its checkpoint's history; its own epochs are those with its restore count
            own = [m for m in metrics if m["restores"] == metrics[-1]["restores"]]
            assert own and own[0]["epoch"] > 1  # it continued from the checkpoint's epoch, not from scratch
            restarted.append((config, own[0]))
    assert donors, "no PBT exploit happened: no run started from another trial's checkpoint"
    assert restarted
    # the temperature follows the run's own (mutated) tmin/tmax from the restored epoch on
    for config, first in restarted:
        tmin, tmax, epochs = config["rbnn"]["tmin"], config["rbnn"]["tmax"], config["train"]["epochs"]
        expected = 10 ** (_log10(tmin) + (_log10(tmax) - _log10(tmin)) * (first["epoch"] - 1) / epochs)
        assert first["rbnn/t"] == pytest.approx(expected, rel=1e-4)


def _log10(x: float) -> float:
    import math

    return math.log10(x)
