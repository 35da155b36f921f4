"""`bitfleet status [--watch]`: the runs and sweeps alive on a Ray cluster, with their latest metrics.

It reads what Prometheus would scrape: the metrics endpoint of every alive node (Ray's
`MetricsExportPort`), parsed with `prometheus_client`. A run shows while its workers or its driver
live: Ray drops a process's gauges when the process ends (its counters stay with the node's agent, so a
run with counters and no gauge has ended).
"""
from __future__ import annotations

import signal
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from bitfleet.address import DRIVER_VARIABLES, driver_address, only
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
        address = driver_address(address)  # one quick try first: Ray would retry a dead address for a minute
        with only(address, DRIVER_VARIABLES):  # --address wins over RAY_ADDRESS, which ray.init prefers
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
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
    alive = [row for row in runs.values() if any(BY_NAME[c.split(":")[0]].kind == "gauge" for c in row.values)]
    return sorted(alive, key=lambda r: (r.run, r.trial)), dict(sweeps)


COLUMNS = [  # header, catalogue value, format
    ("EPOCH", "bitfleet_epoch", "{:.0f}"), ("STEPS", "bitfleet_global_step", "{:.0f}"),
    ("TRAIN LOSS", "bitfleet_loss:train", "{:.4f}"), ("VAL ACC", "bitfleet_accuracy:val", "{:.2f}"),
    ("TEST ACC", "bitfleet_accuracy:test", "{:.2f}"), ("LR", "bitfleet_learning_rate", "{:.4g}"),
    ("RESTARTS", "bitfleet_worker_restarts", "{:.0f}"),
]


def render(runs: list[RunRow], sweeps: dict[str, dict[str, float]]) -> str:
    if not runs and not sweeps:
        return "no bitfleet runs or sweeps on this cluster"
    table = [["RUN", "TRIAL", "WORKLOAD", "STATE", "DONE", *(c[0] for c in COLUMNS)]]
    for row in runs:
        state = STATES.get(int(row.values.get("bitfleet_run_state", RunState.RUNNING)), "?")
        cells = [fmt.format(row.values[key]) if key in row.values else "-" for _, key, fmt in COLUMNS]
        table.append([row.run, row.trial or "-", row.workload, state, _done(row.values), *cells])
    lines = _aligned(table) if runs else []
    if sweeps:
        sweep_table = [["SWEEP", *(s.upper() for s in TRIAL_STATES)]]
        sweep_table += [[name, *(f"{counts.get(s, 0):.0f}" for s in TRIAL_STATES)]
                        for name, counts in sorted(sweeps.items())]
        lines += ([""] if lines else []) + _aligned(sweep_table)
    return "\n".join(lines)


def _done(values: dict[str, float]) -> str:
    """Share of the planned steps taken, as the training dashboard's % done."""
    planned = values.get("bitfleet_planned_epochs", 0) * values.get("bitfleet_steps_per_epoch", 0)
    return f"{100 * values['bitfleet_global_step'] / planned:.0f}%" if planned and "bitfleet_global_step" in values \
        else "-"


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def status(address: str | None) -> str:
    texts, silent = [], []
    for url in node_endpoints(address):
        try:
            texts.append(fetch(url))
        except OSError:  # a node on its way out
            silent.append(url)
    return render(*collect(texts)) + "".join(f"\n(no answer from {url})" for url in silent)


def watch(address: str | None, every_s: float) -> int:
    """The status, refreshed every `every_s` seconds until Ctrl+C: redrawn in place on a terminal, appended
    (with a time stamp) in a log. Ctrl+C sets a flag rather than raising: a KeyboardInterrupt raised inside
    Ray's client calls can be swallowed there, and the watch would go on."""
    interrupted = threading.Event()
    table = status(address)  # connects first: our handler is installed after Ray's start-up
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        while True:
            print("\x1b[H\x1b[2J" if sys.stdout.isatty() else "", end="")
            print(f"{time.strftime('%H:%M:%S')}  every {every_s:g} s, Ctrl+C ends\n{table}\n", flush=True)
            if interrupted.wait(every_s):
                return 0
            table = status(address)
    finally:
        signal.signal(signal.SIGINT, previous)
