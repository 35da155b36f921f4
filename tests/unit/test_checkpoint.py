"""Checkpoint round trip (exact resume) and the callback protocol."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bitfleet.engine import checkpoint
from bitfleet.engine.callbacks import Callback, Callbacks, TrainState
from bitfleet.engine.optim import build_lr_scheduler, build_optimizer
from bitfleet.spec import LRScheduleSpec, OptimizerSpec

OPT = OptimizerSpec(type="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                    param_groups=[{"name": "head", "match": ["2.*"], "lr_mult": 0.5}])
SCHED = LRScheduleSpec(type="cosine", min_lr=1e-3, warmup_epochs=1)
EPOCHS, SPE = 3, 4


class Temperature(Callback):
    """A stateful callback: a value annealed at every step, as a workload's schedule would be."""

    def __init__(self, t: float = 1.0):
        self.t, self.steps = t, 0

    def on_step_end(self, state):
        self.t *= 0.9
        self.steps += 1

    def state_dict(self):
        return {"t": self.t, "steps": self.steps}

    def load_state_dict(self, state):
        self.t, self.steps = state["t"], state["steps"]


class Run:
    """Model with BN buffers, SGD with momentum and param groups, warmup+cosine schedule, EMA, callbacks."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        self.optimizer = build_optimizer(self.model, OPT)
        self.scheduler = build_lr_scheduler(self.optimizer, SCHED, EPOCHS, SPE)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
        self.callbacks = Callbacks([Temperature(), Temperature(2.0)])
        self.history: list[dict] = []
        self.step_count = 0

    def step(self, x, y):
        self.model.train()
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.model)
        self.step_count += 1
        self.callbacks.on_step_end(TrainState(self.model, self.optimizer, global_step=self.step_count))
        self.history.append({"step": self.step_count, "loss": loss.item()})

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict(),
                "callbacks": self.callbacks.state_dict(), "history": list(self.history), "global_step": self.step_count}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])
        self.callbacks.load_state_dict(state["callbacks"])
        self.history, self.step_count = list(state["history"]), state["global_step"]


def batches(n, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip_restores_every_piece_exactly(tmp_path):
    data = batches(7)
    original = Run(seed=0)
    for x, y in data[:5]:
        original.step(x, y)
    path = checkpoint.save(tmp_path, original.state_dict())
    assert path == tmp_path / checkpoint.FILE and path.is_file()

    restored = Run(seed=1)  # fresh objects, other initial weights
    assert not torch.equal(restored.model[0].weight, original.model[0].weight)
    restored.load_state_dict(checkpoint.load(tmp_path))

    assert_same_tensors(restored.model.state_dict(), original.model.state_dict())
    assert_same_tensors(restored.ema.state_dict(), original.ema.state_dict())
    assert int(restored.ema.n_averaged) == 5
    for p_orig, p_rest in zip(original.model.parameters(), restored.model.parameters()):
        buf_o = original.optimizer.state[p_orig]["momentum_buffer"]
        buf_r = restored.optimizer.state[p_rest]["momentum_buffer"]
        assert torch.equal(buf_o, buf_r)
    assert [g["lr"] for g in restored.optimizer.param_groups] == [g["lr"] for g in original.optimizer.param_groups]
    assert restored.scheduler.last_epoch == original.scheduler.last_epoch == 5
    assert ([cb.state_dict() for cb in restored.callbacks.callbacks]
            == [cb.state_dict() for cb in original.callbacks.callbacks])
    assert restored.callbacks.callbacks[1].t == pytest.approx(2.0 * 0.9 ** 5)
    assert restored.history == original.history and len(restored.history) == 5

    # resume: the next steps from the restored objects are those of the uninterrupted run, bit for bit
    for x, y in data[5:]:
        original.step(x, y)
        restored.step(x, y)
        assert_same_tensors(restored.model.state_dict(), original.model.state_dict())
        assert_same_tensors(restored.ema.state_dict(), original.ema.state_dict())
        assert [g["lr"] for g in restored.optimizer.param_groups] == [g["lr"] for g in original.optimizer.param_groups]
    assert restored.history == original.history


def test_resume_differs_without_optimizer_state(tmp_path):
    """The comparison above can fail: dropping the momentum buffers changes the next step."""
    data = batches(6)
    original = Run(seed=0)
    for x, y in data[:5]:
        original.step(x, y)
    checkpoint.save(tmp_path, original.state_dict())
    state = checkpoint.load(tmp_path)
    restored = Run(seed=1)
    restored.model.load_state_dict(state["model"])  # weights only, fresh optimizer
    original.step(*data[5])
    restored.step(*data[5])
    assert not torch.equal(restored.model[0].weight, original.model[0].weight)


def test_load_maps_to_cpu_and_refuses_arbitrary_objects(tmp_path):
    checkpoint.save(tmp_path, {"model": {"w": torch.ones(2)}, "obj": Temperature()})
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load(tmp_path)  # weights_only: a checkpoint cannot run code


def test_weights_returns_the_ema_when_saved(tmp_path):
    run = Run(seed=0)
    for x, y in batches(3):
        run.step(x, y)
    checkpoint.save(tmp_path, run.state_dict())
    weights = checkpoint.weights(tmp_path)
    assert weights.keys() == run.model.state_dict().keys()  # no 'module.' prefix, no n_averaged
    assert_same_tensors(weights, run.ema.module.state_dict())
    assert not torch.equal(weights["0.weight"], run.model.state_dict()["0.weight"])  # really the average
    fresh = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    fresh.load_state_dict(weights)  # loads into the bare architecture


def test_weights_returns_the_model_without_ema(tmp_path):
    run = Run(seed=0)
    run.step(*batches(1)[0])
    state = run.state_dict()
    state["ema"] = None  # what the loop saves when the spec has no EMA
    checkpoint.save(tmp_path, state)
    assert_same_tensors(checkpoint.weights(tmp_path), run.model.state_dict())


# --------------------------------------------------------------------------- callbacks


class Recorder(Callback):
    def __init__(self, name, log):
        self.name, self.log, self.value = name, log, 0

    def on_epoch_start(self, state):
        self.log.append((self.name, "epoch_start", state.epoch))

    def on_step_end(self, state):
        self.log.append((self.name, "step_end", state.global_step))
        self.value += 1

    def on_eval_end(self, state, metrics):
        self.log.append((self.name, "eval_end", metrics["acc"]))
        state.metrics[f"{self.name}_seen"] = metrics["acc"]

    def on_epoch_end(self, state, metrics):
        self.log.append((self.name, "epoch_end", dict(metrics)))

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_callbacks_are_called_in_order():
    log = []
    cbs = Callbacks([Recorder("a", log), Callback(), Recorder("b", log)])
    state = TrainState(model=nn.Linear(1, 1), optimizer=None, epoch=2, global_step=7)
    cbs.on_epoch_start(state)
    cbs.on_step_end(state)
    cbs.on_eval_end(state, {"acc": 0.5})
    cbs.on_epoch_end(state, {"loss": 1.0})
    assert log == [
        ("a", "epoch_start", 2), ("b", "epoch_start", 2),
        ("a", "step_end", 7), ("b", "step_end", 7),
        ("a", "eval_end", 0.5), ("b", "eval_end", 0.5),
        ("a", "epoch_end", {"loss": 1.0}), ("b", "epoch_end", {"loss": 1.0}),
    ]
    assert state.metrics == {"a_seen": 0.5, "b_seen": 0.5}


def test_callbacks_state_round_trip(tmp_path):
    log = []
    cbs = Callbacks([Recorder("a", log), Temperature(3.0), Recorder("b", log)])
    state = TrainState(model=nn.Linear(1, 1), optimizer=None)
    for _ in range(4):
        cbs.on_step_end(state)
    cbs.callbacks[2].value = 10
    checkpoint.save(tmp_path, {"callbacks": cbs.state_dict()})

    fresh = Callbacks([Recorder("a", []), Temperature(3.0), Recorder("b", [])])
    fresh.load_state_dict(checkpoint.load(tmp_path)["callbacks"])
    assert fresh.callbacks[0].value == 4 and fresh.callbacks[2].value == 10
    assert fresh.callbacks[1].steps == 4 and fresh.callbacks[1].t == pytest.approx(3.0 * 0.9 ** 4)
    assert fresh.state_dict() == cbs.state_dict()

    with pytest.raises(AssertionError, match="other callbacks"):
        Callbacks([Temperature()]).load_state_dict(cbs.state_dict())


def test_train_state_progress():
    state = TrainState(model=nn.Linear(1, 1), optimizer=None, epochs=4, steps_per_epoch=10)
    assert state.progress == 0.0
    state.global_step = 10
    assert state.progress == pytest.approx(0.25)
    state.global_step = 50
    assert state.progress == 1.0


def test_find_resolves_checkpoints_and_run_folders(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    checkpoint.save(ckpt, {"model": {}})
    assert checkpoint.find(ckpt) == ckpt  # a checkpoint itself
    assert checkpoint.find(tmp_path / "run") == ckpt  # a run folder: its latest checkpoint
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        checkpoint.find(tmp_path / "empty")


def test_init_from_must_name_a_checkpoint(tmp_path):
    from bitfleet.errors import SpecError
    from bitfleet.resolve import validate_spec

    raw = {"name": "x", "workload": "resnet_cifar", "data": {"dataset": "mnist_sample"},
           "train": {"init_from": str(tmp_path)}}
    with pytest.raises(SpecError, match="train.init_from: .*neither a checkpoint"):
        validate_spec(raw)
    checkpoint.save(tmp_path, {"model": {}})
    assert validate_spec(raw).train.init_from == str(tmp_path)
