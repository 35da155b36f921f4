"""The pieces a mid-epoch resume is made of: a sampler that starts late, augmentation drawn per sample,
random streams saved and put back, held parameters that survive a restore, the step controller."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from bitfleet.data.loaders import ResumableSampler, SampleSeeded
from bitfleet.engine import checkpoint, preemption
from bitfleet.engine.callbacks import HoldParameters, TrainState
from bitfleet.engine.rng import rng_states, set_rng_states
from bitfleet.spec import FailureSpec


class Noisy(Dataset):
    """Each item draws from torch's global stream, as a random augmentation does."""

    def __len__(self):
        return 40

    def __getitem__(self, index):
        return torch.rand(3), index


def order(sampler) -> list[int]:
    return list(iter(sampler))


def test_a_resumed_sampler_continues_the_epochs_order_on_every_rank_and_only_for_one_pass():
    for world in (1, 2, 3):
        for rank in range(world):
            full = ResumableSampler(Noisy(), world, rank, shuffle=True, seed=5)
            full.set_epoch(2)
            late = ResumableSampler(Noisy(), world, rank, shuffle=True, seed=5)
            late.set_epoch(2, skip=4)
            assert len(late) == len(full) - 4
            assert order(late) == order(full)[4:]
            assert order(late) == order(full)  # the next pass (BN recalibration, say) reads the whole shard


def test_the_skipped_prefix_is_the_same_samples_whatever_the_world_size():
    """k steps of a global batch B consume the first k*B of the epoch's permutation, for any world size."""
    def consumed(world, steps, global_batch):
        per_worker = global_batch // world
        seen = set()
        for rank in range(world):
            sampler = ResumableSampler(Noisy(), world, rank, shuffle=True, seed=1)
            sampler.set_epoch(0)
            seen |= set(order(sampler)[: steps * per_worker])
        return seen

    assert consumed(1, 3, 8) == consumed(2, 3, 8) == consumed(4, 3, 8)


def test_augmentation_is_drawn_per_sample_and_leaves_the_callers_stream_alone():
    data = SampleSeeded(Noisy(), seed=3)
    data.epoch = 1
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = data[7][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(data[7][0], first)  # the same sample, the same draw
    assert not torch.equal(data[8][0], first)
    data.epoch = 2
    assert not torch.equal(data[7][0], first)  # another epoch, another draw


def test_a_pass_started_late_sees_the_same_samples_as_the_tail_of_a_full_pass():
    def batches(skip):
        data = SampleSeeded(Noisy(), seed=3)
        sampler = ResumableSampler(data, 2, 1, shuffle=True, seed=3)
        data.epoch = 4
        sampler.set_epoch(4, skip)
        loader = DataLoader(data, 4, sampler=sampler, num_workers=0, generator=torch.Generator())
        return [images for images, _ in loader]

    full, late = batches(0), batches(8)
    assert len(late) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(late, full[2:]))


def test_random_streams_are_saved_and_put_back():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    saved = rng_states()
    ahead = (torch.rand(2), np.random.rand(), random.random())
    set_rng_states(torch.load(_roundtrip(saved), weights_only=True))  # as a checkpoint stores them
    again = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(ahead[0], again[0]) and ahead[1:] == again[1:]


def _roundtrip(value):
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


class HoldFirst(HoldParameters):
    def held(self, state):
        return {"0.weight"} if state.epoch == 0 else set()


def test_held_parameters_survive_a_mid_epoch_restore_even_after_a_schedule_moved_them():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    hold = HoldFirst()
    hold.on_epoch_start(state)
    start = model[0].weight.detach().clone()
    saved = hold.state_dict()

    restored = HoldFirst()
    restored.load_state_dict(_roundtrip_state(saved))
    with torch.no_grad():
        model[0].weight.fill_(5.0)  # a schedule writes into it at epoch start, before the hold runs
    restored.on_epoch_start(state)  # the same epoch: resumed mid-epoch
    assert torch.equal(model[0].weight, start)


def _roundtrip_state(value):
    return torch.load(_roundtrip(value), weights_only=True)


def test_the_weights_digest_tells_equal_weights_from_different_ones():
    a = {"w": torch.ones(2, 3), "step": torch.tensor(3)}
    assert checkpoint.weights_sha256(a) == checkpoint.weights_sha256({k: v.clone() for k, v in a.items()})
    b = {"w": torch.ones(2, 3).nextafter(torch.full((2, 3), 2.0)), "step": torch.tensor(3)}  # one ulp
    assert checkpoint.weights_sha256(a) != checkpoint.weights_sha256(b)
    assert checkpoint.weights_sha256(a) != checkpoint.weights_sha256({"w": torch.ones(3, 2), "step": a["step"]})


def test_the_controller_checkpoints_every_n_steps_and_heeds_the_stop_request_and_sigterm(tmp_path):
    control = preemption.Control(FailureSpec(checkpoint_every_steps=3, checkpoint_every_minutes=None),
                                 str(tmp_path), rank=0, world=1, device=torch.device("cpu"))
    assert [control.after_step(step) for step in range(1, 7)] == [None, None, "checkpoint", None, None,
                                                                   "checkpoint"]
    (tmp_path / preemption.STOP_FILE).write_text("stop")
    control.last_look = -1e9  # due to look again
    assert control.after_step(7) == preemption.STOP
    preemption.SIGTERMED.set()
    try:
        assert control.after_step(8) == preemption.PREEMPTED
    finally:
        preemption.SIGTERMED.clear()


def test_the_minutes_interval_comes_due(tmp_path):
    control = preemption.Control(FailureSpec(checkpoint_every_minutes=1), str(tmp_path), rank=0, world=1,
                                 device=torch.device("cpu"))
    assert control.after_step(1) is None
    control.last_checkpoint -= 61
    assert control.after_step(2) == preemption.CHECKPOINT
    control.saved()
    assert control.after_step(3) is None


@pytest.mark.parametrize("bad", [{"checkpoint_every_steps": 0}, {"checkpoint_every_minutes": 0},
                                 {"checkpoint_every_minutes": float("inf")}, {"preemption_grace_s": -1}])
def test_step_checkpoint_settings_are_checked(bad):
    with pytest.raises(ValueError):
        FailureSpec(**bad)
