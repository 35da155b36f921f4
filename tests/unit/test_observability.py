"""Observability without a cluster: the metric catalogue, Prometheus's config and rules (promtool), the
Grafana dashboards and provisioning, docker-compose, and `bitfleet status` on a real exposition text."""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from bitfleet import metrics, registry, status
from bitfleet.resolve import validate_spec

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
PROMETHEUS = CLUSTER / "prometheus"
ALLOWED_LABELS = {"run", "workload", "trial", "rank", "split"}
METRIC = re.compile(r"\bray_bitfleet_\w+")


def promtool(*args: str) -> str:
    assert shutil.which("promtool"), "promtool is missing: apt-get install prometheus"
    done = subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_config_and_rules_and_the_rule_tests_pass():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "5 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_rule_test():
    rules = [r["alert"] for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    tested = {case["alertname"] for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert set(rules) == tested


def test_catalogue_names_labels_and_keys():
    registry.load_all()
    names = [m.name for m in metrics.catalogue()]
    assert len(names) == len(set(names)) and all(n.startswith("bitfleet_") for n in names)
    assert all(set(m.labels) <= ALLOWED_LABELS and set(metrics.RUN_LABELS) <= set(m.labels)
               for m in metrics.catalogue())
    assert metrics.lookup("val/acc") == (metrics.BY_NAME["bitfleet_accuracy"], {"split": "val"})
    assert metrics.lookup("test/acc5")[0].name == "bitfleet_accuracy_top5"
    assert metrics.lookup("lr")[0].name == "bitfleet_learning_rate" and metrics.lookup("lr")[1] == {}
    assert metrics.lookup("paper/ops")[0].name == "bitfleet_lbpnet_ops" and metrics.lookup("nope/x") is None
    assert metrics.BY_NAME["bitfleet_steps"].query_name == "ray_bitfleet_steps_total"
    assert metrics.BY_NAME["bitfleet_loss"].query_name == "ray_bitfleet_loss"


NOT_REPORTED = {"student_tap/acc", "teacher_int8/acc",  # tap_ppo's eval stage writes these to its eval.json
                "rbnn/rotated_weights"}  # a TensorBoard histogram (TrainState.histograms), no Prometheus gauge


def test_the_core_catalogue_names_no_paper_and_each_workload_declares_the_keys_it_reports():
    """A key a workload reports without a metric would never reach Prometheus; a declared key it no longer
    reports would silently empty its dashboard panel."""
    papers = ("rbnn", "lbp", "rp/", "guard", "paper", "qat", "freeze", "temperature", "rotation")
    assert [m.name for m in metrics.PLATFORM if any(p in m.name or p in (m.key or "") for p in papers)] == []
    for name in ("rbnn", "lbpnet", "tap_ppo", "resnet_cifar"):
        workload = registry.workload_class(name)
        keys = {node.value for path in (REPO / "workloads" / name).glob("*.py")
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and re.fullmatch(r"[a-z_0-9]+/[a-z0-9_]+", node.value)}
        assert {key for key in keys - NOT_REPORTED if metrics.lookup(key) is None} == set(), name
        declared = {m.key for m in workload.metrics if not m.key.startswith("paper/")}  # paper/*: from QUANTITIES
        assert declared - keys == set(), name


def test_a_reported_key_no_metric_declares_is_warned_about_once_per_run(caplog):
    labels = {"run": "r", "workload": "w", "trial": ""}
    worker = metrics.WorkerMetrics(labels, rank=0)
    for _ in range(3):
        worker.epoch({"custom/score": 1.0, "other/thing": 2.0})
    warned = [r.getMessage() for r in caplog.records if "no metric declares" in r.getMessage()]
    assert len(warned) == 2 and "'custom/score'" in warned[0] and "'other/thing'" in warned[1]
    metrics.WorkerMetrics(labels, rank=0).epoch({"custom/score": 1.0})  # a new run warns again
    assert sum("no metric declares" in r.getMessage() for r in caplog.records) == 3


def test_run_labels_of_a_plain_run_and_of_a_sweep_trial(mnist_root):
    raw = {"name": "plain", "workload": "resnet_cifar", "data": {"dataset": "mnist", "root": str(mnist_root)}}
    assert metrics.run_labels(validate_spec(raw)) == {"run": "plain", "workload": "resnet_cifar", "trial": ""}
    trial = validate_spec({**raw, "name": "t1-abc", "trial_of": {"sweep": "sw", "trial": "t1"}})
    assert metrics.run_labels(trial) == {"run": "sw", "workload": "resnet_cifar", "trial": "t1"}


def dashboards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "dashboards").glob("*.json"))}


def test_dashboards_are_what_build_py_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build", REPO / "dashboards" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    boards = dashboards()
    assert sorted(boards) == sorted(build.DASHBOARDS)
    for uid in boards:
        assert (REPO / "dashboards" / f"{uid}.json").read_text() == build.render(uid), "run python dashboards/build.py"


def test_dashboards_datasource_variables_and_metrics():
    registry.load_all()
    catalogue = {m.query_name for m in metrics.catalogue()}
    on_dashboards = set()
    for uid, board in dashboards().items():
        assert board["uid"] == uid and board["title"]
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        run = variables["run"]
        assert run["type"] == "query" and run["multi"] and run["includeAll"]
        assert re.fullmatch(r"label_values\(ray_bitfleet_\w+, run\)", run["query"]["query"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]
                assert 'run=~"$run"' in target["expr"], (uid, panel["title"])
                used = {re.sub(r"_bucket$", "", name) for name in METRIC.findall(target["expr"])}
                assert used and used <= catalogue, (uid, panel["title"], used - catalogue)
                on_dashboards |= used
    platform = {m.query_name for m in metrics.PLATFORM}
    assert platform - on_dashboards == set(), "platform metrics no dashboard shows"


def test_alert_rules_use_catalogue_metrics_only():
    registry.load_all()
    catalogue = {m.query_name for m in metrics.catalogue()}
    text = (PROMETHEUS / "alerts.yml").read_text()
    assert set(METRIC.findall(text)) <= catalogue


def test_grafana_provisioning_and_compose_agree():
    compose = yaml.safe_load((CLUSTER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "prometheus", "grafana"}
    for name, service in services.items():  # every bind mount names a file or folder of this repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (CLUSTER / source).exists(), (name, source)
    head, worker = services["ray-head"]["command"], services["ray-worker"]["command"]
    assert "--metrics-export-port=8080" in head and "--metrics-export-port=8080" in worker
    assert "--temp-dir=/tmp/ray" in head and "ray-tmp:/tmp/ray" in services["ray-head"]["volumes"]
    assert "ray-tmp:/tmp/ray:ro" in services["prometheus"]["volumes"]
    sd_files = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]["file_sd_configs"][0]
    assert sd_files["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert services["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"

    provisioning = CLUSTER / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "bitfleet.yml").read_text())["providers"][0]
    assert f"../dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]


def exposition() -> str:
    """What a node's metrics agent serves: Ray's prefix and extra labels, one counter series per rank."""
    registry = CollectorRegistry()
    ray_labels = ["WorkerId", "SessionName"]
    epoch = Gauge("ray_bitfleet_epoch", "", ["run", "workload", "trial", *ray_labels], registry=registry)
    loss = Gauge("ray_bitfleet_loss", "", ["run", "workload", "trial", "split", *ray_labels], registry=registry)
    acc = Gauge("ray_bitfleet_accuracy", "", ["run", "workload", "trial", "split", *ray_labels], registry=registry)
    steps = Counter("ray_bitfleet_steps", "", ["run", "workload", "trial", "rank", *ray_labels], registry=registry)
    state = Gauge("ray_bitfleet_run_state", "", ["run", "workload", "trial", *ray_labels], registry=registry)
    running = Gauge("ray_bitfleet_trials_running", "", ["run", "workload", "trial", *ray_labels], registry=registry)
    done = Gauge("ray_bitfleet_trials_terminated", "", ["run", "workload", "trial", *ray_labels], registry=registry)
    epoch.labels("cifar", "rbnn", "", "w0", "s").set(3)
    loss.labels("cifar", "rbnn", "", "train", "w0", "s").set(1.25)
    acc.labels("cifar", "rbnn", "", "test", "w0", "s").set(71.5)
    steps.labels("cifar", "rbnn", "", "0", "w0", "s").inc(30)
    steps.labels("cifar", "rbnn", "", "1", "w1", "s").inc(30)
    state.labels("cifar", "rbnn", "", "driver", "s").set(metrics.RunState.FAILED)
    epoch.labels("sweep", "lbpnet", "t_00001", "w2", "s").set(1)
    running.labels("sweep", "lbpnet", "", "driver2", "s").set(1)
    done.labels("sweep", "lbpnet", "", "driver2", "s").set(3)
    return generate_latest(registry).decode()


def test_status_reads_runs_and_sweeps_from_an_exposition():
    runs, sweeps = status.collect([exposition()])
    assert [(r.run, r.trial, r.workload) for r in runs] == [("cifar", "", "rbnn"), ("sweep", "t_00001", "lbpnet")]
    cifar = runs[0].values
    assert cifar["bitfleet_steps"] == 60 and cifar["bitfleet_epoch"] == 3  # counters summed over ranks
    assert cifar["bitfleet_loss:train"] == 1.25 and cifar["bitfleet_accuracy:test"] == 71.5
    assert sweeps == {"sweep": {"running": 1, "terminated": 3}}
    lines = status.render(runs, sweeps).splitlines()
    assert lines[0].split()[:4] == ["RUN", "TRIAL", "WORKLOAD", "STATE"]
    assert lines[1].split() == ["cifar", "-", "rbnn", "failed", "3", "60", "1.2500", "-", "71.50", "-", "-"]
    assert lines[2].split()[:5] == ["sweep", "t_00001", "lbpnet", "running", "1"]
    assert lines[4].split() == ["SWEEP", "PENDING", "RUNNING", "TERMINATED", "ERROR"]
    assert lines[5].split() == ["sweep", "0", "1", "3", "0"]
    assert status.render([], {}) == "no bitfleet runs or sweeps on this cluster"
