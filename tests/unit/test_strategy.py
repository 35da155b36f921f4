"""The DeepSpeed strategy outside Ray: its config from the spec, the same training as DDP on two gloo ranks,
and an exact save/restore of its shards.

The restore runs in one process on a gloo group of one: ZeRO still keeps its own fp32 master partitions
and optimizer state, so a restore that loaded the weights alone would continue from stale masters. The
2-worker run with a killed worker is in tests/integration/test_deepspeed.py.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bitfleet.engine import checkpoint
from bitfleet.engine.optim import build_lr_scheduler, build_optimizer
from bitfleet.errors import SpecError
from bitfleet.resolve import load_spec
from bitfleet.spec import DeepSpeedSpec, LRScheduleSpec, OptimizerSpec, TrainSpec

deepspeed = pytest.importorskip("deepspeed")  # the `deepspeed` extra (CI installs it)
from bitfleet.engine import strategy  # noqa: E402

SPEC = TrainSpec(strategy="deepspeed", deepspeed=DeepSpeedSpec(zero_stage=2), grad_clip=1.0,
                 optimizer=OptimizerSpec(type="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
                 lr_schedule=LRScheduleSpec(type="cosine"), epochs=2)


def test_config_derives_the_keys_the_spec_owns_and_keeps_the_users():
    ds = DeepSpeedSpec(zero_stage=2, config={"zero_optimization": {"overlap_comm": False},
                                             "wall_clock_breakdown": True})
    spec = TrainSpec(strategy="deepspeed", deepspeed=ds, grad_clip=2.0, amp=True, amp_dtype="bf16")
    config = strategy.deepspeed_config(ds, spec, per_worker_batch=16,
                                       dtype=strategy.autocast_dtype(spec, torch.device("cpu")))
    assert config["zero_optimization"] == {"overlap_comm": False, "stage": 2}
    assert config["train_micro_batch_size_per_gpu"] == 16 and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 2.0 and config["wall_clock_breakdown"] is True
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "optimizer" not in config and "scheduler" not in config  # the spec's torch optimizer and scheduler


def _two_ranks(rank, init, out):
    """Each case trained twice from the same weights on this rank's batches: torch DDP (the reference: what
    the ddp strategy wraps, through Ray's prepare_model) and the deepspeed strategy."""
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    generator = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(4, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(6)]
    results = {}
    for stage, clip in CASES:
        spec = SPEC.model_copy(update={"deepspeed": DeepSpeedSpec(zero_stage=stage), "grad_clip": clip})
        model, scheduler, _ = _run(seed=0, spec=spec, wrap=False)
        ddp, optimizer = nn.parallel.DistributedDataParallel(model), scheduler.optimizer
        for images, labels in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(images), labels).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            scheduler.step()
        reference = {k: v.detach().clone() for k, v in model.named_parameters()}
        model, scheduler, ds = _run(seed=0, spec=spec)
        _steps(model, scheduler, ds, batches)
        results[(stage, clip)] = reference, {k: v.detach().clone() for k, v in model.named_parameters()}
    if rank == 1:
        torch.save(results, out)
    dist.destroy_process_group()


CASES = [(1, None), (2, None), (2, 0.05)]  # ZeRO stage, train.grad_clip (0.05: tight enough to clip)


def test_zero_stages_train_as_ddp_does_clipping_only_when_the_spec_says():
    """DeepSpeed clips gradients at 1.0 unless told otherwise: a spec without grad_clip must not clip."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_two_ranks, args=(os.path.join(tmp, "init"), out), nprocs=2, join=True)
        results = torch.load(out)
    for case, (reference, trained) in results.items():
        for name, value in reference.items():
            torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6, msg=f"{case} {name}")


@pytest.fixture(scope="module")
def group():
    """What Ray Train's torch backend gives each worker: a process group and LOCAL_RANK (DeepSpeed asks)."""
    os.environ.setdefault("LOCAL_RANK", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _run(seed: int, spec: TrainSpec = SPEC, wrap: bool = True):
    """A fresh model (initialised from `seed`), the spec's SGD and cosine schedule, wrapped by DeepSpeed."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = build_optimizer(model, spec.optimizer)
    scheduler = build_lr_scheduler(optimizer, spec.lr_schedule, spec.epochs, steps_per_epoch=5)
    ds = strategy.build(spec, model, optimizer, torch.device("cpu"), per_worker_batch=4) if wrap else None
    return model, scheduler, ds


def _steps(model, scheduler, ds, batches):
    for images, labels in batches:
        ds.step(nn.functional.cross_entropy(ds.model(images), labels))
        scheduler.step()


def test_shards_restore_weights_optimizer_and_masters_exactly(group, tmp_path):
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(6)]
    model, scheduler, ds = _run(seed=0)
    _steps(model, scheduler, ds, batches[:3])
    state = {"model": model.state_dict(), "scheduler": scheduler.state_dict(), **ds.state_dict()}
    ds.save_shard(tmp_path)
    assert (tmp_path / checkpoint.SHARDS / checkpoint.TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    _steps(model, scheduler, ds, batches[3:])

    restored, restored_scheduler, restored_ds = _run(seed=123)  # other initial weights: the restore must replace them
    restored.load_state_dict(state["model"])
    restored_ds.load(state, tmp_path)
    restored_scheduler.load_state_dict(state["scheduler"])
    _steps(restored, restored_scheduler, restored_ds, batches[3:])

    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert restored_scheduler.get_last_lr() == scheduler.get_last_lr()


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_shard_that_would_run_code_is_refused_naming_the_file(group, tmp_path):
    """DeepSpeed's own loads unpickle with weights_only=False; the strategy's go through `load_weights_only`."""
    model, scheduler, ds = _run(seed=0)
    ds.save_shard(tmp_path)
    shard = tmp_path / checkpoint.SHARDS / checkpoint.TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, shard)
    restored, _, restored_ds = _run(seed=1)
    with pytest.raises(ValueError, match=f"{shard}: refused: .* names posix.system"):
        restored_ds.load({"model": model.state_dict()}, tmp_path)
    assert not marker.exists()


def test_the_fp16_loss_scaler_of_a_gpu_shard_loads_weights_only(tmp_path):
    """Under `amp` fp16 (CUDA, not run here) a shard holds DeepSpeed's DynamicLossScaler: allowed, as data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=1,
                               consecutive_hysteresis=False)
    scaler.cur_iter, scaler.last_overflow_iter = 7, 3
    torch.save({"loss_scaler": scaler}, tmp_path / "shard.pt")
    loaded = strategy.load_weights_only(str(tmp_path / "shard.pt"))["loss_scaler"]
    assert type(loaded) is DynamicLossScaler and vars(loaded) == vars(scaler)


def test_restoring_a_checkpoint_without_shards_says_what_it_needs(group, tmp_path):
    model, _, ds = _run(seed=0)
    with pytest.raises(ValueError, match="no DeepSpeed shards.*train.init_from"):
        ds.load({"model": model.state_dict()}, tmp_path)


def test_resuming_a_ddp_checkpoint_under_deepspeed_fails_at_validation(tmp_path):
    model, _, _ = _run(seed=0, wrap=False)
    checkpoint.save(tmp_path, {"model": model.state_dict()})  # a DDP checkpoint: state.pt and no shards
    quickstart = Path(__file__).resolve().parents[2] / "workloads/resnet_cifar/specs/quickstart_deepspeed.yaml"
    with pytest.raises(SpecError, match=f"train.resume_from: {tmp_path} has no DeepSpeed shards"):
        load_spec(quickstart, [f"train.resume_from={tmp_path}"])
