"""End to end through Ray Jobs: plain `ray job submit ... -- bitfleet run SPEC` and `bitfleet submit`."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import write_spec
from tests.integration.conftest import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_ray_job_submit_runs_a_spec(ray_cluster, mnist_root, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    write_spec(work, "jobrun", mnist_root, tmp_path / "results", epochs=2)
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_cluster.dashboard,
        "--working-dir", str(work), "--", "bitfleet", "run", "jobrun.yaml",
    ]
    done = subprocess.run(command, env=ray_cluster.env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout.lower()
    assert [m["epoch"] for m in read_metrics(tmp_path / "results" / "jobrun")] == [1, 2]


def test_bitfleet_submit_derives_the_submission_id(ray_cluster, mnist_root, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    spec = write_spec(work, "submitted", mnist_root, tmp_path / "results", epochs=1)
    command = [sys.executable, "-m", "bitfleet.cli", "submit", str(spec), "--address", ray_cluster.dashboard,
               "--working-dir", str(work), "--wait"]
    done = subprocess.run(command, env=ray_cluster.env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "bitfleet-submitted: SUCCEEDED" in done.stdout
    assert len(read_metrics(tmp_path / "results" / "submitted")) == 1
