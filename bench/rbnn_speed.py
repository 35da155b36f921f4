"""RBNN speed, measured side by side in one run on the same threads (default 2, batch 128, CIFAR shape):

1. a training step of our resnet20_1w1a against the float ResNet-20 of `resnet_cifar` — the cost of
   binarizing, as a ratio. Interleaved rounds (default 7): in each round both models are timed in turn
   (the order alternates between rounds), each as the median of `--steps` steps after one warm-up step;
   the ratio is taken per round, and its median, minimum and maximum over the rounds are reported, so a
   machine whose load changes during the run shows as spread rather than as a biased ratio (the official
   code's ratio is ~1.96x on 2 threads);
2. one rotation update of every binarized layer of resnet20_1w1a: ours (batched over output channels)
   against the paper's formulas written as a loop over output channels (median of 5);
3. with --models: every architecture's parameter count, binarized share of weights and step time.

    python bench/rbnn_speed.py [--threads 2] [--rounds 7] [--steps 5] [--models] [--out bench/results/rbnn_speed.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from timing import step_seconds

from workloads.rbnn.layers import binary_convs
from workloads.rbnn.models import ARCHS, build
from workloads.resnet_cifar import models as float_models


class Timed:
    """A model with its optimizer and one fixed batch, timed by `timing.step_seconds`."""

    def __init__(self, model: torch.nn.Module, batch: int):
        self.model, self.opt = model, torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
        self.x, self.y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def seconds(self, steps: int) -> float:
        return step_seconds(self.model, self.opt, self.x, self.y, steps)


def interleaved(pair: dict[str, Timed], rounds: int, steps: int) -> dict[str, list[float]]:
    """Each round times every model once, in an order that alternates between rounds (load drifts cancel)."""
    times: dict[str, list[float]] = {name: [] for name in pair}
    for r in range(rounds):
        for name in (list(pair) if r % 2 == 0 else list(pair)[::-1]):
            times[name].append(pair[name].seconds(steps))
        print(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    return times


@torch.no_grad()
def loop_rotation_update(layer, iterations: int = 3) -> None:
    """The paper's update written directly: sums over output channels in Python."""
    x = layer.standardised()
    r1, r2 = layer.R1.clone(), layer.R2.clone()
    for _ in range(iterations):
        b = torch.sign(r1.t() @ x @ r2)
        u1, _, v1 = torch.svd(sum(bi @ r2.t() @ xi.t() for bi, xi in zip(b, x)))
        r1 = v1 @ u1.t()
        u2, _, v2 = torch.svd(sum(xi.t() @ r1 @ bi for xi, bi in zip(x, b)))
        r2 = u2 @ v2.t()


def rotation_seconds(update, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        torch.manual_seed(0)
        layers = binary_convs(build("resnet20_1w1a", 10, 3, 32))
        start = time.perf_counter()
        for layer in layers:
            update(layer)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_table(steps: int, batch: int) -> list[dict]:
    rows = []
    for arch in ARCHS:
        torch.manual_seed(0)
        model = build(arch, 10, 3, 32)
        params = sum(p.numel() for p in model.parameters())
        binary = sum(c.weight.numel() for c in binary_convs(model))
        rows.append({"arch": arch, "params": params, "binary_share": binary / params,
                     "step_s": Timed(model, batch).seconds(steps)})
        print(f"  {arch:38s} {params:>10,d} params  {100 * binary / params:5.1f}% binary  "
              f"{rows[-1]['step_s']:.3f} s/step", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (at least 5)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and round (median)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--models", action="store_true", help="also time every architecture (CIFAR shape)")
    parser.add_argument("--out", default="bench/results/rbnn_speed.json")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds: at least 5, so that the median and the spread mean something")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pair = {"float": Timed(float_models.build("resnet20", "A", num_classes=10, in_channels=3), args.batch),
            "binary": Timed(build("resnet20_1w1a", 10, 3, 32), args.batch)}
    for timed in pair.values():  # warm-up: allocator, oneDNN primitives, the optimizers' momentum buffers
        timed.seconds(2)
    times = interleaved(pair, args.rounds, args.steps)
    ratios = [b / f for b, f in zip(times["binary"], times["float"])]
    float_s, binary_s, ratio = (statistics.median(v) for v in (times["float"], times["binary"], ratios))
    ours = rotation_seconds(lambda layer: layer.update_rotation(3))
    loop = rotation_seconds(loop_rotation_update)
    result = {
        "threads": args.threads, "batch": args.batch, "rounds": args.rounds, "steps": args.steps,
        "float_resnet20_step_s": float_s, "resnet20_1w1a_step_s": binary_s, "binarize_cost_ratio": ratio,
        "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios,
        "float_round_s": times["float"], "binary_round_s": times["binary"],
        "rotation_update_batched_s": ours, "rotation_update_loop_s": loop, "rotation_speedup": loop / ours,
    }
    if args.models:
        result["models"] = model_table(max(2, args.steps // 2), args.batch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"train step, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds (medians): "
          f"float ResNet-20 {float_s:.3f} s, resnet20_1w1a {binary_s:.3f} s -> binarizing costs {ratio:.2f}x "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)")
    print(f"rotation update of all 18 binary layers (3 iterations): batched {ours * 1000:.1f} ms, "
          f"per-channel loop {loop * 1000:.1f} ms -> {loop / ours:.1f}x faster")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
