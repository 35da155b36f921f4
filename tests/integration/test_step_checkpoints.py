"""Mid-epoch checkpoints on a real local cluster, with real signals: a run killed three times at random
steps, one whose worker gets SIGTERM and one whose driver does, each end with the weights of the run that
was never interrupted, bit for bit (SHA-256 over the state dict's tensors), under DDP and, for
resnet_cifar, DeepSpeed ZeRO-2.

Small runs (2 workers, 3 epochs of 8 steps, a checkpoint every 3 steps) with every schedule acting inside
them: lbpnet's freeze, temperatures and hard fine-tune, rbnn's rotation updates and its BN-only epoch.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
from pathlib import Path

import pytest

from bitfleet.engine import checkpoint
from tests.conftest import write_spec
from tests.integration.conftest import read_metrics, wait_until
from tests.integration.test_runs import _alive, bitfleet, finish, worker_pids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).parents[2]
SHORT = ["train.epochs=3", "train.max_steps_per_epoch=8", "train.batch_size=32", "train.max_eval_steps=2",
         "scaling.num_workers=2", "scaling.cpus_per_worker=1", "data.loader_workers=0",
         "failure.checkpoint_every_steps=3", "failure.keep=3", "failure.max_failures=10"]
QUICKSTARTS = {  # workload -> its quickstart spec and what puts every schedule inside 3 epochs
    "lbpnet": ("workloads/lbpnet/specs/quickstart.yaml", ["lbpnet.hard_finetune.start_epoch=2",
                                                         "lbpnet.hard_finetune.bn_recal_batches=2"]),
    "rbnn": ("workloads/rbnn/specs/quickstart.yaml", ["rbnn.bn_recalibration_batches=2"]),
}


def run_args(cluster, spec: Path, name: str, storage: Path, extra=()) -> list[str]:
    overrides = [f"name={name}", f"storage_path={storage}", *SHORT, *extra]
    return ["run", str(spec), "--address", cluster.address, *[x for o in overrides for x in ("-o", o)]]


def final_weights_sha(run_dir: Path) -> str:
    state = checkpoint.load(json.loads((run_dir / "result.json").read_text())["last_checkpoint"])
    assert state["epoch"] == 3 and not state["step_in_epoch"], "the run did not finish"
    return checkpoint.weights_sha256(state["model"])


def newest_step(run_dir: Path) -> int:
    steps = []
    for folder in run_dir.glob("checkpoint_*"):
        try:
            steps.append(checkpoint.manifest(folder)["step"] or 0)
        except (OSError, ValueError):
            pass
    return max(steps, default=0)


def current_workers(log: Path) -> list[int]:
    """The live workers of the group that started last."""
    pids = worker_pids(log)[-2:]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids), f"no live group of two: {pids}"
    return pids


def restores(log: Path) -> int:
    """How many worker groups have restored (their rank 0 says so; Ray may forward a line twice)."""
    return len(set(re.findall(r"restored from checkpoint at epoch [^\n]*\(pid (\d+)\)", log.read_text())))


@pytest.fixture(scope="module")
def specs(tmp_path_factory, mnist_root):
    """workload -> the spec file every run of that workload starts from."""
    folder = tmp_path_factory.mktemp("specs")
    found = {workload: REPO / path for workload, (path, _) in QUICKSTARTS.items()}
    found["resnet_cifar"] = write_spec(folder, "resnet", mnist_root, folder, epochs=3)
    return found


CASES = {  # case -> (workload, its overrides)
    "resnet_cifar": ("resnet_cifar", []),
    "lbpnet": ("lbpnet", QUICKSTARTS["lbpnet"][1]),
    "rbnn": ("rbnn", QUICKSTARTS["rbnn"][1]),
    "resnet_cifar-zero2": ("resnet_cifar", ["train.strategy=deepspeed", "train.deepspeed={zero_stage: 2}"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_three_times_at_random_steps_ends_with_the_uninterrupted_weights(ray_cluster, specs, tmp_path, case):
    workload, extra = CASES[case]
    if "deepspeed" in " ".join(extra):
        pytest.importorskip("deepspeed")  # the `deepspeed` extra (CI installs it)
    storage = tmp_path / "results"
    twin = bitfleet(ray_cluster, tmp_path / "twin.log", *run_args(ray_cluster, specs[workload], "twin", storage, extra))
    finish(twin, 600)

    log = tmp_path / "killed.log"
    driver = bitfleet(ray_cluster, log, *run_args(ray_cluster, specs[workload], "killed", storage, extra))
    rng = random.Random(case)
    for kills, target in enumerate(sorted(rng.sample(range(2, 22), 3))):  # of 24 steps; a kill redoes the
        # steps since the last checkpoint. Each kill hits the group that restored from the kill before it.
        wait_until(lambda k=kills: restores(log) >= k, 300, f"restore {kills}")
        wait_until(lambda t=target: newest_step(storage / "killed") >= t, 300, f"a checkpoint at step {target}")
        os.kill(rng.choice(current_workers(log)), signal.SIGKILL)
    out = finish(driver, 600)

    assert restores(log) == 3, out[-4000:]
    assert ", step " in out  # restored mid-epoch at least once
    assert final_weights_sha(storage / "killed") == final_weights_sha(storage / "twin")


def test_sigterm_to_a_worker_and_to_the_driver_stop_at_a_step_and_lose_nothing(ray_cluster, specs, tmp_path):
    storage, spec = tmp_path / "results", specs["resnet_cifar"]
    # only the signals make mid-epoch checkpoints; epochs of 32 steps, long enough to be signalled inside one
    longer = ["failure.checkpoint_every_steps=null", "train.max_steps_per_epoch=32"]
    finish(bitfleet(ray_cluster, tmp_path / "twin.log", *run_args(ray_cluster, spec, "twin", storage, longer)), 600)

    # a worker's SIGTERM (a spot reclaim): the group checkpoints at the next step and Ray restarts it from there
    log = tmp_path / "worker.log"
    driver = bitfleet(ray_cluster, log, *run_args(ray_cluster, spec, "worker", storage, longer))
    wait_until(lambda: len(read_metrics(storage / "worker")) >= 1, 300, "epoch 1")
    os.kill(current_workers(log)[-1], signal.SIGTERM)
    out = finish(driver, 600)
    assert re.search(r"restored from checkpoint at epoch [12], step \d+", out), out[-4000:]
    assert final_weights_sha(storage / "worker") == final_weights_sha(storage / "twin")

    # the driver's SIGTERM: the workers checkpoint at the next step and the run stops; a rerun continues it
    args = run_args(ray_cluster, spec, "driver", storage, longer)
    first = bitfleet(ray_cluster, tmp_path / "driver-1.log", *args)
    wait_until(lambda: len(read_metrics(storage / "driver")) >= 1, 300, "epoch 1")
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=300)
    said = first.log.read_text()
    assert first.returncode == 143, said[-4000:]
    assert re.search(r"stopped at a checkpoint in epoch [23], after step \d+; rerun the same command", said)
    out = finish(bitfleet(ray_cluster, tmp_path / "driver-2.log", *args), 600)
    assert re.search(r"restored from checkpoint at epoch [12], step \d+", out), out[-4000:]
    assert final_weights_sha(storage / "driver") == final_weights_sha(storage / "twin")
