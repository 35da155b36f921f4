"""How a worker's model and optimizer are spread over the Ray Train worker group: `ddp` or `deepspeed`.

A strategy owns the backward pass and optimizer step, the mixed precision around them, and the
optimizer's part of a checkpoint. DDP keeps a full optimizer on every rank, saved once (by rank 0) in
`state.pt`. DeepSpeed ZeRO partitions the optimizer state (stage 1), and the gradients too (stage 2), over
the ranks: every rank writes its own shard under `deepspeed/` in the same Ray checkpoint, and reads it
back on restore, unpickling no code: DeepSpeed's own loads run whatever a shard's pickle names (it passes
`weights_only=False`), ours admit tensors, plain data and the few DeepSpeed types a shard holds.
Either way `state.pt` keeps the model's full weights, so every reader of checkpoints
(init_from, export, reports) sees one format.
"""
from __future__ import annotations

import pickle
import re
from contextlib import nullcontext
from pathlib import Path

import ray.train.torch
import torch

from bitfleet.engine.checkpoint import NO_SHARDS, SHARDS, TAG, has_shards
from bitfleet.spec import DeepSpeedSpec, TrainSpec


def build(spec: TrainSpec, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
          per_worker_batch: int):
    """The strategy around `model`. `train.channels_last` converts the model's 4-D weights in place (the same
    parameters: the optimizer and the EMA hold them); `train.compile` compiles what the training forward runs
    through, while `model` itself stays the bare module that checkpoints, the EMA and evaluation read (its
    state_dict has no `_orig_mod.` keys)."""
    if spec.channels_last:
        model.to(memory_format=torch.channels_last)
    if spec.strategy == "deepspeed":  # compile is refused with it (spec.TrainSpec)
        return DeepSpeed(spec, model, optimizer, device, per_worker_batch)
    built = DDP(spec, model, optimizer, device)
    if spec.compile:
        built.model = torch.compile(built.model)
    return built


def to_device(spec: TrainSpec, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A training batch on `device`, NHWC under `train.channels_last` when it is an image batch (4-D: N, C, H,
    W); other inputs have no such layout."""
    if spec.channels_last and images.dim() == 4:
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device, non_blocking=True)


def autocast_dtype(spec: TrainSpec, device: torch.device) -> torch.dtype | None:
    """The dtype of `train.amp` (auto: fp16 on CUDA, bf16 on CPU), or None without AMP (`amp: gpu` on a CPU)."""
    if not spec.amp or (spec.amp == "gpu" and device.type != "cuda"):
        return None
    default = torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.amp_dtype, default)


class _Precision:
    """`train.amp` around the forwards: the training forward (DeepSpeed's engine follows its `torch_autocast`
    section, which says the same) and evaluation's."""

    def __init__(self, spec: TrainSpec, device: torch.device):
        self.device, self.dtype = device, autocast_dtype(spec, device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()


class DDP(_Precision):
    """torch DistributedDataParallel through Ray's `prepare_model` (a bare module with one worker)."""

    sharded = False  # rank 0 alone writes the checkpoint

    def __init__(self, spec: TrainSpec, model, optimizer, device):
        super().__init__(spec, device)
        self.model = ray.train.torch.prepare_model(model)  # what the training forward runs through
        self.optimizer, self.grad_clip = optimizer, spec.grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load(self, state: dict, directory: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def save_shard(self, directory: Path) -> None:
        """Nothing per rank: `state_dict` holds the whole optimizer."""


class DeepSpeed(_Precision):
    """`deepspeed.initialize` on the worker's process group (gloo on CPU, NCCL on GPUs) with ZeRO 1 or 2.

    The loop's optimizer and lr scheduler stay the spec's: DeepSpeed wraps the optimizer (ZeRO keeps the
    same param-group dicts, so the scheduler's learning rates reach it), and the loop steps the scheduler.
    """

    sharded = True  # every rank writes its optimizer shard

    def __init__(self, spec: TrainSpec, model, optimizer, device, per_worker_batch: int):
        import deepspeed

        super().__init__(spec, device)
        config = deepspeed_config(spec.deepspeed or DeepSpeedSpec(), spec, per_worker_batch, self.dtype)
        self.model, *_ = deepspeed.initialize(model=model.to(device), optimizer=optimizer, config=config)
        self.model.checkpoint_engine.load = load_weights_only  # every shard DeepSpeed reads goes through it

    def step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # gradients reduced (stage 2: reduce-scattered) over the ranks
        self.model.step()  # clips, steps this rank's partition, gathers the updated weights, zeroes grads

    def state_dict(self) -> dict:
        return {}

    def save_shard(self, directory: Path) -> None:
        """Collective: every rank calls it; rank 0 writes the module states, every rank its ZeRO shard."""
        self.model.save_checkpoint(str(Path(directory) / SHARDS), tag=TAG, save_latest=False)

    def load(self, state: dict, directory: Path) -> None:
        """The weights and this rank's optimizer shard, and the ZeRO fp32 master partitions with them (loading
        only the module's weights would leave those stale, to be written back at the next step)."""
        if not has_shards(directory):
            raise ValueError(f"{directory}: {NO_SHARDS}")
        path, _ = self.model.load_checkpoint(str(Path(directory) / SHARDS), tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        assert path is not None, f"DeepSpeed could not load {directory}"


def load_weights_only(path: str, map_location=None):
    """A DeepSpeed checkpoint file, loaded as `torch.load(weights_only=True)` loads: tensors and plain data,
    and of DeepSpeed's own types only the plain ones its optimizer shards hold; a file that names anything
    else (a function to call, another class to build) is refused, naming it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            named = re.search(r"GLOBAL (\S+)", str(exc))
            raise ValueError(f"{path}: refused: a DeepSpeed shard holds tensors and plain data, this file names "
                             f"{named.group(1) if named else 'more'}") from None


def deepspeed_config(ds: DeepSpeedSpec, spec: TrainSpec, per_worker_batch: int, dtype: torch.dtype | None) -> dict:
    """The DeepSpeed config: `ds.config` plus the keys the spec's other fields own (spec.DEEPSPEED_OWNED)."""
    config = {
        **ds.config,
        "train_micro_batch_size_per_gpu": per_worker_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {**ds.config.get("zero_optimization", {}), "stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,  # the spec's torch optimizers (SGD) beside DeepSpeed's Adam list
        "gradient_clipping": spec.grad_clip or 0.0,  # DeepSpeed clips at 1.0 unless told: 0 turns it off
    }
    if dtype is not None:
        config["torch_autocast"] = {"enabled": True, "dtype": str(dtype).removeprefix("torch.")}
    return config
