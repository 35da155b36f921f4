"""`bitfleet report RUN_DIR... | SWEEP_DIR`: curves of finished runs and a summary next to the paper.

Runs: reads each run's `config.json` (resolved spec, with the paper's numbers in `targets`) and
`metrics.json` (one entry per epoch); writes `train_loss.png`, `test_accuracy.png` and `summary.json`.
A sweep folder (it holds `trials.json`): the metric against the epoch for every trial, and the metric
against each searched parameter (`sweep_<metric>_by_epoch.png`, `sweep_<metric>_vs_<path>.png`).
Folders may be object-store URIs (s3://, gs://, file://): read and written through pyarrow, as runs are.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

from bitfleet import storage

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def load_run(run_dir: str | Path) -> dict:
    run_dir = str(run_dir)
    missing = [f for f in ("config.json", "metrics.json") if not storage.exists(storage.join(run_dir, f))]
    if missing:
        raise FileNotFoundError(f"{run_dir}: not a bitfleet run directory (missing {', '.join(missing)})")
    config = _read_json(run_dir, "config.json")
    return {"dir": run_dir, "spec": config["spec"], "metrics": _read_json(run_dir, "metrics.json")}


def _read_json(folder: str, name: str):
    return json.loads(storage.read_text(storage.join(folder, name)))


def summarize(run: dict) -> dict:
    spec, metrics = run["spec"], run["metrics"]
    best = max(metrics, key=lambda m: m["test/acc"])
    last = metrics[-1]
    row = {
        "run": spec["name"], "workload": spec["workload"], "model": spec.get("model", {}),
        "epochs": len(metrics), "final_test_acc": last["test/acc"],
        "final_test_error": round(100 - last["test/acc"], 2),
        "best_test_acc": best["test/acc"], "best_epoch": best["epoch"], "final_train_loss": last["train/loss"],
        # the workload's own figures at the end (validation, paper metrics, temperatures, ...)
        "final_metrics": {k: v for k, v in last.items() if "/" in k and not k.startswith(("train/", "test/"))},
    }
    target = spec.get("targets", {}).get("test/acc")
    if isinstance(target, list):  # an expected range rather than one paper number
        row.update(expected_test_acc=target, within_expected=target[0] <= last["test/acc"] <= target[1])
    elif target is not None:
        row.update(paper_test_error=round(100 - target, 2),
                   gap_to_paper_error=round((100 - last["test/acc"]) - (100 - target), 2))
    row["targets"] = against_targets(last, spec.get("targets", {}))  # every target: ema/*, acc5, ...
    return row


def against_targets(values: dict[str, float], targets: dict) -> dict[str, dict]:
    """Each targeted value next to its target: a paper number (gap), an expected [low, high] range (within),
    or no published figure (null)."""
    rows = {}
    for key, target in targets.items():
        if key in values:
            value = values[key]
            if target is None:
                rows[key] = {"value": value, "paper": None}
            elif isinstance(target, (list, tuple)):
                rows[key] = {"value": value, "expected": list(target), "within": target[0] <= value <= target[1]}
            else:
                rows[key] = {"value": value, "paper": target, "gap": value - target}
    return rows


def plot(runs: list[dict], key: str, ylabel: str, path: str) -> None:
    """`key` by epoch, one curve per run, each with its spec's target for `key` in the curve's colour."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        epochs = [m["epoch"] for m in run["metrics"]]
        name = run["spec"]["name"]
        (curve,) = ax.plot(epochs, [m[key] for m in run["metrics"]], label=name)
        _draw_target(ax, run["spec"].get("targets", {}).get(key), curve.get_color(), name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _draw_target(ax, target, color: str, name: str) -> None:
    """A paper's number as a dashed line; an expected [low, high] range as a band; no target, nothing."""
    if isinstance(target, (list, tuple)):
        ax.axhspan(target[0], target[1], color=color, alpha=0.12, label=f"{name} expected")
    elif isinstance(target, (int, float)):
        ax.axhline(target, color=color, linestyle="--", linewidth=1, label=f"{name} paper")


def _save(fig, path: str) -> None:
    """A figure as a PNG file, local or in object storage."""
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())


def write(run_dirs: list[str | Path], out: str | Path | None = None) -> str:
    """The report of runs (or of one sweep) into `out`, by default the first one's folder; any of them may
    be an object-store URI. Returns `out`."""
    if len(run_dirs) == 1 and storage.exists(storage.join(str(run_dirs[0]), "trials.json")):
        return write_sweep(str(run_dirs[0]), out)
    runs = [load_run(d) for d in run_dirs]
    out = str(out or runs[0]["dir"])
    plot(runs, "train/loss", "training loss", storage.join(out, "train_loss.png"))
    plot(runs, "test/acc", "test accuracy (%)", storage.join(out, "test_accuracy.png"))
    summary = [summarize(r) for r in runs]
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=1))
    return out


def write_sweep(sweep_dir: str | Path, out: str | Path | None = None) -> str:
    """Plots of a finished sweep from its `trials.json` (written by `bitfleet sweep`)."""
    sweep_dir = str(sweep_dir)
    trials, config = _read_json(sweep_dir, "trials.json"), _read_json(sweep_dir, "sweep.json")
    metric, paths = config["metric"], config["paths"]
    out = str(out or sweep_dir)
    name = metric.replace("/", "_")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial in trials:
        points = [h for h in trial["history"] if h.get(metric) is not None]
        ax.plot([h["epoch"] for h in points], [h[metric] for h in points], marker=".", label=trial["trial"])
    _finish(fig, ax, "epoch", metric, storage.join(out, f"sweep_{name}_by_epoch.png"), legend=len(trials) <= 12)
    for path in paths:
        fig, ax = plt.subplots(figsize=(5, 4))
        done = [t for t in trials if t[metric] is not None]
        values = [t[path] for t in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ax.scatter(values if numeric else [str(v) for v in values], [t[metric] for t in done])
        if numeric and values and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_xscale("log")
        _finish(fig, ax, path, metric, storage.join(out, f"sweep_{name}_vs_{path}.png"), legend=False)
    return out


def _finish(fig, ax, xlabel: str, ylabel: str, path: str, legend: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)
    _save(fig, path)
