"""Writes the Grafana dashboards in this folder: `python dashboards/build.py`.

The JSON files are what Grafana loads (provisioned by cluster/grafana/); this script is their source, so
panels stay uniform and every query names only catalogue metrics (platform/bitfleet/metrics.py). A unit
test fails when the JSON and this script disagree. Each dashboard has a `datasource` variable (any
Prometheus) and a multi-value `run` variable; a sweep's trials share their sweep's `run`.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'run=~"$run"'
RATE = "$__rate_interval"


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", description: str = "") -> dict:
    """A time-series panel; `targets` are (PromQL, legend) pairs."""
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]}},
        "targets": [{"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(targets)],
    }


def by_run(metric: str, extra: str = "", labels: str = "run, trial") -> str:
    """One series per run (and trial): the max over Ray's own labels (worker id, node)."""
    selector = ", ".join(filter(None, [RUN, extra]))
    return f"max by ({labels}) ({metric}{{{selector}}})"


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
    panel("Run state", [(by_run("ray_bitfleet_run_state"), "{{run}} {{trial}}")],
          description="1 running, 2 succeeded, 3 failed (exported by the driver while it lives)"),
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
