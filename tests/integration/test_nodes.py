"""Three nodes: the test cluster's head plus two worker nodes, started as separate raylets on this machine.

Each worker node offers one `bitfleet_worker_node`, and the run asks one per worker, so its workers land
one per node. A fixed-size run of two workers loses a node (the raylet and its workers SIGKILLed at once)
and restarts its group from the last checkpoint once a replacement node has joined. An elastic run
(`scaling.num_workers: [1, 2]`) loses a node that hosts one of its workers
mid-run (the raylet and its workers SIGKILLed at once): Ray Train restarts the group with the one worker
that still fits, from the last checkpoint. A node then joins again, and the group grows back to two
workers (from the latest checkpoint) and finishes.

Ray 2.60 sizes an elastic group from the cluster-wide AutoscalingCoordinator actor, which refreshes its
view of the nodes every 20 s; the controller asks it every `scaling.resize_check_s` (5 s here). Growth
therefore comes 25-45 s after the node joins; the run's 80 short epochs (about a second each) keep it
going for a minute or more after that.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from tests.conftest import write_spec
from tests.integration.conftest import GCS_PORT, read_metrics, stop, wait_until
from tests.integration.test_runs import _alive, bitfleet, checkpointed, finish, worker_pids
from tests.integration.test_storage import alive_nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
NODE_RESOURCE = "bitfleet_worker_node"


def start_node(cluster, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--address=127.0.0.1:{GCS_PORT}",
               "--num-cpus=1", f"--resources={json.dumps({NODE_RESOURCE: 1})}", "--disable-usage-stats"]
    return subprocess.Popen(command, env=cluster.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_node(node: subprocess.Popen) -> None:
    """The machine dies: its raylet, agents and the workers it runs, all at once."""
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait()


def _raylet_group(worker_pid: int) -> int:
    """The process group of the raylet that started a worker: the group of the node's `ray start`."""
    parent = int(open(f"/proc/{worker_pid}/stat").read().rsplit(")", 1)[1].split()[1])
    return os.getpgid(parent)


@pytest.fixture
def nodes(ray_cluster, tmp_path):
    started = []

    def add() -> subprocess.Popen:
        before = alive_nodes(ray_cluster)
        started.append(start_node(ray_cluster, tmp_path / f"node{len(started)}.log"))
        wait_until(lambda: alive_nodes(ray_cluster) == before + 1, 120, "a worker node to join")
        return started[-1]

    yield add
    for node in started:
        stop(node)


def one_worker_per_node(spec_path, num_workers, **scaling) -> None:
    spec = yaml.safe_load(spec_path.read_text())
    spec["scaling"] = {"num_workers": num_workers, "cpus_per_worker": 1, "resources_per_worker": {NODE_RESOURCE: 1},
                       **scaling}
    spec_path.write_text(yaml.safe_dump(spec))


def test_fixed_size_run_restarts_from_its_checkpoint_on_a_replacement_node(ray_cluster, nodes, mnist_root, tmp_path):
    spec_path = write_spec(tmp_path, "nodereplaced", mnist_root, tmp_path / "results", epochs=30, batch_size=32,
                           max_steps_per_epoch=4, max_eval_steps=1)
    one_worker_per_node(spec_path, 2)
    run_dir = tmp_path / "results" / "nodereplaced"
    both = [nodes(), nodes()]
    driver = bitfleet(ray_cluster, tmp_path / "driver.log", "run", str(spec_path), "--address", ray_cluster.address)
    wait_until(lambda: checkpointed(run_dir, 1), 240, "epoch 1's checkpoint")
    kill_node(both[0])  # each node hosts one of the two workers
    nodes()  # its replacement joins; the group waits for it (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s)
    out = finish(driver)

    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == list(range(1, 31))
    assert all(m["workers"] == 2 for m in metrics) and metrics[-1]["restores"] >= 1, out[-4000:]
    resumed = next(m for m in metrics if m["restores"] >= 1)
    assert resumed["epoch"] > 1 and "restored from checkpoint at epoch" in out  # continued, not started over


def test_elastic_run_shrinks_on_a_lost_node_and_grows_back_when_it_returns(ray_cluster, nodes, mnist_root, tmp_path):
    spec_path = write_spec(tmp_path, "nodeloss", mnist_root, tmp_path / "results", epochs=80, batch_size=32,
                           max_steps_per_epoch=4, max_eval_steps=1)
    one_worker_per_node(spec_path, [1, 2], resize_check_s=5)
    run_dir = tmp_path / "results" / "nodeloss"
    both = [nodes(), nodes()]
    workers = lambda: [m["workers"] for m in read_metrics(run_dir)]  # noqa: E731

    driver = bitfleet(ray_cluster, tmp_path / "driver.log", "run", str(spec_path), "--address", ray_cluster.address)
    wait_until(lambda: checkpointed(run_dir, 1) and 2 in workers(), 240, "a checkpoint of the two-worker group")
    hosts = {_raylet_group(pid) for pid in worker_pids(driver.log) if _alive(pid)}
    doomed = [node for node in both if node.pid in hosts]
    assert doomed, f"no worker runs on the worker nodes (process groups {hosts})"
    restores = read_metrics(run_dir)[-1]["restores"]  # the group may have started with one worker and grown
    kill_node(doomed[0])
    wait_until(lambda: any(m["workers"] == 1 and m["restores"] > restores for m in read_metrics(run_dir))
               or driver.poll() is not None, 240, "the group to go on with one worker")
    nodes()  # the node comes back
    out = finish(driver)

    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == list(range(1, 81))
    sizes = [size for i, size in enumerate(workers()) if i == 0 or size != workers()[i - 1]]  # runs of one size
    assert sizes[-3:] == [2, 1, 2], f"group sizes per epoch: {workers()}\n{out[-4000:]}"
    assert metrics[-1]["restores"] >= 2 and "restored from checkpoint at epoch" in out
