"""Runs on a real standing Ray cluster: completion, a worker SIGKILLed mid-epoch, a driver killed and rerun.

On 2 busy cores Ray may restart a worker group by itself once: the specs allow failures and the tests
assert outcomes (epochs, files, restores), never timings.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitfleet.engine import checkpoint
from tests.conftest import write_spec
from tests.integration.conftest import read_metrics, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def bitfleet(cluster, log: Path, *args, verbose: bool = True) -> subprocess.Popen:
    """`bitfleet ARGS` in its own process group, its output in `log` (readable while it runs). `verbose`
    (-v): Ray forwards its processes' output too, where the tests find the workers' pids."""
    command = [sys.executable, "-m", "bitfleet.cli", *args, *(["-v"] if verbose else [])]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=cluster.env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
    process.log = log
    return process


def finish(process: subprocess.Popen, timeout_s: float = 420) -> str:
    process.wait(timeout=timeout_s)
    out = process.log.read_text()
    assert process.returncode == 0, out[-4000:]
    return out


def checkpointed(run_dir: Path, epochs: int) -> bool:
    """At least `epochs` epochs done and a checkpoint registered by Ray's controller (its snapshot).

    A checkpoint written but not yet registered when the group fails is not handed back on restart.
    """
    return len(read_metrics(run_dir)) >= epochs and (run_dir / "checkpoint_manager_snapshot.json").is_file()


def worker_pids(log: Path) -> list[int]:
    """PIDs of the current worker group, as the controller announces them ('pid=N) world_rank=R')."""
    return [int(pid) for pid in re.findall(r"pid=(\d+)\) world_rank=\d+", log.read_text())]


def test_two_worker_run_completes(ray_cluster, mnist_root, tmp_path):
    spec = write_spec(tmp_path, "complete", mnist_root, tmp_path / "results")
    finish(bitfleet(ray_cluster, tmp_path / "driver.log", "run", str(spec), "--address", ray_cluster.address))

    run_dir = tmp_path / "results" / "complete"
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["test/acc"] > 50  # synthetic classes are learnable; chance is 10%
    assert all(m["images_per_s"] > 0 for m in metrics)
    assert (run_dir / "config.json").is_file() and (run_dir / "result.json").is_file()
    assert list(run_dir.glob("checkpoint_*/state.pt"))


def test_worker_sigkilled_mid_epoch_finishes_from_checkpoint_with_the_uninterrupted_weights(
        ray_cluster, mnist_root, tmp_path):
    # 1024 images / batch 32 per step: 32 steps an epoch, long enough to be killed inside one. EMA on, so
    # its restore is checked too.
    recipe = {"epochs": 4, "batch_size": 32, "ema": {"decay": 0.9}}
    spec = write_spec(tmp_path, "workerkill", mnist_root, tmp_path / "results", **recipe)
    run_dir = tmp_path / "results" / "workerkill"
    driver = bitfleet(ray_cluster, tmp_path / "driver.log", "run", str(spec), "--address", ray_cluster.address)

    wait_until(lambda: checkpointed(run_dir, 1), 300, "epoch 1's checkpoint")
    victim = worker_pids(driver.log)[-1]
    os.kill(victim, signal.SIGKILL)

    out = finish(driver)
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["restores"] >= 1, f"killed pid {victim}; driver said:\n{out[-6000:]}"
    assert "restored from checkpoint at epoch" in out

    # Resume equivalence: the same spec run without interruption ends with the same weights, EMA and
    # optimizer state (model, optimizer, scheduler, EMA, per-epoch reseeding and sampler order restored).
    twin = write_spec(tmp_path, "uninterrupted", mnist_root, tmp_path / "results", **recipe)
    finish(bitfleet(ray_cluster, tmp_path / "twin.log", "run", str(twin), "--address", ray_cluster.address))
    killed, clean = (checkpoint.load(json.loads((tmp_path / "results" / name / "result.json").read_text())
                                     ["last_checkpoint"]) for name in ("workerkill", "uninterrupted"))
    assert killed["epoch"] == clean["epoch"] == 4 and killed["restores"] >= 1 and clean["restores"] == 0
    for part in ("model", "ema"):
        assert killed[part].keys() == clean[part].keys()
        assert all(torch.allclose(killed[part][k].float(), clean[part][k].float(), rtol=0, atol=1e-6)
                   for k in clean[part])
    momenta = [(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(killed["optimizer"]["state"].values(), clean["optimizer"]["state"].values())]
    assert momenta and all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in momenta)
    assert killed["scheduler"]["last_epoch"] == clean["scheduler"]["last_epoch"]
    assert ([m["test/acc"] for m in read_metrics(run_dir)]
            == [m["test/acc"] for m in read_metrics(tmp_path / "results" / "uninterrupted")])


def test_driver_killed_and_rerun_resumes(ray_cluster, mnist_root, tmp_path):
    spec = write_spec(tmp_path, "driverkill", mnist_root, tmp_path / "results", epochs=4, batch_size=32)
    run_dir = tmp_path / "results" / "driverkill"
    args = ("run", str(spec), "--address", ray_cluster.address)
    first = bitfleet(ray_cluster, tmp_path / "first.log", *args)
    wait_until(lambda: checkpointed(run_dir, 2), 300, "epoch 2's checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    wait_until(lambda: not any(_alive(p) for p in worker_pids(first.log)), 60, "the dead driver's workers to go")
    done_before = len(read_metrics(run_dir))

    out = finish(bitfleet(ray_cluster, tmp_path / "second.log", *args))
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["restores"] >= 1
    resumed_at = int(out.split("restored from checkpoint at epoch ")[1].split()[0])
    assert 1 <= resumed_at <= done_before  # continued, not started over


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
