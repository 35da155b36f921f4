"""`bitfleet report`: curves and a summary next to the paper's number, from a run folder's files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitfleet import report


def write_run(folder, name="lbp", accs=(90.0, 97.0, 96.5)):
    folder.mkdir(parents=True)
    spec = {"name": name, "workload": "lbpnet", "model": {}, "targets": {"test/acc": 99.5}}
    (folder / "config.json").write_text(json.dumps({"spec": spec}))
    metrics = [
        {"epoch": i + 1, "train/loss": 1.0 / (i + 1), "test/acc": acc, "val/acc": acc - 1, "paper/size_bytes": 2928.0}
        for i, acc in enumerate(accs)
    ]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_report_writes_curves_and_a_summary_with_the_gap_to_the_paper(tmp_path):
    run = write_run(tmp_path / "lbp")
    out = Path(report.write([run]))
    assert (out / "train_loss.png").stat().st_size > 0 and (out / "test_accuracy.png").stat().st_size > 0
    (row,) = json.loads((out / "summary.json").read_text())
    assert (row["best_test_acc"], row["best_epoch"], row["final_test_error"]) == (97.0, 2, 3.5)
    assert (row["paper_test_error"], row["gap_to_paper_error"]) == (0.5, 3.0)
    assert row["final_metrics"] == {"val/acc": 95.5, "paper/size_bytes": 2928.0}


def test_report_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        report.write([tmp_path])


def test_the_curves_draw_each_runs_target_in_its_colour():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    report._draw_target(ax, 91.25, "C0", "plain20")  # a paper's number: a dashed line at it
    report._draw_target(ax, [96.0, 97.0], "C1", "quick")  # an expected range: a band over it
    report._draw_target(ax, None, "C2", "cifar100")  # no published figure: nothing
    (line,) = ax.lines
    assert list(line.get_ydata()) == [91.25, 91.25] and line.get_linestyle() == "--" and line.get_color() == "C0"
    (band,) = ax.patches
    corners = band.get_path().transformed(band.get_patch_transform()).vertices[:, 1]
    assert {round(y, 6) for y in corners} == {96.0, 97.0}
    plt.close(fig)
