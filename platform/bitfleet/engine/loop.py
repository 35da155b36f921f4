"""The per-worker epoch/step loop: strategy (DDP or DeepSpeed), EMA, evaluation, report, checkpoint.

`train_worker` is the `train_loop_per_worker` of every bitfleet TorchTrainer. Every rank calls
`ray.train.report` once per epoch (rank 0 attaches the epoch's checkpoint; with a sharded strategy every
rank attaches its shard to the same one) and rank 0 writes `metrics.json`.

Between epochs, a step can end in a checkpoint too (engine/preemption.py says when: every N steps or
minutes, on a preemption notice, before stopping). Every rank reports it, each adding its own part: its
RNG states (the training step's draws: dropout, mixup), its partial sums of the epoch's metrics and the
time it trained; rank 0 adds `state.pt`, which holds the step within the epoch. Restored, the run
continues at the next batch with the same draws (the loaders start the epoch's order at that batch, and
augmentation is drawn per sample, data/loaders.py), and ends with the same weights as a run that never
stopped. Such a report is marked `STEP_CHECKPOINT` and scores worst, so Ray's `num_to_keep` prunes
step checkpoints before the epochs' best ones, never the latest.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode

from bitfleet import registry, storage
from bitfleet.data import loaders
from bitfleet.engine import checkpoint, early_stopping, ema, events, preemption, strategy
from bitfleet.engine.batchnorm import broadcast_buffers
from bitfleet.engine.callbacks import Callbacks, RunContext, TrainState
from bitfleet.engine.evaluate import batch_sums, evaluate
from bitfleet.engine.optim import build_lr_scheduler, build_optimizer
from bitfleet.engine.rng import rng_states, seed_everything, set_rng_states
from bitfleet.metrics import WorkerMetrics, run_labels
from bitfleet.run_identity import spec_digest
from bitfleet.spec import RunSpec

log = logging.getLogger(__name__)
HANDED = "<the checkpoint Ray handed over>"  # rank 0's choice of it, which each rank opens on its own node
STEP_CHECKPOINT = "step_checkpoint"  # marks a mid-epoch report: no epoch's metrics, not a Tune iteration


def train_worker(config: dict) -> None:
    """Entry point inside each Ray Train worker; `config["spec"]` is the resolved RunSpec, its workload's
    sections already typed; `config["checkpoint_score"]` the (metric, mode) Ray ranks checkpoints by;
    `config["events"]` the driver's queue for what the run tells it (engine/events.py)."""
    Trainer(config["spec"], config.get("checkpoint_score"), config.get("events")).fit()


def worker_part(rank: int) -> str:
    """A rank's own file in a mid-epoch checkpoint."""
    return f"worker.rank{rank}.pt"


class Trainer:
    """The state of one worker's training and the steps that advance it."""

    def __init__(self, spec: RunSpec, checkpoint_score: tuple[str, str] | None = None, event_queue=None):
        context = ray.train.get_context()
        self.spec, self.train_spec = spec, spec.train
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.events = events.Events(event_queue, spec.name, self.rank)
        self.events.forward_warnings()
        self.device = ray.train.torch.get_device()
        self.run_path = storage.run_path(spec)
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
        self.data = loaders.build(spec.data, loaders.Batches.of(spec), self.rank, self.world, self.device)
        self.train_loader, self.eval_loaders = self.data.train, self.data.evals
        self.steps_per_epoch = min(self.data.steps_per_epoch, self.train_spec.max_steps_per_epoch or math.inf)
        run = RunContext(self.train_spec.epochs, self.run_path, spec.data, self.data.info, self.rank, self.world)
        self.workload = registry.get(spec.workload, spec.options)  # a fresh one, holding this run's options
        self.workload.setup(run)

        torch.manual_seed(spec.seed)  # identical initial weights on every rank
        self.model = self.workload.build_model(spec.model, self.data.info)
        if self.train_spec.init_from:  # a restored checkpoint (below, in `restore`) overrides these weights
            with checkpoint.fetched(self.train_spec.init_from) as initial:  # a folder or an object-store URI
                self.workload.load_initial_weights(self.model, checkpoint.weights(initial))
        self.optimizer = build_optimizer(self.model, self.train_spec.optimizer)
        self.scheduler = build_lr_scheduler(
            self.optimizer, self.train_spec.lr_schedule, self.train_spec.epochs, self.steps_per_epoch
        )
        # moves the model to the device, wraps it (DDP, or a DeepSpeed engine that wraps the optimizer too)
        self.strategy = strategy.build(self.train_spec, self.model, self.optimizer, self.device,
                                       self.train_spec.batch_size // self.world)
        self.ema = ema.build(self.model, self.train_spec.ema)
        evaluated = {"": self.model, **({"ema/": self.ema.module} if self.ema else {})}  # by metrics prefix
        result = "ema/" if self.ema is not None and self.ema.is_result else ""
        self.objective = self.workload.Objective(self.train_spec, self.data.info)
        self.callbacks = Callbacks(self.workload.callbacks(run))
        self.state = TrainState(
            self.model, self.optimizer, epochs=self.train_spec.epochs, steps_per_epoch=self.steps_per_epoch,
            rank=self.rank, world_size=self.world, train_loader=self.train_loader,
            eval_model=evaluated[result], evaluated=evaluated, result_prefix=result, evaluate=self.evaluate_model,
        )
        self.history: list[dict] = []
        self.restores = 0
        self.metrics = WorkerMetrics(run_labels(spec), self.rank)
        self.spec_digest = spec_digest(spec)
        self.checkpoint_score = checkpoint_score
        self.early_stopping = early_stopping.build(self.train_spec.early_stopping, checkpoint_score,
                                                   self.objective.modes)
        self.control = preemption.Control(spec.failure, self.run_path, self.rank, self.world, self.device)
        self.meter = events.Meter(self.train_spec.print_freq, self.steps_per_epoch, self.train_spec.epochs)
        self.resume: dict | None = None  # this rank's part of a mid-epoch checkpoint, until its epoch resumes

    # ------------------------------------------------------------------ run
    def fit(self) -> None:
        preemption.watch_sigterm(self.spec.failure.preemption_grace_s)
        self.restore()
        self.metrics.plan(self.train_spec.epochs, self.steps_per_epoch, self.state.global_step)  # % done, ETA
        if self.rank == 0:
            self.events.emit("start", run_path=self.run_path, epochs=self.train_spec.epochs,
                             steps_per_epoch=self.steps_per_epoch, epoch=self.state.epoch,
                             step_in_epoch=self.state.step_in_epoch, workers=self.world, restores=self.restores)
        gc.collect()
        gc.freeze()  # the set-up run's objects (over half a million) live as long as it: full collections skip them
        try:
            while self.state.epoch < self.train_spec.epochs:
                if self._stopped_early():
                    return
                metrics = self.run_epoch()
                if metrics is None:  # stopped at a step checkpoint: the driver was asked to stop
                    return
                self.report(metrics)
        finally:
            gc.unfreeze()  # a process that runs several Trainers (local mode) collects the finished ones

    def run_epoch(self) -> dict[str, float] | None:
        """One epoch, or the rest of it after a mid-epoch restore; None when it stopped at a checkpoint."""
        state = self.state
        resume, self.resume = self.resume, None
        if resume is None:  # resumed: the epoch's seeds were drawn, its metrics so far come from the checkpoint
            state.metrics, state.step_in_epoch = {}, 0
            seed_everything(self.spec.seed, state.epoch, self.rank)
        self.data.set_epoch(state.epoch, state.step_in_epoch)
        self.strategy.model.train()  # before the callbacks: they may put some modules (frozen BN) back in eval mode
        self.callbacks.on_epoch_start(state)  # safe to repeat: what happens once an epoch records that it did
        if resume is not None:
            set_rng_states(resume["rng"])  # the streams as they were after the step that checkpointed
        trained = self.train_epoch(resume)
        if trained is None:
            return None
        metrics = {"epoch": state.epoch + 1, **trained, "lr": self.optimizer.param_groups[0]["lr"]}
        evaluating = time.perf_counter()
        broadcast_buffers(*state.evaluated.values())  # every rank evaluates, and rank 0 saves, the same BN statistics
        self.callbacks.on_eval_start(state)
        for prefix, model in state.evaluated.items():
            metrics.update({prefix + key: value for key, value in self.evaluate_model(model).items()})
        self.callbacks.on_eval_end(state, metrics)
        self.meter.evaluated(time.perf_counter() - evaluating)
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        self.callbacks.on_epoch_end(state, metrics)
        return {**metrics, **state.metrics, "restores": self.restores, "workers": self.world}

    def train_epoch(self, resume: dict | None = None) -> dict[str, float] | None:
        """The epoch's training steps from `state.step_in_epoch` on; None when it stopped at a checkpoint."""
        state = self.state
        sums = torch.zeros(2 + len(self.objective.sums), device=self.device)  # loss sum, seen, the objective's
        earlier = 0.0  # seconds this epoch trained before a mid-epoch restore
        if resume is not None:
            sums, earlier = resume["sums"].to(self.device), resume["elapsed"]
        start = clock = time.perf_counter()
        self.meter.start_epoch()
        steps = self.steps_per_epoch - state.step_in_epoch
        for images, labels in itertools.islice(self.train_loader, steps):  # no batch past the last
            loaded = time.perf_counter()
            images = strategy.to_device(self.train_spec, images, self.device)
            labels = labels.to(self.device, non_blocking=True)
            loss, outputs = self.train_step(images, labels)
            sums += self._batch_sums(loss.detach() * len(labels), outputs, labels, train=True)
            state.global_step += 1
            state.step_in_epoch += 1
            self.callbacks.on_step_end(state)
            now = time.perf_counter()
            self.metrics.step(now - clock, data_wait_s=loaded - clock, samples=len(labels))
            if self.meter.step(state.step_in_epoch, now - clock, loaded - clock, len(labels)) and self.rank == 0:
                self._progress(sums)
            action = self.control.after_step(state.global_step)
            if action == preemption.CHECKPOINT and state.step_in_epoch == self.steps_per_epoch \
                    and self._checkpoints_at_epoch_end(state.epoch + 1):
                action = None  # the epoch's own checkpoint follows its evaluation
            if action is not None:  # uploaded while training goes on, unless the group is about to end
                self.save_step_checkpoint(sums, earlier + time.perf_counter() - start,
                                          wait=action != preemption.CHECKPOINT)
                if action == preemption.STOP:
                    return None
                if action == preemption.PREEMPTED:
                    raise preemption.Preempted(f"SIGTERM: checkpointed at epoch {state.epoch + 1}, step "
                                               f"{state.step_in_epoch} of {self.steps_per_epoch}")
            clock = time.perf_counter()
        elapsed = earlier + time.perf_counter() - start
        loss_sum, seen, *rest = self._all_reduce(sums).tolist()
        return {**self.objective.metrics("train", loss_sum, seen, rest, train=True),
                "images_per_s": seen / elapsed, "epoch_time_s": elapsed}

    def _progress(self, sums: torch.Tensor) -> None:
        """Rank 0's progress event: its own running loss of the epoch (no all-reduce mid-epoch)."""
        loss_sum, seen = sums[:2].tolist()
        state = self.state
        lr = self.optimizer.param_groups[0]["lr"]
        self.events.emit("progress", **self.meter.snapshot(state.epoch, state.step_in_epoch, state.global_step,
                                                           loss_sum / max(seen, 1), lr))

    def train_step(self, images, labels):
        with self.strategy.autocast():
            loss, outputs = self.workload.train_step(self.strategy.model, images, labels, self.objective.loss)
        self.strategy.step(loss)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return loss, outputs

    def evaluate_model(self, model: torch.nn.Module) -> dict[str, float]:
        return {key: value for split, loader in self.eval_loaders.items()
                for key, value in self.evaluate(split, loader, model).items()}

    def evaluate(self, split: str, loader, model: torch.nn.Module) -> dict[str, float]:
        """The objective's metrics of `model` (the bare model or its EMA) on this rank's shard of `split`,
        summed over ranks."""
        return evaluate(model, loader, self.objective, split, self.device, autocast=self.strategy.autocast,
                        max_steps=self.train_spec.max_eval_steps, reduce=self._all_reduce)

    def _batch_sums(self, loss_sum, outputs, labels, train: bool) -> torch.Tensor:
        return batch_sums(self.objective, loss_sum, outputs, labels, train)

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
            histograms = {tag: values.numpy() for tag, values in self.state.histograms.items()}
            self.events.emit("epoch", metrics=metrics, epochs=epochs, histograms=histograms)
        self.state.histograms = {}
        if self._checkpoints_at_epoch_end(epoch) and (self.rank == 0 or self.strategy.sharded):
            parts = self.world if self.strategy.sharded else 1  # every rank adds its shard and manifest part
            self._report_with_checkpoint(metrics, self.strategy.save_shard, parts, wait=epoch == epochs)
        else:
            ray.train.report(metrics)

    def _report_with_checkpoint(self, metrics: dict, write_part, parts: int, wait: bool) -> None:
        """`ray.train.report` with a checkpoint: rank 0's `state.pt`, what `write_part` adds on this rank.
        Ray uploads it to storage in the background (`failure.upload: async`) while training goes on, unless
        `wait`: the group is about to end (the run's last epoch, a stop, a preemption)."""
        start = time.perf_counter()
        state = self.state_dict() if self.rank == 0 else None
        if state is not None:
            storage.check_free_space(self.run_path, checkpoint.size_estimate(state))
        folder = checkpoint.for_ray(state, write_part, rank=self.rank, parts=parts, spec_digest=self.spec_digest)
        background = self.spec.failure.upload == "async" and not wait
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC,
                         delete_local_checkpoint_after_upload=True)
        self.metrics.checkpoint("save", time.perf_counter() - start)
        self.control.saved()

    def _checkpoints_at_epoch_end(self, epochs_done: int) -> bool:
        return (epochs_done % self.spec.failure.checkpoint_every == 0 or epochs_done == self.train_spec.epochs
                or self._early_stop_reason() is not None)  # the run's last epoch either way

    def _early_stop_reason(self) -> str | None:
        return self.early_stopping.reason(self.history) if self.early_stopping else None

    def _stopped_early(self) -> bool:
        reason = self._early_stop_reason()
        if reason and self.rank == 0:  # the driver's log says so
            self.events.emit("log", level=logging.INFO,
                             text=f"{reason}: stopped after epoch {self.state.epoch} of {self.train_spec.epochs}")
        return reason is not None

    def save_step_checkpoint(self, sums: torch.Tensor, elapsed: float, wait: bool) -> None:
        """A mid-epoch checkpoint (see the module's docstring); every rank calls it at the same step."""
        mine = {"rng": rng_states(), "sums": sums.cpu(), "elapsed": elapsed}

        def write_part(directory: Path) -> None:
            torch.save(mine, directory / worker_part(self.rank))
            if self.strategy.sharded:
                self.strategy.save_shard(directory)

        marker = {STEP_CHECKPOINT: 1, "epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch,
                  "global_step": self.state.global_step}
        if self.checkpoint_score:  # the worst finite score (Ray's run snapshot keeps no NaN): pruned first
            metric, mode = self.checkpoint_score
            marker[metric] = -sys.float_info.max if mode == "max" else sys.float_info.max
        self._report_with_checkpoint(marker, write_part, self.world, wait)

    def _write_metrics(self) -> None:
        storage.write_text(storage.join(self.run_path, "metrics.json"), json.dumps(self.history, indent=1))

    def state_dict(self) -> dict:
        return {
            "model": checkpoint.dense(self.model.state_dict()),
            **self.strategy.state_dict(),  # DDP: optimizer and AMP scaler; DeepSpeed: in its shards
            "scheduler": self.scheduler.state_dict(),
            "ema": checkpoint.dense(self.ema.state_dict()) if self.ema is not None else None,
            "callbacks": self.callbacks.state_dict(),
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "step_in_epoch": self.state.step_in_epoch,  # > 0: a mid-epoch checkpoint
            "epoch_metrics": dict(self.state.metrics),  # the callbacks' telemetry of that epoch so far
            "history": self.history,
            "restores": self.restores,
        }

    def restore(self) -> None:
        """Continue from the newest complete checkpoint: the one Ray hands over (after a worker failure or a
        driver rerun) or a newer one on storage that Ray had not registered when the group failed; else from
        `train.resume_from` (another run's checkpoint: a PBT exploit, a restarted sweep trial); else from
        scratch. An incomplete or corrupt checkpoint is passed over with a warning naming it."""
        start = time.perf_counter()
        ckpt = ray.train.get_checkpoint()
        with contextlib.ExitStack() as opened:
            handed = opened.enter_context(ckpt.as_directory()) if ckpt is not None else None
            directory = self._agree(self._restore_point(handed))
            if directory == HANDED:  # each rank's own copy: downloaded per node from an object store
                directory = handed
            if directory is None and self.train_spec.resume_from:  # a folder or an object-store URI
                directory = opened.enter_context(checkpoint.fetched(self.train_spec.resume_from))
            if directory is None:
                return
            self.load(directory)
        self.metrics.checkpoint("restore", time.perf_counter() - start)
        self.metrics.epoch({**(self.history or [{}])[-1], "restores": self.restores})  # dashboards carry on
        if self.rank == 0:
            self.events.emit("restored", epoch=self.state.epoch, step_in_epoch=self.state.step_in_epoch,
                             checkpoint=str(directory))

    def _restore_point(self, handed: str | None) -> str | None:
        """Rank 0's choice: the newest complete checkpoint among Ray's and the run folder's (a local one)."""
        if self.rank != 0:
            return None
        candidates = [Path(handed)] if handed else []
        if not storage.is_uri(self.run_path):
            candidates += Path(self.run_path).glob("checkpoint_*")
        chosen = checkpoint.newest(candidates)
        if chosen is None and candidates:
            log.warning("%s: no complete checkpoint left: starting from scratch", self.spec.name)
        if chosen is not None and handed and chosen == Path(handed).resolve():
            return HANDED
        return str(chosen) if chosen is not None else None

    def _agree(self, choice: str | None) -> str | None:
        """Every rank restores what rank 0 chose (a sharded strategy's ranks must load the same checkpoint)."""
        if self.world > 1:
            box = [choice]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
        return choice

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
        self.state.step_in_epoch = state.get("step_in_epoch", 0)
        if self.state.step_in_epoch:
            self.state.metrics = state.get("epoch_metrics", {})
            self.resume = self._worker_part(Path(directory))

    def _worker_part(self, directory: Path) -> dict:
        """This rank's part of a mid-epoch checkpoint. Written by another number of workers, there is none:
        the epoch still continues where it was in its sample order (every rank skips the same prefix of
        the epoch's permutation whatever the world size), but not bit for bit: its random streams start
        afresh and its train metrics cover the rest of the epoch only."""
        path = directory / worker_part(self.rank)
        parts = checkpoint.manifest(directory).get("parts", 1)
        if parts == self.world and path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        if self.rank == 0:
            log.warning("%s: %s was written mid-epoch by %d workers, resumed by %d: the epoch continues in its "
                        "order, not bit for bit", self.spec.name, directory.name, parts, self.world)
        seed_everything(self.spec.seed, self.state.global_step, self.rank)
        sums = torch.zeros(2 + len(self.objective.sums))
        return {"rng": rng_states(), "sums": sums, "elapsed": 0.0}

