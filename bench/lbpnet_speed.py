"""LBPNet speed, measured side by side in one run on the same threads:

1. training images/s of the seed's `paper_mnist_rp_full60k` network (batch 256): our LBP layer against a
   seed-style layer (every input channel sampled with grid_sample at every point, bilinear, then the bits
   averaged over channels — how the seed's public re-implementation computes it; kept here only as the
   reference being measured);
2. inference images/s of the MAC-free quickstart network: the integer engine against the torch hard path.

    python bench/lbpnet_speed.py [--threads 2] [--steps 5] [--rounds 3] [--skip-inference]
                                 [--out bench/results/lbpnet_speed.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from timing import step_seconds

from bitfleet import registry
from bitfleet.data import mnist
from bitfleet.data.transforms import normalise
from bitfleet.export import write_engine
from bitfleet.spec import DataSpec
from workloads.lbpnet import intengine
from workloads.lbpnet.config import ModelConfig
from workloads.lbpnet.models import LBPNet

SPECS = Path(__file__).resolve().parents[1] / "workloads" / "lbpnet" / "specs"


class SeedStyleLBP(torch.nn.Module):
    """The reference: all C channels sampled at all P·N offsets with grid_sample, compared, averaged over C."""

    def __init__(self, ours):
        super().__init__()
        self.ours = ours  # same offsets and alpha
        self.soft_forward = True  # its bits are channel means (fractions): the fusion takes torch's operators

    def forward(self, x, index=None):
        b, c, h, w = x.shape
        pos = self.ours.positions().reshape(-1, 2)[: self.ours.num_patterns * self.ours.num_points]  # (PN, 2)
        pn = len(pos)
        gy, gx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        grid = torch.stack([gx + pos[:, 1].view(-1, 1, 1) * 2 / (w - 1),
                            gy + pos[:, 0].view(-1, 1, 1) * 2 / (h - 1)], -1)
        grid = grid.unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * pn, h, w, 2)
        xs = x.unsqueeze(1).expand(b, pn, c, h, w).reshape(b * pn, c, h, w)
        sampled = F.grid_sample(xs, grid, mode="bilinear", padding_mode="border",
                                align_corners=True).view(b, pn, c, h, w)
        soft = torch.sigmoid((sampled - x.unsqueeze(1)) / self.ours.alpha)
        bits = ((sampled > x.unsqueeze(1)).float() - soft).detach() + soft  # hard forward, sigmoid STE
        bits = bits.mean(2)  # (B, PN, H, W)
        return bits if index is None else bits[:, index]


def model_from(spec_file: str) -> LBPNet:
    spec = yaml.safe_load((SPECS / spec_file).read_text())
    torch.manual_seed(0)
    return LBPNet(ModelConfig.model_validate(spec["model"]), 1, 10, 28)


def train_images_per_s(model, steps: int, batch: int = 256) -> float:
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    return batch / step_seconds(model, opt, x, y, steps)


def training(steps: int, rounds: int) -> dict:
    """Interleaved rounds (ours, then the seed-style layer), so both see the same machine; medians and ranges."""
    ours = model_from("paper_mnist_rp_full60k.yaml")
    seed_style = model_from("paper_mnist_rp_full60k.yaml")
    for block in seed_style.blocks:
        block.lbp = SeedStyleLBP(block.lbp)
    ours_ips, seed_ips = [], []
    for _ in range(rounds):
        ours_ips.append(train_images_per_s(ours, steps))
        seed_ips.append(train_images_per_s(seed_style, steps))
    ratios = [a / b for a, b in zip(ours_ips, seed_ips)]
    return {"ours_images_per_s": statistics.median(ours_ips), "seed_style_images_per_s": statistics.median(seed_ips),
            "ratio": statistics.median(ours_ips) / statistics.median(seed_ips),
            "rounds": {"ours_images_per_s": ours_ips, "seed_style_images_per_s": seed_ips, "ratio": ratios}}


def inference(repeats: int, n: int = 2000) -> dict:
    model = model_from("quickstart.yaml").eval()
    codes = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    normalised = normalise(mnist.MEAN, mnist.STD)(codes)
    with tempfile.TemporaryDirectory() as tmp:
        write_engine(registry.get("lbpnet"), model, None, DataSpec(dataset="mnist_sample"), Path(tmp) / "e.npz")
        engine = intengine.IntegerLBPNet(Path(tmp) / "e.npz")
    best_torch = best_engine = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            expected = model(normalised).argmax(1).numpy()
        best_torch = min(best_torch, time.perf_counter() - start)
        start = time.perf_counter()
        got = engine.predict(codes.numpy())
        best_engine = min(best_engine, time.perf_counter() - start)
    return {
        "torch_hard_path_images_per_s": n / best_torch, "integer_engine_images_per_s": n / best_engine,
        "ratio": best_torch / best_engine, "predictions_equal": bool((expected == got).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved training rounds (medians reported)")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--out", default="bench/results/lbpnet_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "train_batch": 256, "train": training(args.steps, args.rounds)}
    if not args.skip_inference:
        result["inference"] = inference(3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    t, r = result["train"], result["train"]["rounds"]
    print(f"train (paper_mnist_rp_full60k, batch 256, {args.threads} threads, medians of {args.rounds} rounds): "
          f"ours {t['ours_images_per_s']:.0f} img/s "
          f"({min(r['ours_images_per_s']):.0f}-{max(r['ours_images_per_s']):.0f}), "
          f"seed-style {t['seed_style_images_per_s']:.0f} img/s "
          f"({min(r['seed_style_images_per_s']):.0f}-{max(r['seed_style_images_per_s']):.0f}), "
          f"ratio {t['ratio']:.1f}x (rounds {min(r['ratio']):.1f}-{max(r['ratio']):.1f}x)")
    if "inference" not in result:
        print(f"wrote {out}")
        return
    i = result["inference"]
    print(f"inference (quickstart network): integer engine {i['integer_engine_images_per_s']:.0f} img/s, "
          f"torch hard path {i['torch_hard_path_images_per_s']:.0f} img/s, ratio {i['ratio']:.2f}x, "
          f"predictions equal: {i['predictions_equal']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
