"""Writes the Grafana dashboards in this folder: `python dashboards/build.py`.

The JSON files are what Grafana loads (provisioned by cluster/grafana/); this script is their source, so
panels stay uniform and every query names only catalogue metrics (platform/bitfleet/metrics.py) and the
node metrics Ray exports. A unit test fails when the JSON and this script disagree. Each dashboard has a
`datasource` variable (any Prometheus) and a multi-value `run` variable; a sweep's trials share their
sweep's `run`.
"""
from __future__ import annotations

import json
from pathlib import Path

from bitfleet.metrics import RunState

HERE = Path(__file__).parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'run=~"$run"'
RATE = "$__rate_interval"
LEGEND = {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]}
STAT = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "textMode": "value_and_name",
        "colorMode": "none", "graphMode": "none"}
STATE_TIMELINE = {"showValue": "auto", "mergeValues": True, "legend": {"showLegend": False}}
RUN_STATES = [{"type": "value", "options": {
    str(RunState.RUNNING): {"text": "running", "color": "blue", "index": 0},
    str(RunState.SUCCEEDED): {"text": "succeeded", "color": "green", "index": 1},
    str(RunState.FAILED): {"text": "failed", "color": "red", "index": 2}}}]


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", description: str = "",
          kind: str = "timeseries", mappings: list[dict] = ()) -> dict:
    """A panel (a time series, a stat showing the last value, a state timeline); `targets` are (PromQL,
    legend) pairs."""
    options = {"stat": STAT, "state-timeline": STATE_TIMELINE}.get(kind, {"legend": LEGEND})
    return {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "mappings": list(mappings)}, "overrides": []},
        "options": options,
        "targets": [{"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(targets)],
    }


def by_run(metric: str, extra: str = "", labels: str = "run, trial") -> str:
    """One series per run (and trial): the max over Ray's own labels (worker id, node)."""
    selector = ", ".join(filter(None, [RUN, extra]))
    return f"max by ({labels}) ({metric}{{{selector}}})"


# The plan a worker group exports when it starts, and the step it has reached: % done, and the time left at
# the current step rate (ranks step together: any rank's rate is the run's).
PLANNED_STEPS = (f"max by (run, trial) (ray_bitfleet_planned_epochs{{{RUN}}}) "
                 f"* max by (run, trial) (ray_bitfleet_steps_per_epoch{{{RUN}}})")
STEPS_DONE = f"max by (run, trial) (ray_bitfleet_global_step{{{RUN}}})"
STEP_RATE = f"max by (run, trial) (rate(ray_bitfleet_steps_total{{{RUN}}}[{RATE}]))"

# Ray's node metrics (its `ip` label) of the nodes where the selected runs' ranks live (their series carry
# the node as `NodeAddress`), while they live there.
RUN_NODES = (f'label_replace(max by (NodeAddress) (ray_bitfleet_steps_total{{{RUN}}}), "ip", "$1", '
             f'"NodeAddress", "(.+)")')


def on_run_nodes(expr: str) -> str:
    return f"({expr}) and on (ip) {RUN_NODES}"


def quantile(q: float) -> str:
    rate = f"rate(ray_bitfleet_step_seconds_bucket{{{RUN}}}[{RATE}])"
    return f"histogram_quantile({q}, sum by (run, trial, le) ({rate}))"


EVALUATIONS = ("The trained weights by split; `ema` their moving average (train.ema); `uncalibrated` the trained "
               "weights before BatchNorm recalibration")


def evaluations(quantity: str) -> list[tuple[str, str]]:
    """One series per split of the trained weights, of their EMA and before BN recalibration."""
    return [(by_run(f"ray_bitfleet_{kind}{quantity}", labels="run, trial, split"), f"{label}{{{{run}}}} {{{{trial}}}} "
             "{{split}}") for kind, label in (("", ""), ("ema_", "ema "), ("uncalibrated_", "uncalibrated "))]


TRAINING = [
    panel("Done", [(f"{STEPS_DONE} / ({PLANNED_STEPS})", "{{run}} {{trial}}")], unit="percentunit", kind="stat",
          description="Steps taken of epochs x steps per epoch (an elastic run's changes with its group size)"),
    panel("Time left", [(f"({PLANNED_STEPS} - {STEPS_DONE}) / {STEP_RATE}", "{{run}} {{trial}}")], unit="s",
          kind="stat", description="Steps left at the current step rate (evaluation and checkpoints not counted)"),
    panel("Loss", evaluations("loss"), description=EVALUATIONS),
    panel("Accuracy (top-1)", evaluations("accuracy"), unit="percent", description=EVALUATIONS),
    panel("Accuracy (top-5)", evaluations("accuracy_top5"), unit="percent",
          description="Reported for data sets of more than 10 classes (rbnn: always). " + EVALUATIONS),
    panel("Learning rate", [(by_run("ray_bitfleet_learning_rate"), "{{run}} {{trial}}")]),
    panel("Epochs completed", [(by_run("ray_bitfleet_epoch"), "{{run}} {{trial}}")]),
    panel("Throughput", [(f"sum by (run, trial) (rate(ray_bitfleet_samples_total{{{RUN}}}[{RATE}]))",
                          "{{run}} {{trial}}"),
                         (by_run("ray_bitfleet_images_per_second"), "epoch mean {{run}} {{trial}}")],
          unit="samples/s", description="Training samples per second, all ranks: live, and the last epoch's mean"),
    panel("Epoch time", [(by_run("ray_bitfleet_epoch_seconds"), "{{run}} {{trial}}")], unit="s",
          description="Wall time of the last epoch's training (evaluation not included)"),
    panel("Workers", [(by_run("ray_bitfleet_workers"), "{{run}} {{trial}}")],
          description="Size of the worker group that ran the last epoch (elastic runs shrink and grow)"),
    panel("BatchNorm recalibration", [(by_run("ray_bitfleet_bn_recalibrated_batches"), "{{run}} {{trial}}")],
          description="Training batches that re-estimated BatchNorm statistics before the last evaluation"),
    panel("Steps per second", [(f"max by (run, trial) (rate(ray_bitfleet_steps_total{{{RUN}}}[{RATE}]))",
                                "{{run}} {{trial}}")],
          description="Optimizer steps per second (DDP ranks step together)"),
    panel("Step time", [(quantile(q), f"p{int(q * 100)} {{{{run}}}} {{{{trial}}}}") for q in (0.5, 0.9, 0.99)],
          unit="s", description="Wall time per training step, data wait included"),
    panel("Data wait", [(f"max by (run, trial, rank) (rate(ray_bitfleet_data_wait_seconds_total{{{RUN}}}[{RATE}]))",
                         "{{run}} {{trial}} rank {{rank}}")], unit="percentunit",
          description="Share of wall time each rank spends waiting for its next batch"),
    panel("Worker restarts", [(by_run("ray_bitfleet_worker_restarts"), "{{run}} {{trial}}")]),
    panel("Checkpoint time", [(by_run("ray_bitfleet_checkpoint_save_seconds"), "save {{run}} {{trial}}"),
                              (by_run("ray_bitfleet_checkpoint_restore_seconds"), "restore {{run}} {{trial}}")],
          unit="s", description="Restore appears once a worker group has restarted from a checkpoint"),
    panel("Run state", [(by_run("ray_bitfleet_run_state"), "{{run}} {{trial}}")], kind="state-timeline",
          mappings=RUN_STATES, description="Exported by the driver while it lives"),
    panel("Node CPU", [(on_run_nodes("max by (ip) (ray_node_cpu_utilization)"), "{{ip}}")], unit="percent",
          description="CPU use of the nodes the runs' workers are on (all cores: 100% is every core busy)"),
    panel("Node memory", [(on_run_nodes("max by (ip) (ray_node_mem_used) / max by (ip) (ray_node_mem_total)"),
                           "{{ip}}")], unit="percentunit", description="Memory in use on the nodes of the runs"),
    panel("GPU utilization", [(on_run_nodes("max by (ip, GpuIndex) (ray_node_gpus_utilization)"),
                               "{{ip}} GPU {{GpuIndex}}")], unit="percent",
          description="Each GPU of the nodes of the runs (no data on CPU nodes)"),
    panel("GPU memory", [(on_run_nodes("max by (ip, GpuIndex) (ray_node_gram_used) "
                                       "/ max by (ip, GpuIndex) (ray_node_gram_used + ray_node_gram_available)"),
                          "{{ip}} GPU {{GpuIndex}}")], unit="percentunit",
          description="Memory in use of each GPU of the nodes of the runs (no data on CPU nodes)"),
]

SWEEPS = [
    panel("Trials by state", [(f"max by (run) (ray_bitfleet_trials_{state}{{{RUN}}})", f"{state} {{{{run}}}}")
                              for state in ("pending", "running", "terminated", "error")]),
    panel("Held-out accuracy per trial", [(by_run("ray_bitfleet_accuracy", 'split=~"val|test"', "trial, split"),
                                           "{{trial}} {{split}}")], unit="percent"),
    panel("Training loss per trial", [(by_run("ray_bitfleet_loss", 'split="train"', "trial"), "{{trial}}")]),
    panel("Epochs per trial", [(by_run("ray_bitfleet_epoch", labels="trial"), "{{trial}}")],
          description="Trials an early-stopping scheduler ended stay at their last epoch"),
    panel("Learning rate per trial", [(by_run("ray_bitfleet_learning_rate", labels="trial"), "{{trial}}")]),
]

BINARY_NETS = [
    panel("RBNN temperature t and k", [(by_run("ray_bitfleet_temperature"), "t {{run}} {{trial}}"),
                                       (by_run("ray_bitfleet_temperature_k"), "k {{run}} {{trial}}")]),
    panel("RBNN sign flips", [(by_run("ray_bitfleet_sign_flip_ratio"), "{{run}} {{trial}}")], unit="percentunit",
          description="Share of binary weights whose sign changed during the epoch"),
    panel("RBNN rotation error", [(by_run("ray_bitfleet_rotation_error_before"), "before {{run}} {{trial}}"),
                                  (by_run("ray_bitfleet_rotation_error_after"), "after {{run}} {{trial}}")],
          description="Quantization error of the rotated weights around each rotation update"),
    panel("RBNN mean |sin θ|", [(by_run("ray_bitfleet_rotation_sin_theta"), "{{run}} {{trial}}")]),
    panel("LBPNet temperatures alpha and tau", [(by_run("ray_bitfleet_lbp_alpha"), "alpha {{run}} {{trial}}"),
                                                (by_run("ray_bitfleet_rp_tau"), "tau {{run}} {{trial}}")]),
    panel("LBPNet gate alive ratio", [(by_run("ray_bitfleet_gate_alive_ratio"), "hard {{run}} {{trial}}"),
                                      (by_run("ray_bitfleet_gate_alive_ratio_soft"), "soft {{run}} {{trial}}")],
          unit="percentunit"),
    panel("LBPNet collapse-guard events", [(by_run("ray_bitfleet_collapse_guard_events"), "{{run}} {{trial}}")]),
]

DASHBOARDS = {
    "bitfleet-training": ("bitfleet: training", "ray_bitfleet_epoch", TRAINING),
    "bitfleet-sweeps": ("bitfleet: sweeps", "ray_bitfleet_trials_running", SWEEPS),
    "bitfleet-binary-nets": ("bitfleet: binary nets", "ray_bitfleet_epoch", BINARY_NETS),
}


def variables(run_metric: str) -> list[dict]:
    run_query = f"label_values({run_metric}, run)"
    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        {"name": "run", "label": "run", "type": "query", "datasource": DATASOURCE,
         "query": {"query": run_query, "refId": "run"}, "definition": run_query, "refresh": 2,
         "multi": True, "includeAll": True, "allValue": ".+", "current": {}, "sort": 1, "hide": 0},
    ]


def dashboard(uid: str) -> dict:
    title, run_metric, panels = DASHBOARDS[uid]
    placed = [{**p, "id": i + 1, "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}}
              for i, p in enumerate(panels)]
    return {
        "uid": uid, "title": title, "tags": ["bitfleet"], "editable": True, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "timezone": "",
        "templating": {"list": variables(run_metric)}, "annotations": {"list": []}, "panels": placed,
    }


def render(uid: str) -> str:
    return json.dumps(dashboard(uid), indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    for uid in DASHBOARDS:
        (HERE / f"{uid}.json").write_text(render(uid))


if __name__ == "__main__":
    main()
