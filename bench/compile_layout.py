"""`train.compile` and `train.channels_last`, per workload: the training step time of each workload's
quickstart model (tap_ppo: its LeNet-5 spec's float stage) with neither, either and both, side by side.

Each workload's model is built from its spec as a worker builds it, with the spec's optimizer, objective and
workload step (rbnn's and lbpnet's own losses), its input shape and its per-worker batch
(train.batch_size / scaling.num_workers), at the spec's threads per worker. Four copies start from the same
weights: plain, compile, channels_last, both. Rounds are interleaved (each round times every variant, in
an order rotated per round, so drift hits all alike); a variant's figure is the median over rounds of
its per-round median step, its spread the lowest and highest round, and its ratio the median of the
per-round ratios to plain (< 1: faster). Compile's one-off cost (tracing and code generation in the first
steps) is timed apart, as the first two steps' seconds, and left out of the rounds.

    python bench/compile_layout.py [--rounds 5] [--steps 5] [--workloads rbnn ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# a fresh Inductor cache: the warm-up is a cold compile, as a worker pays it on a node that never compiled the
# model (on the same node, a restarted worker finds the cache and pays a fraction)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bf-inductor-"))

import torch  # noqa: E402  (after the cache is chosen)

from bitfleet import registry
from bitfleet.data import info as data_info
from bitfleet.data import synthetic
from bitfleet.engine.callbacks import RunContext
from bitfleet.engine.optim import build_optimizer
from bitfleet.resolve import load_spec

ROOT = Path(__file__).parents[1]
OUT = Path(__file__).parent / "results" / "compile_layout.json"
TMP = Path(tempfile.gettempdir()) / "bf-compile-layout"  # the run folder no run writes; a few fake CIFAR images
SPECS = {  # workload -> (spec, overrides that make it one training run)
    "rbnn": ("workloads/rbnn/specs/quickstart.yaml", []),
    "resnet_cifar": ("workloads/resnet_cifar/specs/quickstart.yaml", []),
    "lbpnet": ("workloads/lbpnet/specs/quickstart.yaml", []),
    "tap_ppo": ("workloads/tap_ppo/specs/lenet5.yaml",
                ["stages=[]", "tap_ppo.stage=float", f"data.root={TMP}/cifar10"]),
}
VARIANTS = {"plain": (False, False), "compile": (True, False), "channels_last": (False, True),
            "both": (True, True)}
WARMUP_STEPS = 2  # compile traces the forward at the first call and the backward at the first backward


class Variant:
    """One copy of the model, its optimizer and its step, in one layout, compiled or not."""

    def __init__(self, workload, spec, model, batch, compiled: bool, channels_last: bool):
        self.workload, self.bare = workload, copy.deepcopy(model)
        if channels_last:  # as engine/strategy.py does
            self.bare.to(memory_format=torch.channels_last)
        self.model = torch.compile(self.bare) if compiled else self.bare
        self.optimizer = build_optimizer(self.bare, spec.train.optimizer)
        self.loss = workload.Objective(spec.train, data_info(spec.data)).loss
        images, labels = batch
        self.images = images.to(memory_format=torch.channels_last) if channels_last else images
        self.labels = labels

    def step(self) -> float:
        start = time.perf_counter()
        loss, _ = self.workload.train_step(self.model, self.images, self.labels, self.loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def build(name: str) -> tuple[dict[str, Variant], dict]:
    spec_file, extra = SPECS[name]
    if not (TMP / "cifar10").is_dir():  # the spec is checked against its data, which the timing never reads
        synthetic.write("cifar10", TMP / "cifar10", n_train=64, n_test=16, seed=0)
    spec = load_spec(ROOT / spec_file, [*extra, f"storage_path={TMP}/runs"])
    info = data_info(spec.data)
    workload = registry.get(spec.workload, spec.options)
    workload.setup(RunContext(spec.train.epochs, f"{TMP}/runs", spec.data, info))
    torch.manual_seed(spec.seed)
    model = workload.build_model(spec.model, info).train()
    batch_size = spec.train.batch_size // spec.scaling.worker_range[0]
    batch = (torch.randn(batch_size, info.in_channels, info.image_size, info.image_size),
             torch.randint(0, info.num_classes, (batch_size,)))
    shape = {"batch": batch_size, "input": list(batch[0].shape[1:]),
             "threads": max(1, int(spec.scaling.cpus_per_worker))}
    return {v: Variant(workload, spec, model, batch, *flags) for v, flags in VARIANTS.items()}, shape


def measure(name: str, rounds: int, steps: int) -> dict:
    variants, shape = build(name)
    torch.set_num_threads(shape["threads"])
    warmup = {v: sum(variant.step() for _ in range(WARMUP_STEPS)) for v, variant in variants.items()}
    for variant in variants.values():  # untimed: Inductor's compile workers may still be busy just after
        variant.step()
    order = list(variants)
    times: dict[str, list[float]] = {v: [] for v in order}
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            times[v].append(statistics.median(variants[v].step() for _ in range(steps)))
    result = {**shape, "variants": {}}
    plain = statistics.median(times["plain"])
    for v in order:
        ratios = [t / p for t, p in zip(times[v], times["plain"])]
        median = statistics.median(times[v])
        result["variants"][v] = {"median_s": median, "low_s": min(times[v]), "high_s": max(times[v]),
                                 "ratio": statistics.median(ratios), "ratio_low": min(ratios),
                                 "ratio_high": max(ratios), "warmup_s": warmup[v],
                                 "break_even_steps": break_even(warmup[v], median, plain)}
    return result


def break_even(warmup_s: float, step_s: float, plain_s: float) -> float | None:
    """The steps a run needs before a variant's one-off warm-up is paid back by its faster steps: N where
    warmup_s + (N - WARMUP_STEPS)·step_s = N·plain_s; None when its steps are not faster."""
    return (warmup_s - WARMUP_STEPS * step_s) / (plain_s - step_s) if step_s < plain_s else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--workloads", nargs="*", default=list(SPECS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    results = {"torch": torch.__version__, "rounds": args.rounds, "steps": args.steps, "workloads": {}}
    for name in args.workloads:
        results["workloads"][name] = row = measure(name, args.rounds, args.steps)
        for v, r in row["variants"].items():
            print(f"{name:13s} {v:14s} {r['median_s'] * 1e3:8.1f} ms [{r['low_s'] * 1e3:.1f}-{r['high_s'] * 1e3:.1f}]"
                  f"  x{r['ratio']:.2f} [{r['ratio_low']:.2f}-{r['ratio_high']:.2f}]  first {WARMUP_STEPS} steps "
                  f"{r['warmup_s']:.1f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))  # after each workload: a partial run keeps its rows


if __name__ == "__main__":
    main()
