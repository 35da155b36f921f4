"""ImageNet input pipeline speed, measured side by side in one run on the same JPEG folder, the same
transforms and the same number of CPU threads:

    DALI (`fn.readers.file` + decode + random-resized crop + flip + normalise, `num_threads=N`)
    against torchvision (ImageFolder-style PIL decode + the same transforms, DataLoader `num_workers=N`)

for the training transform (random-resized crop 224, flip) and the eval transform (resize 256, centre
crop 224), in images/s of full passes. Each loader runs one warm-up pass, then the loaders take turns,
one pass each per round, so that a change in the machine's load falls on both; the figures are medians
over the rounds, and the ratio's spread is the lowest and highest of the per-round ratios.

torchvision gets its best fair settings: the run's own dataset, sampler and transforms, `num_workers=N`
kept alive between passes (`persistent_workers`, which a run's loader does not use: it re-seeds its
workers per epoch) and no pinned memory on the CPU. DALI's loader is the one runs use.
On a machine with a GPU, `--gpu` adds DALI's `mixed` decoding (nvJPEG) as a third column.
Without `--root`, a synthetic folder of ImageNet-sized JPEGs (~500x375, quality 90) is written first.

    python bench/imagenet_loader.py [--root DIR] [--images 512] [--threads 2] [--batch 64] [--rounds 5] [--gpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bitfleet.data import folders, loaders
from bitfleet.resolve import validate_spec

KINDS = ("train", "eval")


def write_imagenet_like(root: Path, images: int, classes: int = 8) -> Path:
    """JPEGs of ImageNet's typical size and aspect ratios, with smooth content plus noise (realistic entropy)."""
    rng = np.random.default_rng(0)
    for i in range(images):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.clip(np.asarray(base, dtype=np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255)
        for split in ("train", "val"):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i:05d}.JPEG", quality=90)
    return root


def one_pass(batches) -> float:
    """Images/s of one full pass over `batches`."""
    start, count = time.perf_counter(), 0
    for images, _ in batches:
        count += len(images)
    if torch.cuda.is_initialized():  # DALI's mixed decoding: its last batch done
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def spec_for(root: Path, loader: str, threads: int, batch: int):
    return validate_spec({
        "name": "bench", "workload": "resnet_cifar", "data": {"dataset": "image_folder", "root": str(root),
        "loader": loader, "loader_workers": threads, "crop_size": 224, "resize_size": 256},
        "train": {"batch_size": batch, "eval_batch_size": batch}, "scaling": {"num_workers": 1},
    })


def persistent(loader: DataLoader) -> DataLoader:
    """The same DataLoader with its worker processes kept between passes (torchvision's best on the CPU)."""
    return DataLoader(loader.dataset, loader.batch_size, sampler=loader.sampler, num_workers=loader.num_workers,
                      drop_last=loader.drop_last, persistent_workers=loader.num_workers > 0,
                      pin_memory=loader.pin_memory)


def build(root: Path, loader: str, threads: int, batch: int, device: torch.device) -> dict:
    """{"train": ..., "eval": ...}: the run's loaders of this kind (torchvision's made persistent)."""
    spec = spec_for(root, loader, threads, batch)
    built = loaders.build(spec.data, loaders.Batches.of(spec), 0, 1, device)
    pair = {"train": built.train, "eval": built.evals["test"]}
    return {k: persistent(v) for k, v in pair.items()} if loader == "torchvision" else pair


def interleaved(pipelines: dict, rounds: int) -> dict:
    """{name: {kind: [images/s per round]}}, after one warm-up pass of each (worker start-up, caches)."""
    rates = {name: {kind: [] for kind in KINDS} for name in pipelines}
    for round_ in range(rounds + 1):
        for kind in KINDS:
            for name, built in pipelines.items():
                rate = one_pass(built[kind])
                if round_:
                    rates[name][kind].append(rate)
    return rates


def measure(root: Path, loader: str, threads: int, batch: int, passes: int, device: torch.device) -> dict:
    """Median images/s of one loader alone over `passes` passes: {"train": ..., "eval": ...}."""
    rates = interleaved({loader: build(root, loader, threads, batch, device)}, passes)[loader]
    return {kind: statistics.median(r) for kind, r in rates.items()}


def summary(rates: dict) -> dict:
    """Medians per loader, and each DALI column's ratio over torchvision: median and range of the rounds'."""
    out = {"images_per_s": {name: {k: statistics.median(r[k]) for k in KINDS} for name, r in rates.items()}}
    for name in rates:
        if name != "torchvision":
            ratios = {k: [a / b for a, b in zip(rates[name][k], rates["torchvision"][k])] for k in KINDS}
            out[f"{name}_over_torchvision"] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                               for k, v in ratios.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="a JPEG class-folder set (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="also DALI with mixed (nvJPEG) decoding on cuda:0")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "imagenet_loader.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or write_imagenet_like(Path(tmp), args.images)
        n = len(folders.scan(root, "train").files)
        cpu = torch.device("cpu")
        pipelines = {"torchvision": build(root, "torchvision", args.threads, args.batch, cpu),
                     "dali_cpu": build(root, "dali", args.threads, args.batch, cpu)}
        if args.gpu:
            pipelines["dali_mixed"] = build(root, "dali", args.threads, args.batch, torch.device("cuda", 0))
        rates = interleaved(pipelines, args.rounds)

    result = {"images": n, "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
              **summary(rates), "rounds_images_per_s": rates}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for kind in KINDS:
        line = ", ".join(f"{name} {r[kind]:.0f}" for name, r in result["images_per_s"].items())
        ratios = ", ".join(f"{k.split('_over')[0]} {v[kind]['median']:.2f}x ({v[kind]['min']:.2f}-{v[kind]['max']:.2f})"
                           for k, v in result.items() if k.endswith("_over_torchvision"))
        print(f"{kind} pipeline, {n} JPEGs, {args.threads} threads, batch {args.batch}, {args.rounds} rounds: "
              f"median images/s {line} -> {ratios}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
