"""The real Prometheus scraping a real cluster: every dashboard query and every alert expression returns data.

Prometheus (Debian's package, installed by .ci/run) runs on loopback with cluster/prometheus's config,
pointed at the test cluster's service-discovery file and scraping every second. Against it: an rbnn run
on CIFAR-100 pickles (top-5 and RBNN telemetry), restarted from its checkpoint by a second driver (restore
metrics), beside an lbpnet sweep of two trials (LBPNet telemetry, trial counts). `bitfleet status` is read
while they run.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from bitfleet.data import synthetic
from tests.integration.conftest import _OFFSET, wait_until
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "cluster" / "prometheus"
PORT = 29090 + _OFFSET  # beside another suite's, as the cluster's ports
URL = f"http://127.0.0.1:{PORT}"
RUN, SWEEP = "obs-rbnn", "obs-lbpnet-sweep"


@pytest.fixture
def prometheus(ray_cluster, tmp_path):
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [
        str(ray_cluster.temp_dir / "prom_metrics_service_discovery.json")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert shutil.which("prometheus"), "the Prometheus server is missing: apt-get install prometheus"
    process = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{PORT}"],
        stdout=open(tmp_path / "prometheus.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _ready(), 60, "Prometheus to start")
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready() -> bool:
    try:
        return urllib.request.urlopen(f"{URL}/-/ready", timeout=2).status == 200
    except OSError:
        return False


def api(path: str, **params) -> dict:
    url = f"{URL}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def query_range(expr: str, start: float, end: float) -> list[dict]:
    return api("query_range", query=expr, start=start, end=end, step=1)["result"]


def finite_values(result: list[dict]) -> list[float]:
    return [float(v) for series in result for _, v in series["values"] if math.isfinite(float(v))]


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, PromQL) for every target, with Grafana's variables filled in as Grafana would."""
    queries = []
    for path in sorted((REPO / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$run", f"{RUN}|{SWEEP}").replace("$__rate_interval", "10s")
                queries.append((board["uid"], panel["title"], expr))
    return queries


def alert_signals() -> list[tuple[str, str]]:
    """Each alert's expression with its comparisons turned into `bool` ones: it then returns a 0/1 series
    wherever the series it watches exist, firing or not (promtool's tests check when it fires)."""
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [(rule["alert"], _with_bool(rule["expr"])) for group in groups for rule in group["rules"]]


def _with_bool(expr: str) -> str:
    out, depth = [], 0
    for token in re.split(r'("[^"]*"|==|!=|>=|<=|>|<|[{}])', expr):
        depth += token == "{"
        depth -= token == "}"
        out.append(f"{token} bool" if depth == 0 and token in ("==", "!=", ">=", "<=", ">", "<") else token)
    return "".join(out)


def test_every_panel_and_alert_has_data_from_a_real_run(ray_cluster, prometheus, tmp_path):
    start = time.time()
    root = tmp_path / "cifar100"
    synthetic.write("cifar100", root, n_train=256, n_test=64, seed=0)
    rbnn_args = ["run", "workloads/rbnn/specs/cifar10_resnet20_1w1a.yaml", "--address", ray_cluster.address]
    for item in [f"name={RUN}", f"storage_path={tmp_path}", "data.dataset=cifar100", f"data.root={root}",
                 "data.loader_workers=0", "train.batch_size=32", "train.eval_batch_size=32",
                 "train.max_steps_per_epoch=6", "train.max_eval_steps=2", "rbnn.rotation_update=1",
                 "rbnn.bn_only_epochs=0", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5",
                 "rbnn.bn_recalibration_batches=2", "train.ema={decay: 0.9}",  # the ema/* and uncalibrated/* series
                 "failure.max_failures=2"]:
        rbnn_args += ["-o", item]
    sweep_args = ["sweep", "workloads/lbpnet/specs/mnist_rp_temperature_sweep.yaml", "--address", ray_cluster.address]
    for item in [f"name={SWEEP}", f"storage_path={tmp_path}", "train.epochs=1", "train.max_steps_per_epoch=4",
                 "train.max_eval_steps=1", "train.batch_size=64", "data.loader_workers=0", "scaling.num_workers=1",
                 "scaling.cpus_per_worker=0.5", "failure.max_failures=2", "sweep.num_samples=2",
                 "sweep.max_concurrent=2", "sweep.scheduler={type: fifo}"]:
        sweep_args += ["-o", item]

    run = bitfleet(ray_cluster, tmp_path / "run.log", *rbnn_args, "-o", "train.epochs=2")
    sweep = bitfleet(ray_cluster, tmp_path / "sweep.log", *sweep_args)
    seen: list[str] = []  # `bitfleet status` lines: the run and the sweep may not overlap in time
    wait_until(lambda: _status_shows(ray_cluster, seen), 300, "bitfleet status to list the run and the sweep")
    finish(run)
    finish(bitfleet(ray_cluster, tmp_path / "rerun.log", *rbnn_args, "-o", "train.epochs=3"))  # restores epoch 2
    finish(sweep)
    time.sleep(3)  # the last values reach the export port within a second, Prometheus a second later
    end = time.time()

    assert any(line.split()[:4] == ["RUN", "TRIAL", "WORKLOAD", "STATE"] for line in seen)
    assert any(line.split()[:3] == [RUN, "-", "rbnn"] for line in seen), seen
    assert any(line.split()[0] == SWEEP and line.split()[2] == "lbpnet" for line in seen), seen

    rules = [r for g in api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(a for a, _ in alert_signals())
    assert all(r["health"] == "ok" for r in rules), rules
    assert set(api("label/run/values", **{"match[]": "ray_bitfleet_epoch"})) >= {RUN, SWEEP}

    answers = {(board, title, expr): finite_values(query_range(expr, start, end))
               for board, title, expr in dashboard_queries()}
    # GPU panels answer only where a node has a GPU: this cluster's nodes export no GPU metric at all (their
    # queries still ran, without error); tests/unit/test_observability.py evaluates them on GPU series
    assert not api("series", **{"match[]": "ray_node_gpus_available", "start": start, "end": end})
    on_gpus = {query for query in answers if re.search(r"ray_node_(gpus|gram)_", query[2])}
    assert {title for _, title, _ in on_gpus} == {"GPU utilization", "GPU memory"}
    (tmp_path / "panel_answers.json").write_text(json.dumps(  # for the record: points and last value per query
        [{"dashboard": b, "panel": t, "expr": e, "points": len(v), "last": v[-1] if v else None}
         for (b, t, e), v in answers.items()], indent=1))
    empty = [query for query, values in answers.items() if not values and query not in on_gpus]
    empty += [(alert, "alert", expr) for alert, expr in alert_signals() if not query_range(expr, start, end)]
    assert not empty, "queries without data:\n" + "\n".join(map(str, empty))

    def peak(expr: str) -> float:
        return max(finite_values(query_range(expr, start, end)))

    assert peak(f'max(ray_bitfleet_epoch{{run="{RUN}"}})') == 3
    assert peak(f'max(ray_bitfleet_planned_epochs{{run="{RUN}"}})') == 3  # the rerun extends 2 epochs to 3
    assert peak(f'max(ray_bitfleet_global_step{{run="{RUN}"}})') == 18  # 3 epochs of 6 steps, the restore's included
    done = next(expr for _, title, expr in dashboard_queries() if title == "Done")
    assert peak(done.replace(f"{RUN}|{SWEEP}", RUN)) == 1.0
    assert peak(f'max(ray_bitfleet_worker_restarts{{run="{RUN}"}})') == 1
    assert peak(f'max(ray_bitfleet_run_state{{run="{RUN}"}})') == 2  # succeeded
    assert peak(f'max(ray_bitfleet_trials_terminated{{run="{SWEEP}"}})') == 2
    assert len(api("label/trial/values", **{"match[]": f'ray_bitfleet_epoch{{run="{SWEEP}"}}'})) == 2
    top1, top5 = (peak(f'max(ray_bitfleet_{m}{{run="{RUN}",split="test"}})') for m in ("accuracy", "accuracy_top5"))
    assert 0 <= top1 <= top5 <= 100
    steps = peak(f'sum(ray_bitfleet_steps_total{{run="{RUN}"}})')
    assert steps >= 6  # the rerun's worker counts its own steps (epoch 3); counters restart with a process


def _status_shows(cluster, seen: list[str]) -> bool:
    status = subprocess.run([sys.executable, "-m", "bitfleet.cli", "status", "--address", cluster.address],
                            env=cluster.env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    seen += status.stdout.splitlines()
    return any(line.startswith(f"{RUN} ") for line in seen) and any(line.startswith(f"{SWEEP} ") for line in seen)


def test_ray_writes_its_dashboards_where_grafana_is_provisioned_to_read_them(ray_cluster):
    """cluster/grafana provisions Ray's Default and Train dashboards from the head's session folder (compose
    mounts the head's temp dir, /tmp/ray, into Grafana at the same path): a real head writes them there."""
    ray = yaml.safe_load((REPO / "cluster/grafana/provisioning/dashboards/ray.yml").read_text())["providers"][0]
    folder = ray_cluster.temp_dir / Path(ray["options"]["path"]).relative_to("/tmp/ray")
    boards = {path.name: json.loads(path.read_text()) for path in folder.glob("*.json")}
    assert {"default_grafana_dashboard.json", "train_grafana_dashboard.json"} <= set(boards), sorted(boards)
    for board in boards.values():  # each picks the provisioned Prometheus through its datasource variable
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
