"""The per-worker epoch/step loop: strategy (DDP or DeepSpeed), EMA, evaluation, report, checkpoint.

`run` is the `train_loop_per_worker` of every bitfleet TorchTrainer. Every rank calls
`ray.train.report` exactly once per epoch; rank 0 attaches the checkpoint (with a sharded strategy every
rank attaches its shard to the same one) and writes `metrics.json`.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bitfleet import registry, storage
from bitfleet.metrics import WorkerMetrics
from bitfleet.data import loaders
from bitfleet.engine import checkpoint, strategy
from bitfleet.engine.batchnorm import broadcast_buffers
from bitfleet.engine.callbacks import Callbacks, TrainState
from bitfleet.engine.optim import build_lr_scheduler, build_optimizer
from bitfleet.spec import RunSpec


def run(config: dict) -> None:
    """Entry point inside each Ray Train worker; `config` is the resolved spec as JSON-able dict."""
    Trainer(RunSpec.model_validate(config)).fit()


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Seed python, numpy and torch from (seed, epoch, rank): each epoch's randomness is reproducible alone."""
    value = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


class Trainer:
    """The state of one worker's training and the steps that advance it."""

    def __init__(self, spec: RunSpec):
        context = ray.train.get_context()
        self.spec, self.train_spec = spec, spec.train
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
        self.workload = registry.get(spec.workload)
        self.workload.prepare(spec)

        self.data = loaders.build(spec, self.rank, self.world, self.device)
        self.train_loader, self.eval_loaders = self.data.train, self.data.evals
        self.steps_per_epoch = min(self.data.steps_per_epoch, self.train_spec.max_steps_per_epoch or math.inf)
        self.top5 = self.data.info.num_classes > 10
        torch.manual_seed(spec.seed)  # identical initial weights on every rank
        self.model = self.workload.build_model(self.workload.model_config(spec), self.data.info)
        if self.train_spec.init_from:  # a restored checkpoint (below, in `restore`) overrides these weights
            self.workload.load_initial_weights(self.model, checkpoint.weights(checkpoint.find(self.train_spec.init_from)))
        self.optimizer = build_optimizer(self.model, self.train_spec.optimizer)
        self.scheduler = build_lr_scheduler(
            self.optimizer, self.train_spec.lr_schedule, self.train_spec.epochs, self.steps_per_epoch
        )
        # moves the model to the device, wraps it (DDP, or a DeepSpeed engine that wraps the optimizer too)
        self.strategy = strategy.build(self.train_spec, self.model, self.optimizer, self.device,
                                       self.train_spec.batch_size // self.world)
        ema = self.train_spec.ema
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema.decay), use_buffers=True) if ema else None
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=self.train_spec.label_smoothing)
        self.callbacks = Callbacks(self.workload.callbacks(spec))
        self.state = TrainState(
            self.model, self.optimizer, epochs=self.train_spec.epochs, steps_per_epoch=self.steps_per_epoch,
            rank=self.rank, world_size=self.world, train_loader=self.train_loader,
            eval_model=self.ema.module if self.ema is not None and self.train_spec.ema.evaluate else self.model,
        )
        self.history: list[dict] = []
        self.restores = 0
        self.metrics = WorkerMetrics(spec, self.rank)

    # ------------------------------------------------------------------ run
    def fit(self) -> None:
        self.restore()
        while self.state.epoch < self.train_spec.epochs:
            self.report(self.run_epoch())

    def run_epoch(self) -> dict[str, float]:
        state = self.state
        state.metrics = {}
        seed_everything(self.spec.seed, state.epoch, self.rank)
        self.data.set_epoch(state.epoch)
        self.strategy.model.train()  # before the callbacks: they may put some modules (frozen BN) back in eval mode
        self.callbacks.on_epoch_start(state)
        metrics = {"epoch": state.epoch + 1, **self.train_epoch(), "lr": self.optimizer.param_groups[0]["lr"]}
        broadcast_buffers(self.model, self.ema)  # every rank evaluates, and rank 0 saves, the same BN statistics
        self.callbacks.on_eval_start(state)
        for split, loader in self.eval_loaders.items():
            metrics.update(self.evaluate(split, loader))
        self.callbacks.on_eval_end(state, metrics)
        state.epoch += 1
        self.callbacks.on_epoch_end(state, metrics)
        return {**metrics, **state.metrics, "restores": self.restores, "workers": self.world}

    def train_epoch(self) -> dict[str, float]:
        totals = torch.zeros(3, device=self.device)  # loss sum, correct, seen
        start = clock = time.perf_counter()
        for images, labels in itertools.islice(self.train_loader, self.steps_per_epoch):  # no batch past the last
            loaded = time.perf_counter()
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            loss, logits = self.train_step(images, labels)
            totals += _batch_totals(loss.detach() * len(labels), logits, labels)
            self.state.global_step += 1
            self.callbacks.on_step_end(self.state)
            now = time.perf_counter()
            self.metrics.step(now - clock, data_wait_s=loaded - clock, samples=len(labels))
            clock = now
        elapsed = time.perf_counter() - start
        loss_sum, correct, seen = self._all_reduce(totals).tolist()
        return {
            "train/loss": loss_sum / seen, "train/acc": 100.0 * correct / seen,
            "images_per_s": seen / elapsed, "epoch_time_s": elapsed,
        }

    def train_step(self, images, labels):
        with self.strategy.autocast():
            loss, logits = self.workload.train_step(self.strategy.model, images, labels, self.criterion)
        self.strategy.step(loss)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss, logits

    @torch.no_grad()
    def evaluate(self, split: str, loader) -> dict[str, float]:
        """Loss and accuracy (top-5 too past 10 classes) of the bare model (or its EMA) on this rank's shard
        of `split`, summed over ranks."""
        model = self.state.eval_model
        model.eval()
        totals = torch.zeros(4, device=self.device)
        for step, (images, labels) in enumerate(loader):
            if step == self.train_spec.max_eval_steps:
                break
            images, labels = images.to(self.device), labels.to(self.device)
            with self.strategy.autocast():
                logits = model(images).float()
            batch = _batch_totals(F.cross_entropy(logits, labels, reduction="sum"), logits, labels)
            totals += torch.cat([batch, _top5_correct(logits, labels)])
        loss_sum, correct, seen, correct5 = self._all_reduce(totals).tolist()
        seen = max(seen, 1)
        metrics = {f"{split}/loss": loss_sum / seen, f"{split}/acc": 100.0 * correct / seen}
        if self.top5:
            metrics[f"{split}/acc5"] = 100.0 * correct5 / seen
        return metrics

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    # ------------------------------------------------------------------ report and checkpoint
    def report(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        self.metrics.epoch(metrics)
        epoch, epochs = self.state.epoch, self.train_spec.epochs
        if self.rank == 0:
            self._write_metrics()
            print(_progress_line(self.spec.name, metrics, epochs), flush=True)
        due = epoch % self.spec.failure.checkpoint_every == 0 or epoch == epochs
        if due and (self.rank == 0 or self.strategy.sharded):
            start = time.perf_counter()
            with checkpoint.to_ray(self.state_dict() if self.rank == 0 else None, self.strategy.save_shard) as ckpt:
                ray.train.report(metrics, checkpoint=ckpt)
            self.metrics.checkpoint("save", time.perf_counter() - start)
        else:
            ray.train.report(metrics)

    def _write_metrics(self) -> None:
        storage.write_text(storage.join(self.spec.run_path, "metrics.json"), json.dumps(self.history, indent=1))

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            **self.strategy.state_dict(),  # DDP: optimizer and AMP scaler; DeepSpeed: in its shards
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "callbacks": self.callbacks.state_dict(),
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "history": self.history,
            "restores": self.restores,
        }

    def restore(self) -> None:
        """Continue from the checkpoint Ray hands over (after a worker failure or a driver rerun), else from
        `train.resume_from` (another run's checkpoint: a PBT exploit, a restarted sweep trial)."""
        start = time.perf_counter()
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as directory:
                self.load(directory)
        elif self.train_spec.resume_from:
            self.load(checkpoint.find(self.train_spec.resume_from))
        else:
            return
        self.metrics.checkpoint("restore", time.perf_counter() - start)
        self.metrics.epoch({**(self.history or [{}])[-1], "restores": self.restores})  # dashboards carry on
        if self.rank == 0:
            print(f"[{self.spec.name}] restored from checkpoint at epoch {self.state.epoch}", flush=True)

    def load(self, directory) -> None:
        state = checkpoint.load(directory)
        self.model.load_state_dict(state["model"])
        self.strategy.load(state, directory)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.callbacks.load_state_dict(state["callbacks"])
        self.state.epoch, self.state.global_step = state["epoch"], state["global_step"]
        self.history, self.restores = state["history"], state["restores"] + 1


def _batch_totals(loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(summed loss, correct, seen) of one batch, to be added up and all-reduced once per epoch."""
    correct = (logits.argmax(1) == labels).sum()
    return torch.stack([loss_sum.float(), correct.float(), correct.new_tensor(len(labels)).float()])


def _top5_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    top5 = logits.topk(min(5, logits.shape[1]), 1).indices
    return (top5 == labels[:, None]).any(1).sum().float().view(1)


def _progress_line(name: str, m: dict, epochs: int) -> str:
    return (
        f"[{name}] epoch {m['epoch']}/{epochs}  train loss {m['train/loss']:.4f} acc {m['train/acc']:.2f}%  "
        f"test loss {m['test/loss']:.4f} acc {m['test/acc']:.2f}%  lr {m['lr']:.4g}  {m['images_per_s']:.0f} img/s"
    )
