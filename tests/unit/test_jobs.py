"""`bitfleet submit | logs | stop` and `status` without a cluster: which address wins, an address that does not
answer (one line, within the try's timeout), the job's command and runtime env, and its exit code.

The same commands against a real cluster with token auth: tests/integration/test_jobs.py."""
from __future__ import annotations

import http.server
import socket
import threading

import pytest
import yaml
from ray.job_submission import JobStatus

from bitfleet import address, cli
from bitfleet.errors import ClusterError, SpecError
from bitfleet.resolve import load_spec, validate_spec
from bitfleet.scheduler import jobs

REPO_SPECS = "workloads/lbpnet/specs"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (a hung process, a firewall that drops)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def web_server_port():
    """A real web server that is not a Ray dashboard (a mistyped port)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def no_ray_address(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def test_the_flag_wins_over_the_variables_which_come_in_rays_order(monkeypatch):
    flag, api, plain = closed_port(), closed_port(), closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{plain}")
    with pytest.raises(ClusterError, match=f"127.0.0.1:{plain}"):
        address.jobs_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{api}")
    with pytest.raises(ClusterError, match=f"127.0.0.1:{api}"):
        address.jobs_address(None)
    with pytest.raises(ClusterError, match=f"cannot reach the Ray dashboard at http://127.0.0.1:{flag}"):
        address.jobs_address(f"http://127.0.0.1:{flag}")
    with pytest.raises(ClusterError, match=f"cannot reach the Ray cluster at 127.0.0.1:{flag}: .*Connection refused"):
        address.driver_address(f"127.0.0.1:{flag}")


def test_inside_only_the_clients_read_the_chosen_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "elsewhere:6379")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    import os

    with address.only("http://head:8265", address.JOBS_VARIABLES):
        assert os.environ["RAY_ADDRESS"] == os.environ["RAY_API_SERVER_ADDRESS"] == "http://head:8265"
    assert os.environ["RAY_ADDRESS"] == "elsewhere:6379" and "RAY_API_SERVER_ADDRESS" not in os.environ


def test_a_silent_address_fails_after_one_short_try(silent_port):
    for given in (f"http://127.0.0.1:{silent_port}", f"127.0.0.1:{silent_port}"):
        with pytest.raises(ClusterError, match=f"at {given}.*: no answer within {address.TIMEOUT_S:.0f} s"):
            address.check(given)


def test_what_answers_but_is_not_ray_is_named(web_server_port):
    with pytest.raises(ClusterError, match="answers, but not as a Ray dashboard"):
        address.check(f"http://127.0.0.1:{web_server_port}")
    with pytest.raises(ClusterError, match="what answers there is not a Ray cluster"):
        address.check(f"127.0.0.1:{web_server_port}")
    with pytest.raises(ClusterError, match="joins the cluster; give its address HEAD:6379"):
        address.driver_address(f"http://127.0.0.1:{web_server_port}")
    with pytest.raises(ClusterError, match="expected http://HOST:PORT"):
        address.check("head:notaport")


@pytest.mark.parametrize("argv", [
    ["status", "--address", "127.0.0.1:{port}"], ["status", "--watch", "1", "--address", "127.0.0.1:{port}"],
    ["logs", "bitfleet-x", "--address", "http://127.0.0.1:{port}"],
    ["stop", "bitfleet-x", "--address", "http://127.0.0.1:{port}"],
    ["submit", f"{REPO_SPECS}/quickstart.yaml", "--address", "http://127.0.0.1:{port}"],
])
def test_commands_against_an_address_nothing_answers_print_one_line(argv, capsys):
    port = closed_port()
    assert cli.main([arg.format(port=port) for arg in argv]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("bitfleet: error: cannot reach the Ray") and f":{port}" in err, err


def test_without_an_address_the_jobs_commands_say_what_is_missing(no_ray_address, capsys):
    assert cli.main(["logs", "bitfleet-x"]) == 1
    assert capsys.readouterr().err == ("bitfleet: error: no Ray cluster given: pass --address http://HEAD:8265 "
                                       "(the cluster's dashboard) or export RAY_ADDRESS\n")


def test_a_sweep_spec_runs_bitfleet_sweep_in_the_job_and_a_pipeline_bitfleet_run():
    sweep = f"{REPO_SPECS}/mnist_rp_temperature_sweep.yaml"
    assert jobs.entrypoint(sweep, ["sweep.num_samples=2"], load_spec(sweep)) == (
        f"bitfleet sweep {sweep} -o sweep.num_samples=2")
    pipeline = validate_spec({"name": "pipe", "workload": "resnet_cifar", "data": {"dataset": "mnist_sample"},
                              "storage_path": "/tmp/bf-pipe", "stages": [{"name": "a"}, {"name": "b", "needs": ["a"]}]})
    assert jobs.entrypoint("p.yaml", ["name=a b"], pipeline) == "bitfleet run p.yaml -o 'name=a b'"


def test_the_runtime_env_file_and_the_flags_add_up(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("einops==0.8.0\n")
    file = tmp_path / "env.yaml"
    file.write_text(yaml.safe_dump({"pip": str(requirements), "env_vars": {"A": "1", "B": "2"},
                                    "excludes": ["*.npz"], "working_dir": str(tmp_path)}))
    env = jobs.runtime_env(str(file), pip=["mlflow>=2.16"], env=["B=3", "C=x=y"], excludes=["scratch/"])
    assert env["pip"]["packages"] == ["einops==0.8.0", "mlflow>=2.16"]
    assert env["env_vars"] == {"A": "1", "B": "3", "C": "x=y"}
    assert env["excludes"] == ["*.npz", "scratch/"] and env["working_dir"] == str(tmp_path)
    assert jobs.runtime_env(None, pip=["a", "b"]) == {"pip": ["a", "b"]}
    assert jobs.runtime_env() == {}


@pytest.mark.parametrize("file,flags,message", [
    (None, {"env": ["NOVALUE"]}, "--env 'NOVALUE': expected KEY=VALUE"),
    ("- a list\n", {}, "expected a YAML mapping of runtime env fields"),
    ("pip: {packages: 3}\n", {"pip": ["x"]}, "--runtime-env: pip: "),
    ("missing", {}, "No such file"),
])
def test_a_wrong_runtime_env_is_one_line_naming_the_flag(tmp_path, file, flags, message):
    path = None
    if file is not None:
        path = tmp_path / "env.yaml"
        if file != "missing":
            path.write_text(file)
    with pytest.raises(SpecError, match=message):
        jobs.runtime_env(str(path) if path else None, **flags)


def test_the_exit_code_is_the_jobs():
    assert jobs.exit_code(JobStatus.SUCCEEDED, 0) == 0
    assert jobs.exit_code(JobStatus.FAILED, 2) == 2  # `bitfleet run` refused the spec on the cluster
    assert jobs.exit_code(JobStatus.FAILED, None) == 1  # failed before the entrypoint ran (its runtime env)
    assert jobs.exit_code(JobStatus.STOPPED, -9) == jobs.STOPPED_EXIT == 143
