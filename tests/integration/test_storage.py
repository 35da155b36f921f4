"""storage_path on a cluster of two nodes: a folder only the head sees is refused before the run starts.

The second node is a real raylet joined to the test cluster, started in its own mount namespace where the
head's folder is covered by an empty tmpfs, which is what a folder on the head's local disk looks like
from another machine. It has no CPUs, so no other test's workers land on it, and leaves when the test
ends.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.conftest import GCS_PORT, stop, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def alive_nodes(cluster) -> int:
    probe = "import ray; ray.init(address='auto', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", probe], env={**cluster.env, "RAY_ADDRESS": cluster.address},
                         capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


@pytest.fixture
def blind_node(ray_cluster, tmp_path):
    """A node that cannot see `tmp_path / 'head-only'` (yielded)."""
    hidden = tmp_path / "head-only"
    hidden.mkdir()
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mount namespaces (unshare --mount), needed to hide a folder")
    start = (f"mount -t tmpfs tmpfs {hidden} && exec {sys.executable} -m ray.scripts.scripts start --block "
             f"--address=127.0.0.1:{GCS_PORT} --num-cpus=0 --disable-usage-stats")
    before = alive_nodes(ray_cluster)
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", start],
                            env=ray_cluster.env, stdout=open(tmp_path / "node.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until(lambda: alive_nodes(ray_cluster) == before + 1, 120, "the second node to join")
        yield hidden
    finally:
        stop(node)


def test_a_head_only_storage_path_is_refused_and_a_shared_one_accepted(ray_cluster, blind_node, mnist_root, tmp_path):
    from tests.conftest import write_spec

    spec = write_spec(tmp_path, "headonly", mnist_root, blind_node)
    run = subprocess.run([sys.executable, "-m", "bitfleet.cli", "run", str(spec), "--address", ray_cluster.address],
                         env=ray_cluster.env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"storage_path: {blind_node} is a folder of this machine only" in run.stderr
    assert "of the 2-node cluster cannot see it" in run.stderr and "s3://" in run.stderr
    assert not (blind_node / "headonly").exists() and list(blind_node.iterdir()) == []  # nothing started

    shared = tmp_path / "shared"  # outside the tmpfs: the same folder for both nodes, as a mount would be
    check = ("import ray, sys; ray.init(address='auto', logging_level='ERROR'); from bitfleet.storage import "
             "check_shared; check_shared(sys.argv[1]); print('shared')")
    ok = subprocess.run([sys.executable, "-c", check, str(shared)],
                        env={**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address},
                        capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("shared"), ok.stderr[-3000:]
