"""`bitfleet eval` on run folders laid out as runs write them: the checkpoint's weights (the EMA's when the run
evaluated it) measured on a split through the run's evaluation transforms, against a forward pass computed
here; eval.json; the one-line failures. The equality with what real runs reported is tested in
tests/integration/test_eval.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bitfleet import cli, evaluation, registry
from bitfleet.data import build_datasets, info, loaders, synthetic
from bitfleet.engine import checkpoint
from bitfleet.errors import SpecError
from bitfleet.resolve import validate_spec


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    synthetic.write("mnist", root, n_train=300, n_test=128, seed=0)
    return root


def write_run(folder, small_mnist, name="r", ema=None, **data) -> tuple:
    """A run folder (config.json, one epoch's checkpoint) of a resnet20 on synthetic MNIST; returns (its
    spec, the model's weights, the EMA's weights or None)."""
    raw = {"name": name, "workload": "resnet_cifar", "model": {"arch": "resnet20", "shortcut": "A"},
           "data": {"dataset": "mnist", "root": str(small_mnist), "loader_workers": 0, **data},
           "train": {"epochs": 1, "eval_batch_size": 100, **({"ema": ema} if ema else {})},
           "storage_path": str(folder), "seed": 3}
    spec = validate_spec(raw, fresh=True)
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"spec": spec.model_dump(mode="json")}))
    torch.manual_seed(0)
    build = registry.get("resnet_cifar").build_model
    model, averaged = build(spec.model, info(spec.data)), build(spec.model, info(spec.data))
    for module in (model, averaged):  # BN statistics of their own, as a trained model has
        module.train()
        with torch.no_grad():
            module(torch.randn(64, 1, 28, 28))
    state = {"model": model.state_dict(), "epoch": 1, "global_step": 8, "step_in_epoch": 0,
             "ema": {"n_averaged": torch.tensor(8), **{f"module.{k}": v for k, v in averaged.state_dict().items()}}
             if ema else None,
             "history": [{"epoch": 1, "test/loss": 2.5, "test/acc": 12.5, "train/loss": 3.0}]}
    (run / "checkpoint_000000").mkdir()
    checkpoint.save(run / "checkpoint_000000", state)
    return spec, model.state_dict(), averaged.state_dict() if ema else None


def expected(spec, weights, split="test") -> tuple[float, float]:
    """(loss, accuracy) of `weights` on a split, computed here in one batch."""
    model = registry.get("resnet_cifar").build_model(spec.model, info(spec.data))
    model.load_state_dict(weights)
    sets = build_datasets(spec.data.model_copy(update={"augment": False}))
    images, labels = next(iter(DataLoader(getattr(sets, split), batch_size=10_000)))
    with torch.no_grad():
        logits = model.eval()(images)
    return F.cross_entropy(logits, labels).item(), 100.0 * (logits.argmax(1) == labels).sum().item() / len(labels)


def test_eval_measures_the_checkpoint_on_the_whole_split_and_writes_eval_json(tmp_path, small_mnist):
    spec, weights, _ = write_run(tmp_path, small_mnist)
    result = evaluation.evaluate_run(str(tmp_path / "r"))
    loss, acc = expected(spec, weights)
    assert result["test/acc"] == pytest.approx(acc, abs=1e-9)
    assert result["test/loss"] == pytest.approx(loss, rel=1e-5)
    assert (result["epoch"], result["weights"], result["split"]) == (1, "model", "test")
    assert result["reported"] == {"test/loss": 2.5, "test/acc": 12.5}  # the run's figures at that checkpoint
    written = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert written["test/acc"] == result["test/acc"] and written["checkpoint"].endswith("checkpoint_000000")
    assert "(the run reported loss 2.5 acc 12.5)" in evaluation.describe(result)

    train = evaluation.evaluate_run(str(tmp_path / "r" / "checkpoint_000000"), "train", out=str(tmp_path / "t.json"))
    assert train["train/acc"] == pytest.approx(expected(spec, weights, "train")[1], abs=1e-9)
    assert train["reported"] is None and json.loads((tmp_path / "t.json").read_text())["split"] == "train"


def test_eval_takes_the_ema_only_when_the_run_evaluated_it(tmp_path, small_mnist):
    for name, ema, evaluated in (("ema", {"decay": 0.9}, "ema"), ("kept", {"decay": 0.9, "evaluate": False}, "model")):
        spec, weights, averaged = write_run(tmp_path, small_mnist, name, ema=ema)
        result = evaluation.evaluate_run(str(tmp_path / name))
        (loss, acc), other = (expected(spec, averaged if evaluated == "ema" else weights),
                              expected(spec, weights if evaluated == "ema" else averaged))
        assert result["weights"] == evaluated and loss != pytest.approx(other[0], rel=1e-3)  # tells them apart
        assert result["test/acc"] == pytest.approx(acc, abs=1e-9)
        assert result["test/loss"] == pytest.approx(loss, rel=1e-5)


def test_the_training_split_is_read_without_augmentation(small_mnist):
    data = validate_spec({"name": "a", "workload": "resnet_cifar", "data": {
        "dataset": "mnist", "root": str(small_mnist), "augment": True, "val_size": 100, "loader_workers": 0}}).data
    cpu = torch.device("cpu")
    first, second = (torch.cat([x for x, _ in loaders.split_loader(data, "train", 256, cpu)]) for _ in range(2))
    assert len(first) == 300 - 100 and torch.equal(first, second)  # the same images twice: no random crops
    val = torch.cat([x for x, _ in loaders.split_loader(data, "val", 64, cpu)])
    assert torch.equal(val, torch.cat([x for x, _ in build_datasets(data).val]).view_as(val))


def test_eval_data_overrides_and_splits_are_checked(tmp_path, small_mnist):
    write_run(tmp_path, small_mnist)
    with pytest.raises(SpecError, match="eval takes data.\\* overrides only"):
        evaluation.evaluate_run(str(tmp_path / "r"), overrides=["train.epochs=3"])
    with pytest.raises(SpecError, match="--split: 'val' needs images held out of the training set"):
        evaluation.evaluate_run(str(tmp_path / "r"), "val")
    with pytest.raises(SpecError, match="data.root: MNIST IDX files not found"):
        evaluation.evaluate_run(str(tmp_path / "r"), overrides=[f"data.root={tmp_path / 'nowhere'}"])


def test_eval_failures_are_one_line(tmp_path, small_mnist, capsys):
    write_run(tmp_path, small_mnist)
    state = tmp_path / "r" / "checkpoint_000000" / checkpoint.FILE
    state.write_bytes(state.read_bytes()[:-10])  # truncated after its manifest was written
    cases = {
        ("eval", str(tmp_path / "r")): "neither a checkpoint (state.pt) nor a run folder with complete checkpoints",
        ("eval", str(state.parent)): "an incomplete or corrupt checkpoint: state.pt differs from its manifest",
        ("eval", str(tmp_path / "missing")): "neither a bitfleet run folder (config.json) nor a checkpoint inside one",
        ("eval", "--engine", str(tmp_path / "engine.npz")): f"--engine: cannot read {tmp_path / 'engine.npz'}",
    }
    for args, message in cases.items():
        assert cli.main(list(args)) == 2
        *warnings, line = capsys.readouterr().err.strip().splitlines()  # a run folder's damaged checkpoints
        assert line.startswith("bitfleet: error: ") and message in line, (args, line)
        assert all("skipping checkpoint" in w and "differs from its manifest" in w for w in warnings), warnings
    with pytest.raises(SystemExit):
        cli.main(["eval", str(tmp_path / "r"), "--engine", "x.npz"])
    assert "not allowed with argument" in capsys.readouterr().err
