"""`bitfleet status`: the runs and sweeps alive on a Ray cluster, with their latest metrics.

It reads what Prometheus would scrape: the metrics endpoint of every alive node (Ray's
`MetricsExportPort`), parsed with `prometheus_client`. A run shows while its workers or its driver
live; Ray drops a process's series when the process ends.
"""
from __future__ import annotations

import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from bitfleet.metrics import BY_NAME, RunState

STATES = {RunState.RUNNING: "running", RunState.SUCCEEDED: "succeeded", RunState.FAILED: "failed"}
TRIAL_STATES = ("pending", "running", "terminated", "error")


@dataclass
class RunRow:
    run: str
    trial: str
    workload: str
    values: dict[str, float] = field(default_factory=dict)  # catalogue name (+ ":split") -> latest value


def node_endpoints(address: str | None) -> list[str]:
    """http://host:port/metrics of every alive node of the cluster at `address`."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
    return [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes() if node["Alive"] and node.get("MetricsExportPort")]


def fetch(url: str, timeout_s: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def collect(expositions: list[str]) -> tuple[list[RunRow], dict[str, dict[str, float]]]:
    """Runs (one row per run and trial) and sweeps (trial counts by state) from exposition texts."""
    runs: dict[tuple[str, str], RunRow] = {}
    sweeps: dict[str, dict[str, float]] = defaultdict(dict)
    for text in expositions:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.removeprefix("ray_").removesuffix("_total")
                if name not in BY_NAME or BY_NAME[name].kind == "histogram":
                    continue
                labels = sample.labels
                if name.startswith("bitfleet_trials_"):
                    sweeps[labels["run"]][name.removeprefix("bitfleet_trials_")] = sample.value
                    continue
                key = (labels["run"], labels.get("trial", ""))
                row = runs.setdefault(key, RunRow(*key, labels.get("workload", "")))
                column = f"{name}:{labels['split']}" if "split" in labels else name
                if BY_NAME[name].kind == "counter":  # one series per rank and worker: the run's total
                    row.values[column] = row.values.get(column, 0.0) + sample.value
                else:
                    row.values[column] = max(row.values.get(column, sample.value), sample.value)
    return sorted(runs.values(), key=lambda r: (r.run, r.trial)), dict(sweeps)


COLUMNS = [  # header, catalogue value, format
    ("EPOCH", "bitfleet_epoch", "{:.0f}"), ("STEPS", "bitfleet_steps", "{:.0f}"),
    ("TRAIN LOSS", "bitfleet_loss:train", "{:.4f}"), ("VAL ACC", "bitfleet_accuracy:val", "{:.2f}"),
    ("TEST ACC", "bitfleet_accuracy:test", "{:.2f}"), ("LR", "bitfleet_learning_rate", "{:.4g}"),
    ("RESTARTS", "bitfleet_worker_restarts", "{:.0f}"),
]


def render(runs: list[RunRow], sweeps: dict[str, dict[str, float]]) -> str:
    if not runs and not sweeps:
        return "no bitfleet runs or sweeps on this cluster"
    table = [["RUN", "TRIAL", "WORKLOAD", "STATE", *(c[0] for c in COLUMNS)]]
    for row in runs:
        state = STATES.get(int(row.values.get("bitfleet_run_state", RunState.RUNNING)), "?")
        cells = [fmt.format(row.values[key]) if key in row.values else "-" for _, key, fmt in COLUMNS]
        table.append([row.run, row.trial or "-", row.workload, state, *cells])
    lines = _aligned(table) if runs else []
    if sweeps:
        sweep_table = [["SWEEP", *(s.upper() for s in TRIAL_STATES)]]
        sweep_table += [[name, *(f"{counts.get(s, 0):.0f}" for s in TRIAL_STATES)]
                        for name, counts in sorted(sweeps.items())]
        lines += ([""] if lines else []) + _aligned(sweep_table)
    return "\n".join(lines)


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def status(address: str | None) -> str:
    return render(*collect([fetch(url) for url in node_endpoints(address)]))
