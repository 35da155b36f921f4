"""Early stopping decided from the metric history; settings that can never take effect warned about."""
from __future__ import annotations

import warnings

import pytest

from bitfleet import cli
from bitfleet.engine.early_stopping import EarlyStopping, build
from bitfleet.errors import SpecError, SpecWarning
from bitfleet.resolve import load_spec
from bitfleet.spec import EarlyStoppingSpec

MODES = {"acc": "max", "loss": "min"}


def history(values, key="test/acc"):
    return [{"epoch": i + 1, key: v} for i, v in enumerate(values)]


def test_the_run_stops_after_patience_epochs_without_an_improvement_above_min_delta():
    stop = EarlyStopping(EarlyStoppingSpec(patience=2, min_delta=0.5), "test/acc", "max")
    accs = [50.0, 60.0, 60.4, 60.3]  # +0.4 and -0.1: neither improves by more than 0.5
    assert [stop.reason(history(accs[:n])) for n in range(1, 4)] == [None, None, None]
    assert stop.reason(history(accs)) == ("early stopping: test/acc has not improved by more than 0.5 for 2 "
                                          "epochs (best 60 at epoch 2)")
    assert stop.reason(history([*accs[:3], 61.0])) is None  # +1.0 over the best: the count starts again
    assert stop.reason(history([50.0, 60.0, 60.6, 60.0, 61.2])) is None


def test_a_lower_is_better_metric_and_epochs_without_it():
    stop = EarlyStopping(EarlyStoppingSpec(patience=1), "val/loss", "min")
    assert stop.reason(history([2.0, 1.5], "val/loss")) is None
    assert stop.reason(history([2.0, 1.5, 1.5], "val/loss")).startswith("early stopping: val/loss")
    assert stop.reason([{"epoch": 1}, {"epoch": 2}]) is None  # never measured: nothing to judge by


def test_the_metric_and_mode_default_to_the_checkpoint_ranking():
    stop = build(EarlyStoppingSpec(patience=3), ("ema/test/acc", "max"), MODES)
    assert (stop.metric, stop.mode, stop.patience) == ("ema/test/acc", "max", 3)
    stop = build(EarlyStoppingSpec(patience=3, metric="test/loss"), ("test/acc", "max"), MODES)
    assert (stop.metric, stop.mode) == ("test/loss", "min")
    assert build(None, ("test/acc", "max"), MODES) is None


def quickstart(tmp_path, *overrides):
    return load_spec("workloads/resnet_cifar/specs/quickstart.yaml", [f"storage_path={tmp_path}", *overrides])


def test_early_stopping_fields_are_checked_and_a_patience_past_the_run_is_warned_about(tmp_path):
    spec = quickstart(tmp_path, "train.early_stopping={patience: 2, min_delta: 0.1}")
    assert spec.train.early_stopping.patience == 2
    with pytest.raises(SpecError, match="train.early_stopping.metric: 'val/acc' is not a metric of this run"):
        quickstart(tmp_path, "train.early_stopping={patience: 2, metric: val/acc}")
    with pytest.raises(SpecError, match="train.early_stopping.mode: set max or min"):
        quickstart(tmp_path, "train.early_stopping={patience: 2, metric: test/f1}")
    with pytest.warns(SpecWarning, match="train.early_stopping.patience: 4 is not below train.epochs=4"):
        quickstart(tmp_path, "train.early_stopping={patience: 4}")


def test_lbpnet_settings_past_the_last_epoch_are_warned_about_on_one_line(tmp_path, capsys):
    preset = "workloads/lbpnet/specs/paper_mnist_rp_full60k.yaml"
    compressed = ["data.dataset=mnist_sample", "train.epochs=4", f"storage_path={tmp_path}"]
    with pytest.warns(SpecWarning) as caught:
        load_spec(preset, compressed)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "lbpnet.hard_finetune.start_epoch: 260 is not below train.epochs=4: the hard fine-tune never runs (set it "
        "below the epochs, or enable: false)",
        "lbpnet.freeze_schedule: the gates are held for 10 epochs, the whole run of 4: they never learn"]
    with warnings.catch_warnings(record=True) as none:
        warnings.simplefilter("always")
        fitted = ["lbpnet.hard_finetune.start_epoch=3", "lbpnet.freeze_schedule.freeze_gate_epochs=2",
                  "lbpnet.freeze_schedule.freeze_offsets_epochs=1"]
        load_spec(preset, [*compressed, *fitted])
    assert not [w for w in none if issubclass(w.category, SpecWarning)]
    args = ["validate", preset] + [a for item in compressed for a in ("-o", item)]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("bitfleet: WARNING: lbpnet.hard_finetune.start_epoch: 260") and len(err) == 2
