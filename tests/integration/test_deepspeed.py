"""`train.strategy: deepspeed` on a real Ray cluster: 2 workers, ZeRO stage 2 on gloo, a worker SIGKILLed.

The group restarts from the last checkpoint, every rank reloads its own optimizer shard, and the run ends
with the weights of the same spec run without interruption.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from bitfleet.engine import checkpoint
from tests.conftest import write_spec
from tests.integration.conftest import read_metrics, wait_until
from tests.integration.test_runs import bitfleet, checkpointed, finish, worker_pids

pytest.importorskip("deepspeed")  # the `deepspeed` extra (CI installs it)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RECIPE = {"epochs": 3, "batch_size": 32, "strategy": "deepspeed", "deepspeed": {"zero_stage": 2},
          "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9}}


def test_zero2_worker_killed_restores_every_shard_and_ends_as_the_uninterrupted_run(ray_cluster, mnist_root, tmp_path):
    results = tmp_path / "results"
    spec = write_spec(tmp_path, "ds-kill", mnist_root, results, **RECIPE)
    driver = bitfleet(ray_cluster, tmp_path / "driver.log", "run", str(spec), "--address", ray_cluster.address)
    wait_until(lambda: checkpointed(results / "ds-kill", 1), 300, "epoch 1's checkpoint")
    victim = worker_pids(driver.log)[-1]
    os.kill(victim, signal.SIGKILL)
    out = finish(driver)

    metrics = read_metrics(results / "ds-kill")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["restores"] >= 1, f"killed pid {victim}; driver said:\n{out[-6000:]}"
    last = checkpoint.find(results / "ds-kill")
    shards = sorted(p.name for p in (last / checkpoint.SHARDS / checkpoint.TAG).glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "optimizer" not in checkpoint.load(last)  # it lives in the shards only

    twin = write_spec(tmp_path, "ds-clean", mnist_root, results, **RECIPE)
    finish(bitfleet(ray_cluster, tmp_path / "twin.log", "run", str(twin), "--address", ray_cluster.address))
    killed, clean = (checkpoint.load(checkpoint.find(results / name)) for name in ("ds-kill", "ds-clean"))
    assert killed["epoch"] == clean["epoch"] == 3 and clean["restores"] == 0
    assert killed["model"].keys() == clean["model"].keys()
    for key, value in clean["model"].items():
        assert torch.allclose(killed["model"][key].float(), value.float(), rtol=0, atol=1e-6), key
    assert [m["test/acc"] for m in metrics] == [m["test/acc"] for m in read_metrics(results / "ds-clean")]
