"""RBNN speed, measured side by side in one run on the same threads (default 2, batch 128, CIFAR shape):

1. a training step of our resnet20_1w1a against the float ResNet-20 of `resnet_cifar` — the cost of
   binarizing, as a ratio (the official code's is ~1.96x on 2 threads). Interleaved rounds (default 7): in
   each round the two models take single steps in turn (`--steps` each, the order alternating, so both see
   the same load and the same cache disturbance), after one warm-up step of each; per round the ratio of
   the median step times. Reported: the median over the rounds, its minimum and maximum (the spread), and
   the same for process CPU seconds per step (all threads), which a load that comes and goes on a shared
   machine disturbs less than wall-clock time. Two more models take their turns: resnet20_1w1a with the
   forward's CPU kernels on too (`layers.CPU_KERNELS`, off by default: a serial numba pass for the activations'
   sign), and on the torch ops alone (`layers.FUSED_BACKWARD` off as well: the backward's
   elementwise work as chains of torch ops, as before the fused passes);
2. one rotation update of every binarized layer of resnet20_1w1a: ours (batched over output channels)
   against the paper's formulas written as a loop over output channels (median of 5);
3. with --models: every architecture's parameter count, binarized share of weights and step time.

    python bench/rbnn_speed.py [--threads 2] [--rounds 7] [--steps 6] [--models] [--out bench/results/rbnn_speed.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from timing import step_seconds, train_step

from workloads.rbnn import layers
from workloads.rbnn.layers import binary_convs
from workloads.rbnn.models import ARCHS, build
from workloads.resnet_cifar import models as float_models


class Timed:
    """A model with its optimizer and one fixed batch."""

    def __init__(self, model: torch.nn.Module, batch: int, cpu_kernels: bool = False, fused_backward: bool = True):
        self.model, self.opt = model, torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
        self.x, self.y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        self.cpu_kernels, self.fused_backward = cpu_kernels, fused_backward

    def _set_kernels(self) -> None:
        layers.CPU_KERNELS, layers.FUSED_BACKWARD = self.cpu_kernels, self.fused_backward

    def step(self) -> tuple[float, float]:
        """(wall, process CPU) seconds of one training step."""
        self._set_kernels()
        wall, cpu = time.perf_counter(), time.process_time()
        train_step(self.model, self.opt, self.x, self.y)
        return time.perf_counter() - wall, time.process_time() - cpu

    def seconds(self, steps: int) -> float:
        self._set_kernels()
        return step_seconds(self.model, self.opt, self.x, self.y, steps)


def interleaved(pair: dict[str, Timed], rounds: int, steps: int) -> dict[str, dict[str, list[float]]]:
    """Per round and model, the median (wall, CPU) seconds of `steps` single steps taken in turn with the other
    model's, after one warm-up step each: a load that drifts hits both alike."""
    result = {name: {"wall": [], "cpu": []} for name in pair}
    for r in range(rounds):
        for timed in pair.values():
            timed.step()
        samples = {name: [] for name in pair}
        for s in range(steps):
            for name in (list(pair) if (r + s) % 2 == 0 else list(pair)[::-1]):
                samples[name].append(pair[name].step())
        for name, taken in samples.items():
            result[name]["wall"].append(statistics.median(w for w, _ in taken))
            result[name]["cpu"].append(statistics.median(c for _, c in taken))
        print(f"  round {r + 1}/{rounds}: " + "  ".join(
            f"{n} {t['wall'][-1]:.3f} s ({t['cpu'][-1]:.3f} s CPU)" for n, t in result.items()), flush=True)
    return result


def ratios(times: dict[str, dict[str, list[float]]], name: str, clock: str) -> dict:
    """`name`'s step against the float one's: medians over the rounds and the per-round ratios' spread."""
    per_round = [b / f for b, f in zip(times[name][clock], times["float"][clock])]
    return {"step_s": statistics.median(times[name][clock]), "float_step_s": statistics.median(times["float"][clock]),
            "ratio": statistics.median(per_round), "ratio_min": min(per_round), "ratio_max": max(per_round),
            "ratios": per_round, "round_s": times[name][clock], "float_round_s": times["float"][clock]}


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
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model and round (median)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--models", action="store_true", help="also time every architecture (CIFAR shape)")
    parser.add_argument("--out", default="bench/results/rbnn_speed.json")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds: at least 5, so that the median and the spread mean something")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pair = {"float": Timed(float_models.build("resnet20", "A", num_classes=10, in_channels=3), args.batch),
            "binary": Timed(build("resnet20_1w1a", 10, 3, 32), args.batch, cpu_kernels=False),
            "binary_cpu_kernels": Timed(build("resnet20_1w1a", 10, 3, 32), args.batch, cpu_kernels=True),
            "binary_torch_ops": Timed(build("resnet20_1w1a", 10, 3, 32), args.batch, fused_backward=False)}
    for timed in pair.values():  # warm-up: allocator, oneDNN primitives, numba kernels, momentum buffers
        timed.seconds(2)
    times = interleaved(pair, args.rounds, args.steps)
    wall, cpu = ratios(times, "binary", "wall"), ratios(times, "binary", "cpu")
    kernels = {clock: ratios(times, "binary_cpu_kernels", clock) for clock in ("wall", "cpu")}
    torch_ops = {clock: ratios(times, "binary_torch_ops", clock) for clock in ("wall", "cpu")}
    ours = rotation_seconds(lambda layer: layer.update_rotation(3))
    loop = rotation_seconds(loop_rotation_update)
    result = {
        "threads": args.threads, "batch": args.batch, "rounds": args.rounds, "steps": args.steps,
        "float_resnet20_step_s": wall["float_step_s"], "resnet20_1w1a_step_s": wall["step_s"],
        "binarize_cost_ratio": wall["ratio"], "wall": wall, "cpu": cpu, "cpu_kernels": kernels, "torch_ops": torch_ops,
        "rotation_update_batched_s": ours, "rotation_update_loop_s": loop, "rotation_speedup": loop / ours,
    }
    if args.models:
        result["models"] = model_table(3, args.batch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"train step, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds (medians): "
          f"float ResNet-20 {wall['float_step_s']:.3f} s, resnet20_1w1a {wall['step_s']:.3f} s -> "
          f"binarizing costs {wall['ratio']:.2f}x (rounds {wall['ratio_min']:.2f}-{wall['ratio_max']:.2f}x); "
          f"CPU time {cpu['ratio']:.2f}x (rounds {cpu['ratio_min']:.2f}-{cpu['ratio_max']:.2f}x)")
    for label, other in (("with the forward's CPU kernels on too (layers.CPU_KERNELS)", kernels),
                         ("on the torch ops alone (layers.FUSED_BACKWARD off too)", torch_ops)):
        wall_o = other["wall"]
        print(f"  {label}: {wall_o['step_s']:.3f} s -> {wall_o['ratio']:.2f}x (rounds {wall_o['ratio_min']:.2f}-"
              f"{wall_o['ratio_max']:.2f}x); CPU time {other['cpu']['ratio']:.2f}x")
    print(f"rotation update of all 18 binary layers (3 iterations): batched {ours * 1000:.1f} ms, "
          f"per-channel loop {loop * 1000:.1f} ms -> {loop / ours:.1f}x faster")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
