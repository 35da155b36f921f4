"""Where a bitfleet training step spends time beyond a plain PyTorch step, line by line, in one process.

The bitfleet loop's `Trainer` (Ray Train's local mode: no cluster, no worker process, so Ray's own part
is left out; `bench/overhead.py` measures that) and a plain loop over the same data set, model and
optimizer, measured side by side in interleaved rounds (medians):

- the step itself: `Trainer.train_step` (the workload's forward and loss, the strategy's backward and
  step, the lr scheduler) against `cross_entropy` + `zero_grad` + `backward` + `SGD.step`;
- fetching a batch: the run's loader (`ResumableSampler`, augmentation drawn per sample by `SampleSeeded`)
  against a `DataLoader(shuffle=True)` of the same data set;
- each thing the loop adds after a step, timed alone over many calls: the epoch's metric sums, the
  callbacks, the per-step metric records (`ray.util.metrics`), the progress meter, the checkpoint control,
  the clocks.

    python bench/step_costs.py [--batch 128] [--threads 2] [--rounds 5] [--steps 10] [--out FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bitfleet.data import synthetic

OUT = Path(__file__).parent / "results" / "step_costs.json"


def spec_overrides(root: Path, storage: Path, args) -> list[str]:
    return ["data.dataset=cifar10", f"data.root={root}", "data.augment=true", "data.loader_workers=0",
            f"train.batch_size={args.batch}", "train.lr_schedule={type: constant}", "train.epochs=1",
            f"scaling.cpus_per_worker={args.threads}", "scaling.num_workers=1", f"storage_path={storage}"]


def per_call_us(fn, calls: int = 300) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def checkpoint_save_ms(trainer, rounds: int) -> float:
    """What a checkpoint costs the training thread (median ms): the state gathered, the free-space check,
    state.pt and the manifest written to a temporary folder. Ray uploads that folder in the background
    (`failure.upload: async`), which takes a core's time but not the training thread's."""
    from bitfleet import storage
    from bitfleet.engine import checkpoint

    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        state = trainer.state_dict()
        storage.check_free_space(trainer.run_path, checkpoint.size_estimate(state))
        folder = checkpoint.for_ray(state, trainer.strategy.save_shard, spec_digest=trainer.spec_digest)
        times.append((time.perf_counter() - start) * 1e3)
        shutil.rmtree(folder)
    return statistics.median(times)


def measure(args) -> dict:
    from bitfleet.engine import loop, preemption
    from bitfleet.resolve import load_spec

    tmp = Path(tempfile.mkdtemp(prefix="bf-steps-"))
    synthetic.write("cifar10", tmp / "cifar10", n_train=args.batch * (args.steps + 2), n_test=args.batch, seed=0)
    spec = load_spec(Path(__file__).parents[1] / "workloads/resnet_cifar/specs/quickstart.yaml",
                     spec_overrides(tmp / "cifar10", tmp / "runs", args))
    trainer = loop.Trainer(spec)
    torch.set_num_threads(args.threads)
    model, optimizer = trainer.model, trainer.optimizer
    # the same data set and transforms, loaded as a plain loop would (the run's loader wraps them: SampleSeeded)
    plain_loader = DataLoader(trainer.train_loader.dataset.dataset, args.batch, shuffle=True, drop_last=True)
    batches = list(itertools.islice(trainer.train_loader, args.steps))

    def plain_step(images, labels):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    steps = {"bitfleet": [], "plain": []}
    fetch = {"bitfleet": [], "plain": []}
    for _ in range(args.rounds):  # interleaved: the machine's drift hits both sides alike
        for side in ("bitfleet", "plain"):
            start = time.perf_counter()
            for images, labels in batches:
                trainer.train_step(images, labels) if side == "bitfleet" else plain_step(images, labels)
            steps[side].append((time.perf_counter() - start) / len(batches) * 1e3)
            loader = trainer.train_loader if side == "bitfleet" else plain_loader
            start = time.perf_counter()
            for _ in itertools.islice(loader, args.steps):
                pass
            fetch[side].append((time.perf_counter() - start) / args.steps * 1e3)

    images, labels = batches[0]
    with torch.no_grad():
        outputs = model(images)
    loss = F.cross_entropy(outputs, labels)
    sums = torch.zeros(2 + len(trainer.objective.sums))
    state = trainer.state
    control = preemption.Control(spec.failure, trainer.run_path, 0, 1, trainer.device)

    def metric_sums():
        sums.add_(trainer._batch_sums(loss.detach() * len(labels), outputs, labels, train=True))

    extras_us = {
        "epoch metric sums (loss, counts)": per_call_us(metric_sums),
        "callbacks.on_step_end": per_call_us(lambda: trainer.callbacks.on_step_end(state)),
        "per-step metric records (4, ray.util.metrics)": per_call_us(lambda: trainer.metrics.step(0.3, 0.01, 128)),
        "progress meter": per_call_us(lambda: trainer.meter.step(1, 0.3, 0.01, 128)),
        "checkpoint control (one rank)": per_call_us(lambda: control.after_step(1)),
        "clocks (3 perf_counter)": per_call_us(lambda: (time.perf_counter(), time.perf_counter(),
                                                        time.perf_counter())),
    }
    plain_ms = statistics.median(steps["plain"]) + statistics.median(fetch["plain"])
    save_ms = checkpoint_save_ms(trainer, args.rounds)
    return {
        "checkpoint_save_ms": save_ms, "checkpoint_save_in_steps": save_ms / plain_ms,
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
        "step_ms": {side: statistics.median(v) for side, v in steps.items()}, "step_ms_rounds": steps,
        "fetch_ms": {side: statistics.median(v) for side, v in fetch.items()}, "fetch_ms_rounds": fetch,
        "extras_us": extras_us, "plain_step_with_fetch_ms": plain_ms,
        "extras_share": sum(extras_us.values()) / 1e3 / plain_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    found: dict = {}

    def train_fn():  # Ray Train's local mode: the Trainer needs its context, not a cluster
        found.update(measure(args))

    TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=0)).fit()
    plain = found["plain_step_with_fetch_ms"]
    print(f"step (ms, median of {args.rounds}): bitfleet {found['step_ms']['bitfleet']:.2f}  "
          f"plain {found['step_ms']['plain']:.2f}")
    print(f"batch fetch (ms): bitfleet {found['fetch_ms']['bitfleet']:.2f}  plain {found['fetch_ms']['plain']:.2f}")
    for what, us in found["extras_us"].items():
        print(f"  {what:48s} {us:8.1f} us/step  {100 * us / 1e3 / plain:6.3f}% of a plain step")
    print(f"all extras: {100 * found['extras_share']:.3f}% of a plain step with its fetch ({plain:.1f} ms)")
    steps = found["checkpoint_save_in_steps"]
    print(f"a checkpoint costs the training thread {found['checkpoint_save_ms']:.1f} ms = {steps:.2f} steps: "
          f"{100 * steps / 390:.2f}% of a CIFAR-10 epoch at batch 128 (390 steps, checkpoint_every: 1); "
          f"<= 2% with failure.checkpoint_every_steps >= {max(1, round(50 * steps))}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
