"""A standing Ray cluster for the integration tests, started and stopped by the tests themselves.

`ray start --head --block` runs as our child with token auth, its own temp dir and ports outside Ray's
worker port range; it is stopped by SIGTERM to that pid (it drains and stops its processes), then its
process group is killed if anything is left. Nothing else on the machine is touched.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.workloads import site as workloads_site

REPO = Path(__file__).parents[2]
# ports outside Ray's worker range; BITFLEET_TEST_PORT_OFFSET moves them all, for a second suite beside this one
_OFFSET = int(os.environ.get("BITFLEET_TEST_PORT_OFFSET", "0"))
GCS_PORT, DASHBOARD_PORT = 26379 + _OFFSET, 28265 + _OFFSET
_OTHER_PORTS = {flag: 26380 + i + _OFFSET for i, flag in enumerate((
    "--ray-client-server-port", "--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
    "--dashboard-agent-listen-port", "--metrics-export-port", "--runtime-env-agent-port"))}


@dataclass
class Cluster:
    process: subprocess.Popen
    env: dict[str, str]
    temp_dir: Path  # holds prom_metrics_service_discovery.json, Prometheus's list of metrics endpoints
    address: str = f"127.0.0.1:{GCS_PORT}"
    dashboard: str = f"http://127.0.0.1:{DASHBOARD_PORT}"


def _wait_for_dashboard(cluster: Cluster, timeout_s: float = 120) -> None:
    """Until `ray job list` (with the cluster's token) answers: the Jobs API is what the tests need."""
    deadline = time.monotonic() + timeout_s
    command = [sys.executable, "-m", "ray.scripts.scripts", "job", "list", "--address", cluster.dashboard]
    while subprocess.run(command, env=cluster.env, capture_output=True).returncode != 0:
        if cluster.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {cluster.process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray dashboard at {cluster.dashboard} did not answer in {timeout_s}s")
        time.sleep(2)


@pytest.fixture(scope="session")
def ray_cluster():
    temp_dir = tempfile.mkdtemp(prefix="bf-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONUNBUFFERED": "1",
           "RAY_metrics_report_interval_ms": "1000",  # metrics reach the export port within a second
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops at once: the drain (30 s) is for Serve
           # Train's controller collects each worker's report when it polls (every 2 s by default), and a
           # worker's next report waits for that: the tests' epochs of a second would take two without this
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    # inherited by Ray's own processes too: its helpers that look a cluster up (Train's placement-group
    # cleaner) then find this one, not another cluster of this machine that /tmp/ray happens to name
    env["RAY_ADDRESS"] = f"127.0.0.1:{GCS_PORT}"
    # the test-only workloads (tests/workloads) as an installed package would be: found by entry point by
    # the drivers and the workers alike, with no edit to bitfleet
    site = workloads_site.write(Path(temp_dir) / "site")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    ports = [f"{flag}={port}" for flag, port in _OTHER_PORTS.items()]
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--temp-dir={temp_dir}",
        f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}", "--dashboard-host=127.0.0.1",
        "--num-cpus=2", "--disable-usage-stats", *ports,
    ]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    cluster = Cluster(process, env, Path(temp_dir))
    try:
        _wait_for_dashboard(cluster)
        yield cluster
    finally:
        stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop(process: subprocess.Popen) -> None:
    """Stop a `ray start --block` (head or node) we started: SIGTERM drains it, then its group goes."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever the drain left behind, in our group only
    except ProcessLookupError:
        pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else []


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)
    return value
