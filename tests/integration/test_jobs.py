"""End to end through Ray Jobs on a real `ray start --head` with token auth: plain `ray job submit ... -- bitfleet
run SPEC`, and `bitfleet submit | logs | stop`, which follow a job the way `ray job submit` does."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_spec
from tests.integration.conftest import read_metrics, wait_until
from tests.integration.test_runs import bitfleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def run_bitfleet(env: dict, *args: str, timeout: float = 480) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitfleet.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def job_info(cluster, job_id: str) -> dict:
    """The job as the job server recorded it (Ray's own client, with the cluster's token)."""
    code = ("import json, sys; from ray.job_submission import JobSubmissionClient; info = "
            "JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2]); "
            "print(json.dumps({'runtime_env': info.runtime_env, 'entrypoint': info.entrypoint}))")
    done = subprocess.run([sys.executable, "-c", code, cluster.dashboard, job_id], env=cluster.env,
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def test_submit_streams_the_run_and_exits_with_its_code_the_flag_winning_over_the_variables(
        ray_cluster, mnist_root, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    spec = write_spec(work, "streamed", mnist_root, tmp_path / "results", epochs=1)
    (work / "runtime_env.yaml").write_text(yaml.safe_dump({"env_vars": {"FROM_FILE": "1"}, "excludes": ["*.npz"]}))
    dead = f"http://127.0.0.1:{closed_port()}"
    env = {**ray_cluster.env, "RAY_ADDRESS": dead, "RAY_API_SERVER_ADDRESS": dead}
    done = run_bitfleet(env, "submit", str(spec), "--address", ray_cluster.dashboard, "--working-dir", str(work),
                        "--runtime-env", str(work / "runtime_env.yaml"), "--env", "FROM_FLAG=2",
                        "--exclude", "scratch/")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "submitted bitfleet-streamed" in done.stdout.splitlines()
    assert str(tmp_path / "results" / "streamed") in done.stdout  # the run's own output, streamed from the job
    assert done.stderr.splitlines()[-1] == "bitfleet: job bitfleet-streamed succeeded"
    assert len(read_metrics(tmp_path / "results" / "streamed")) == 1

    recorded = job_info(ray_cluster, "bitfleet-streamed")
    assert recorded["entrypoint"] == "bitfleet run streamed.yaml"
    assert recorded["runtime_env"]["env_vars"] == {"FROM_FILE": "1", "FROM_FLAG": "2",
                                                   "RAY_JOB_STOP_WAIT_TIME_S": "60"}  # grace 30 s + 30
    assert {"*.npz", "scratch/", ".git"} <= set(recorded["runtime_env"]["excludes"])

    # without a flag: RAY_ADDRESS; the run's name finds its newest job
    logs = run_bitfleet({**ray_cluster.env, "RAY_ADDRESS": ray_cluster.dashboard}, "logs", "streamed", timeout=120)
    assert logs.returncode == 0 and str(tmp_path / "results" / "streamed") in logs.stdout, logs.stderr


def test_submit_exits_with_the_code_of_the_run_the_job_refused(ray_cluster, mnist_root, tmp_path):
    """The data is where the submitting machine's home says, not where the job's does: `bitfleet run` in the
    job refuses the spec (exit 2), and submit says so and exits 2."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (home / "mnist").symlink_to(mnist_root)
    spec = write_spec(work, "elsewhere", Path("~/mnist"), tmp_path / "results", epochs=1)
    done = run_bitfleet({**ray_cluster.env, "HOME": str(home)}, "submit", str(spec), "--address",
                        ray_cluster.dashboard, "--working-dir", str(work), "--env", f"HOME={tmp_path / 'job-home'}")
    assert done.returncode == 2, (done.stdout + done.stderr)[-4000:]
    assert f"data.root: MNIST IDX files not found under {tmp_path / 'job-home' / 'mnist'}" in done.stdout
    last = done.stderr.splitlines()[-1]
    assert last.startswith("bitfleet: job bitfleet-elsewhere failed: ") and "exit code 2" in last, done.stderr


def test_a_stopped_job_ends_at_a_checkpoint_and_its_follower_exits_143(ray_cluster, mnist_root, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    spec = write_spec(work, "halted", mnist_root, tmp_path / "results", epochs=30, batch_size=32)
    submitted = run_bitfleet(ray_cluster.env, "submit", str(spec), "--address", ray_cluster.dashboard,
                             "--working-dir", str(work), "--no-wait", timeout=180)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    follow_hint = f"follow it: bitfleet logs bitfleet-halted --follow --address {ray_cluster.dashboard}"
    lines = submitted.stdout.splitlines()
    assert lines[lines.index("submitted bitfleet-halted") + 1] == follow_hint
    follower = bitfleet(ray_cluster, tmp_path / "follow.log", "logs", "halted", "--follow", "--address",
                        ray_cluster.dashboard)
    run_dir = tmp_path / "results" / "halted"
    wait_until(lambda: read_metrics(run_dir) or follower.poll() is not None, 300, "the run's first epoch")
    assert follower.poll() is None, (tmp_path / "follow.log").read_text()[-4000:]

    watch = bitfleet(ray_cluster, tmp_path / "watch.log", "status", "--watch", "1", "--address", ray_cluster.address)
    wait_until(lambda: watch.log.read_text().count("\nhalted ") >= 3, 120, "three refreshes showing the run")
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=60) == 0 and "Traceback" not in watch.log.read_text()
    rows = [line.split() for line in watch.log.read_text().splitlines() if line.startswith("halted ")]
    # gauges set once (the plan) or once an epoch stay exported while their process lives: every refresh has them
    assert all(row[4].endswith("%") and row[5].isdigit() for row in rows), rows

    stop = run_bitfleet(ray_cluster.env, "stop", "bitfleet-halted", "--address", ray_cluster.dashboard, timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert stop.stderr.splitlines()[-1] == "bitfleet: job bitfleet-halted was stopped"
    assert follower.wait(timeout=120) == 143
    followed = (tmp_path / "follow.log").read_text()
    assert "bitfleet: run halted stopped at a checkpoint" in followed  # the driver's own line, streamed
    assert followed.splitlines()[-1] == "bitfleet: job bitfleet-halted was stopped"
    assert len(read_metrics(run_dir)) < 30


def test_a_client_without_the_clusters_token_is_told_in_one_line(ray_cluster):
    env = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH")}
    for args in (["status", "--address", ray_cluster.address], ["logs", "x", "--address", ray_cluster.dashboard]):
        done = run_bitfleet(env, *args, timeout=120)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "refused this client: it uses token auth; export RAY_AUTH_MODE=token" in done.stderr
