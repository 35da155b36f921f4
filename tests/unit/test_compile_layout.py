"""`train.compile` and `train.channels_last`: validated as spec fields, neutral to the run's identity, and a
short CPU run with them writes the checkpoint a plain run writes (same keys, default layout) whose weights
load and run; the training step sees NHWC batches and the training forward runs through the compiled module.

The model is tap_ppo's LeNet-5 on 3-channel synthetic CIFAR-10 (a 1-channel batch is channels_last already
whatever its layout): small enough that torch.compile takes seconds on two cores."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from bitfleet import registry
from bitfleet.data import synthetic
from bitfleet.engine import checkpoint, loop
from bitfleet.errors import SpecError
from bitfleet.resolve import load_spec
from bitfleet.run_identity import spec_digest

SPEC = Path(__file__).parents[2] / "workloads" / "tap_ppo" / "specs" / "lenet5.yaml"
TINY = ["stages=[]", "tap_ppo.stage=float", "train.epochs=2", "train.max_steps_per_epoch=2",
        "train.lr_schedule={type: constant}", "train.batch_size=8", "train.max_eval_steps=1",
        "train.eval_batch_size=8", "data.val_size=16", "data.loader_workers=0", "scaling.num_workers=1",
        "scaling.cpus_per_worker=1", "train.ema={decay: 0.9}"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    synthetic.write("cifar10", root, n_train=64, n_test=16, seed=0)
    return root


def spec_of(root: Path, storage: Path, *overrides: str):
    return load_spec(SPEC, [*TINY, f"data.root={root}", f"storage_path={storage}", *overrides])


def test_the_fields_default_off_validate_and_leave_the_run_the_same(cifar_root, tmp_path):
    plain = spec_of(cifar_root, tmp_path)
    assert plain.train.compile is False and plain.train.channels_last is False
    both = spec_of(cifar_root, tmp_path, "train.compile=true", "train.channels_last=true")
    assert both.train.compile and both.train.channels_last
    assert spec_digest(both) == spec_digest(plain)  # a run resumes with either toggled
    for bad in ("train.compile=sometimes", "train.channels_last=[1]", "train.compile_mode=max"):
        with pytest.raises(SpecError, match=bad.split("=")[0].replace(".", r"\.")) as raised:
            spec_of(cifar_root, tmp_path, bad)
        assert "\n" not in str(raised.value)
    with pytest.raises(SpecError, match=r"train\.compile: not with strategy deepspeed") as raised:
        spec_of(cifar_root, tmp_path, "train.compile=true", "train.strategy=deepspeed")
    assert "\n" not in str(raised.value)


def train_briefly(spec, epochs: int | None = None) -> dict:
    """`spec`'s run in Ray Train's local mode (its first `epochs` only, when given, as a run stopped there):
    what each step saw, and the checkpoint it would end with."""
    seen: dict = {"batches": [], "forwards": []}
    saved = Path(spec.storage_path, "saved")
    saved.mkdir(parents=True)

    def train_fn():
        trainer = loop.Trainer(spec)
        step = trainer.workload.train_step

        def recording(model, images, labels, loss):
            seen["batches"].append(images.is_contiguous(memory_format=torch.channels_last))
            seen["forwards"].append(type(model).__name__)
            return step(model, images, labels, loss)

        trainer.workload.train_step = recording
        seen["initial"], seen["info"] = conv_weight(trainer.model).detach().clone(), trainer.data.info
        if epochs is None:
            trainer.fit()
        for _ in range(epochs or 0):
            trainer.report(trainer.run_epoch())
        seen["conv"] = conv_weight(trainer.model).is_contiguous(memory_format=torch.channels_last)
        seen["ema_conv"] = conv_weight(trainer.ema.module).is_contiguous(memory_format=torch.channels_last)
        checkpoint.save(saved, trainer.state_dict())  # local mode keeps Ray's checkpoints in no run folder

    TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=0)).fit()
    seen["checkpoint"] = checkpoint.load(saved)
    return seen


def test_channels_last_batches_and_weights_in_the_step_the_plain_checkpoint(cifar_root, tmp_path):
    plain = train_briefly(spec_of(cifar_root, tmp_path / "plain"))
    nhwc = train_briefly(spec_of(cifar_root, tmp_path / "nhwc", "train.channels_last=true"))
    assert plain["batches"] == [False] * 4 and nhwc["batches"] == [True] * 4
    assert not plain["conv"] and nhwc["conv"] and nhwc["ema_conv"]  # the EMA's copy too
    for part in ("model", "ema"):
        assert list(nhwc["checkpoint"][part]) == list(plain["checkpoint"][part])
        assert all(v.is_contiguous() for v in nhwc["checkpoint"][part].values() if isinstance(v, torch.Tensor))
    assert_weights_run(spec_of(cifar_root, tmp_path), nhwc)


def test_compiled_training_writes_the_plain_checkpoint_whose_weights_run(cifar_root, tmp_path):
    plain = train_briefly(spec_of(cifar_root, tmp_path / "plain"))
    compiled = train_briefly(spec_of(cifar_root, tmp_path / "compiled", "train.compile=true",
                                     "train.channels_last=true"))
    assert plain["forwards"] == ["LeNet5"] * 4
    assert compiled["forwards"] == ["OptimizedModule"] * 4 and compiled["batches"] == [True] * 4
    for part in ("model", "ema"):
        assert list(compiled["checkpoint"][part]) == list(plain["checkpoint"][part])
        assert not any("_orig_mod" in key for key in compiled["checkpoint"][part])
    # the EMA averaged the trained (compiled-through) parameters: off the initial weights and not equal to
    # the trained ones (decay 0.9 over four steps)
    name = next(k for k, v in compiled["checkpoint"]["model"].items() if v.dim() == 4)
    trained, averaged = compiled["checkpoint"]["model"][name], compiled["checkpoint"]["ema"]["module." + name]
    assert not torch.equal(trained, compiled["initial"])
    assert not torch.equal(averaged, compiled["initial"]) and not torch.equal(averaged, trained)
    assert_weights_run(spec_of(cifar_root, tmp_path), compiled)

    # stopped after its first epoch and resumed, compiled, the run ends with the uninterrupted run's state
    flags = ["train.compile=true", "train.channels_last=true"]
    train_briefly(spec_of(cifar_root, tmp_path / "first", *flags), epochs=1)
    resumed = train_briefly(spec_of(cifar_root, tmp_path / "rest", *flags, f"train.resume_from={tmp_path}/first/saved"))
    assert len(resumed["forwards"]) == 2  # the second epoch's steps only
    for part in ("model", "ema", "optimizer"):
        assert_equal(resumed["checkpoint"][part], compiled["checkpoint"][part])


def assert_equal(got, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_equal(got[key], expected[key])
    else:
        assert got == expected


def conv_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters() if p.dim() == 4)


def assert_weights_run(spec, seen: dict) -> None:
    """The checkpoint's weights, loaded strictly into a freshly built bare model, give finite logits."""
    model = registry.get(spec.workload, spec.options).build_model(spec.model, seen["info"])
    model.load_state_dict(checkpoint.weights_of(seen["checkpoint"], ema=False))
    logits = model.eval()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
