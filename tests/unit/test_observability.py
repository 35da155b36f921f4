"""Observability without a cluster: the metric catalogue, Prometheus's config and rules (promtool), the
Grafana dashboards and provisioning, docker-compose, and `bitfleet status` on a real exposition text."""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from bitfleet import metrics, registry, status
from bitfleet.resolve import validate_spec

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
PROMETHEUS = CLUSTER / "prometheus"
ALLOWED_LABELS = {"run", "workload", "trial", "rank", "split"}
METRIC = re.compile(r"\bray_bitfleet_\w+")
RAY_NODE_METRIC = re.compile(r"\bray_node_\w+")


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
                "rbnn/rotated_weights"}  # rbnn's weight histogram: a TensorBoard tag, not a metric


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
    from ray.dashboard.consts import GPU_TAG_KEYS, NODE_TAG_KEYS
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    registry.load_all()
    catalogue = {m.query_name for m in metrics.catalogue()}
    ray_exports = {f"ray_{name}" for name in METRICS_GAUGES}  # what Ray's node agent exports, by its own table
    assert {"ip", "GpuIndex"} <= set(GPU_TAG_KEYS) and "ip" in NODE_TAG_KEYS  # the labels the node panels use
    on_dashboards, node_metrics = set(), set()
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
            assert panel["type"] in ("timeseries", "stat", "state-timeline") and panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]
                assert 'run=~"$run"' in target["expr"], (uid, panel["title"])
                used = {re.sub(r"_bucket$", "", name) for name in METRIC.findall(target["expr"])}
                assert used and used <= catalogue, (uid, panel["title"], used - catalogue)
                on_dashboards |= used
                node_metrics |= set(RAY_NODE_METRIC.findall(target["expr"]))
    platform = {m.query_name for m in metrics.PLATFORM}
    assert platform - on_dashboards == set(), "platform metrics no dashboard shows"
    assert node_metrics >= {"ray_node_cpu_utilization", "ray_node_mem_used", "ray_node_gpus_utilization",
                            "ray_node_gram_used"} and node_metrics <= ray_exports, node_metrics - ray_exports


def test_run_state_panel_names_each_state_as_status_does():
    state = next(p for p in dashboards()["bitfleet-training"]["panels"] if p["title"] == "Run state")
    assert state["type"] == "state-timeline"
    mapped = state["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {int(value): m["text"] for value, m in mapped.items()} == status.STATES


def panel_expr(title: str, run: str = "r") -> str:
    """A training-dashboard query with Grafana's variables filled in as Grafana would."""
    panel = next(p for p in dashboards()["bitfleet-training"]["panels"] if p["title"] == title)
    return panel["targets"][0]["expr"].replace("$run", run).replace("$__rate_interval", "5m")


def test_done_time_left_and_node_panels_on_known_series(tmp_path):
    """Prometheus's own engine (promtool) on series shaped as Ray exports them: a run resumed at step 1000 of
    5 x 1000, two ranks on two nodes stepping once a second; a third node without the run's workers."""
    ray = 'SessionName="s",Version="2.60.0"'
    series = [(f'ray_bitfleet_steps_total{{run="r",trial="",rank="{rank}",NodeAddress="{node}",WorkerId="w{rank}",'
               f'{ray}}}', "0+60x10") for rank, node in (("0", "10.0.0.1"), ("1", "10.0.0.2"))]
    worker0 = f'run="r",trial="",WorkerId="w0",NodeAddress="10.0.0.1",{ray}'
    series += [(f"ray_bitfleet_{name}{{{worker0}}}", values) for name, values in (
        ("planned_epochs", "5x10"), ("steps_per_epoch", "1000x10"), ("global_step", "1000+60x10"))]
    nodes = {"10.0.0.1": (50, 4, 80, 6), "10.0.0.2": (25, 2, 40, 2), "10.0.0.3": (99, 9, 99, 9)}  # cpu, mem, gpu, gram
    for ip, (cpu, mem, gpu, gram) in nodes.items():
        node = f'ip="{ip}",IsHeadNode="false",RayNodeType="worker",{ray}'
        series += [(f"ray_node_cpu_utilization{{{node}}}", f"{cpu}x10"), (f"ray_node_mem_used{{{node}}}", f"{mem}x10"),
                   (f"ray_node_mem_total{{{node}}}", "10x10")]
        for index in (0, 1):  # Ray's labels of a GPU; memory in MiB
            card = f'{node},GpuIndex="{index}",GpuDeviceName="NVIDIA H100",GpuUuid="GPU-{ip}-{index}"'
            series += [(f"ray_node_gpus_utilization{{{card}}}", f"{gpu + index}x10"),
                       (f"ray_node_gram_used{{{card}}}", f"{gram}x10"),
                       (f"ray_node_gram_available{{{card}}}", f"{10 - gram}x10")]
    expected = {
        "Done": [('{run="r"}', 0.32)],  # (1000 + 600) / (5 x 1000)
        "Time left": [('{run="r"}', 3400)],  # 3400 steps at one a second
        "Node CPU": [('{ip="10.0.0.1"}', 50), ('{ip="10.0.0.2"}', 25)],
        "Node memory": [('{ip="10.0.0.1"}', 0.4), ('{ip="10.0.0.2"}', 0.2)],
        "GPU utilization": [(f'{{ip="{ip}",GpuIndex="{i}"}}', u + i) for ip, u in (("10.0.0.1", 80), ("10.0.0.2", 40))
                            for i in (0, 1)],
        "GPU memory": [(f'{{ip="{ip}",GpuIndex="{i}"}}', m) for ip, m in (("10.0.0.1", 0.6), ("10.0.0.2", 0.2))
                       for i in (0, 1)],
    }
    tests = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": [{"expr": panel_expr(title), "eval_time": "10m",
                              "exp_samples": [{"labels": labels, "value": value} for labels, value in samples]}
                             for title, samples in expected.items()]}]}
    (tmp_path / "panels_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    assert shutil.which("promtool"), "promtool is missing: apt-get install prometheus"
    done = subprocess.run(["promtool", "test", "rules", "panels_test.yml"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


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
    # Ray's own dashboards: the head's temp dir, mounted at the same path (session_latest is an absolute link);
    # tests/integration/test_observability.py finds them there in a real head's temp dir
    ray = yaml.safe_load((provisioning / "dashboards" / "ray.yml").read_text())["providers"][0]
    assert "ray-tmp:/tmp/ray:ro" in services["grafana"]["volumes"]
    assert ray["options"]["path"] == "/tmp/ray/session_latest/metrics/grafana/dashboards" and ray["folder"] == "Ray"
    # the Ray dashboard's server asks Grafana on the compose network; a browser loads the panels from the host
    head_env, grafana_env = services["ray-head"]["environment"], services["grafana"]["environment"]
    assert head_env["RAY_GRAFANA_HOST"] == "http://grafana:3000"
    assert head_env["RAY_GRAFANA_IFRAME_HOST"] == "${RAY_GRAFANA_IFRAME_HOST:-http://localhost:3000}"
    assert grafana_env["GF_SECURITY_ALLOW_EMBEDDING"] == "true"


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
    plan = {name: Gauge(f"ray_bitfleet_{name}", "", ["run", "workload", "trial", *ray_labels], registry=registry)
            for name in ("planned_epochs", "steps_per_epoch", "global_step")}
    epoch.labels("cifar", "rbnn", "", "w0", "s").set(3)
    loss.labels("cifar", "rbnn", "", "train", "w0", "s").set(1.25)
    acc.labels("cifar", "rbnn", "", "test", "w0", "s").set(71.5)
    steps.labels("cifar", "rbnn", "", "0", "w0", "s").inc(30)
    steps.labels("cifar", "rbnn", "", "1", "w1", "s").inc(30)
    steps.labels("ended", "rbnn", "", "0", "w9", "s").inc(12)
    for name, value in (("planned_epochs", 10), ("steps_per_epoch", 10), ("global_step", 30)):
        plan[name].labels("cifar", "rbnn", "", "w0", "s").set(value)
    state.labels("cifar", "rbnn", "", "driver", "s").set(metrics.RunState.FAILED)
    epoch.labels("sweep", "lbpnet", "t_00001", "w2", "s").set(1)
    running.labels("sweep", "lbpnet", "", "driver2", "s").set(1)
    done.labels("sweep", "lbpnet", "", "driver2", "s").set(3)
    return generate_latest(registry).decode()


def test_status_reads_runs_and_sweeps_from_an_exposition():
    runs, sweeps = status.collect([exposition()])
    # "ended": only counters, which Ray keeps after its processes end
    assert [(r.run, r.trial, r.workload) for r in runs] == [("cifar", "", "rbnn"), ("sweep", "t_00001", "lbpnet")]
    cifar = runs[0].values
    assert cifar["bitfleet_steps"] == 60 and cifar["bitfleet_epoch"] == 3  # counters summed over ranks
    assert cifar["bitfleet_loss:train"] == 1.25 and cifar["bitfleet_accuracy:test"] == 71.5
    assert sweeps == {"sweep": {"running": 1, "terminated": 3}}
    lines = status.render(runs, sweeps).splitlines()
    assert lines[0].split()[:6] == ["RUN", "TRIAL", "WORKLOAD", "STATE", "DONE", "EPOCH"]
    assert lines[1].split() == ["cifar", "-", "rbnn", "failed", "30%", "3", "30", "1.2500", "-", "71.50", "-", "-"]
    assert lines[2].split()[:6] == ["sweep", "t_00001", "lbpnet", "running", "-", "1"]  # no plan exported
    assert lines[4].split() == ["SWEEP", "PENDING", "RUNNING", "TERMINATED", "ERROR"]
    assert lines[5].split() == ["sweep", "0", "1", "3", "0"]
    assert status.render([], {}) == "no bitfleet runs or sweeps on this cluster"


@pytest.mark.timeout(60)  # the old loop never ended
def test_status_watch_ends_on_ctrl_c_even_where_sigint_was_ignored(monkeypatch, capsys):
    """Ctrl+C sets a flag that the refresh loop reads: a KeyboardInterrupt raised inside Ray's client calls
    could be swallowed there, and a process started with SIGINT ignored (a background job) gets no
    KeyboardInterrupt at all."""
    import os
    import signal
    import threading

    refreshes = []
    monkeypatch.setattr(status, "status", lambda address: refreshes.append(address) or "RUN  STATE")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        assert status.watch("127.0.0.1:1", 0.1) == 0
        timer.join()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # the caller's handling is back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(refreshes) >= 2 and capsys.readouterr().out.count("Ctrl+C ends") == len(refreshes)
