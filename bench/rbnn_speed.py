"""RBNN speed, measured side by side in one run on the same threads (default 2, batch 128, CIFAR shape):

1. a training step of our resnet20_1w1a against the float ResNet-20 of `resnet_cifar` — the cost of
   binarizing, as a ratio (the official code's is ~1.96x on 2 threads);
2. one rotation update of every binarized layer of resnet20_1w1a: ours (batched over output channels)
   against the paper's formulas written as a loop over output channels;
3. with --models: every architecture's parameter count, binarized share of weights and step time.

    python bench/rbnn_speed.py [--threads 2] [--steps 10] [--out bench/results/rbnn_speed.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from timing import step_seconds

from workloads.rbnn.layers import binary_convs
from workloads.rbnn.models import ARCHS, build
from workloads.resnet_cifar import models as float_models


def sgd_step_seconds(model, steps: int, batch: int) -> float:
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    return step_seconds(model, opt, torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,)), steps)


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


def rotation_seconds(update, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.manual_seed(0)
        layers = binary_convs(build("resnet20_1w1a", 10, 3, 32))
        start = time.perf_counter()
        for layer in layers:
            update(layer)
        best = min(best, time.perf_counter() - start)
    return best


def model_table(steps: int, batch: int) -> list[dict]:
    rows = []
    for arch in ARCHS:
        torch.manual_seed(0)
        model = build(arch, 10, 3, 32)
        params = sum(p.numel() for p in model.parameters())
        binary = sum(c.weight.numel() for c in binary_convs(model))
        rows.append({"arch": arch, "params": params, "binary_share": binary / params,
                     "step_s": sgd_step_seconds(model, steps, batch)})
        print(f"  {arch:38s} {params:>10,d} params  {100 * binary / params:5.1f}% binary  "
              f"{rows[-1]['step_s']:.3f} s/step")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--models", action="store_true", help="also time every architecture (CIFAR shape)")
    parser.add_argument("--out", default="bench/results/rbnn_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    float_s = sgd_step_seconds(float_models.build("resnet20", "A", num_classes=10, in_channels=3),
                               args.steps, args.batch)
    binary_s = sgd_step_seconds(build("resnet20_1w1a", 10, 3, 32), args.steps, args.batch)
    ours = rotation_seconds(lambda layer: layer.update_rotation(3))
    loop = rotation_seconds(loop_rotation_update)
    result = {
        "threads": args.threads, "batch": args.batch,
        "float_resnet20_step_s": float_s, "resnet20_1w1a_step_s": binary_s, "binarize_cost_ratio": binary_s / float_s,
        "rotation_update_batched_s": ours, "rotation_update_loop_s": loop, "rotation_speedup": loop / ours,
    }
    if args.models:
        result["models"] = model_table(max(2, args.steps // 3), args.batch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"train step, batch {args.batch}, {args.threads} threads: float ResNet-20 {float_s:.3f} s, "
          f"resnet20_1w1a {binary_s:.3f} s -> binarizing costs {binary_s / float_s:.2f}x")
    print(f"rotation update of all 18 binary layers (3 iterations): batched {ours * 1000:.1f} ms, "
          f"per-channel loop {loop * 1000:.1f} ms -> {loop / ours:.1f}x faster")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
