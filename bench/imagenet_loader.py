"""ImageNet input pipeline speed, measured side by side in one run on the same JPEG folder, the same
transforms and the same number of CPU threads:

    DALI (`fn.readers.file` + decode + random-resized crop + flip + normalise, `num_threads=N`)
    against torchvision (ImageFolder-style PIL decode + the same transforms, DataLoader `num_workers=N`)

for the training transform (random-resized crop 224, flip) and the eval transform (resize 256, centre
crop 224), in images/s over full passes after a warm-up pass, printed as a ratio and written as JSON.
On a machine with a GPU, `--gpu` adds DALI's `mixed` decoding (nvJPEG) as a third column.
Without `--root`, a synthetic folder of ImageNet-sized JPEGs (~500x375, quality 90) is written first.

    python bench/imagenet_loader.py [--root DIR] [--images 512] [--threads 2] [--batch 64] [--passes 2] [--gpu]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bitfleet.data import folders, loaders
from bitfleet.resolve import validate_spec


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


def images_per_second(batches, passes: int, device: torch.device) -> float:
    """Images/s over `passes` full passes, after one warm-up pass (worker start-up, caches)."""
    seen, elapsed = 0, 0.0
    for pass_ in range(passes + 1):
        start = time.perf_counter()
        count = 0
        for images, _ in batches():
            count += len(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if pass_:
            seen, elapsed = seen + count, elapsed + time.perf_counter() - start
    return seen / elapsed


def spec_for(root: Path, loader: str, threads: int, batch: int):
    return validate_spec({
        "name": "bench", "workload": "resnet_cifar", "data": {"dataset": "image_folder", "root": str(root),
        "loader": loader, "loader_workers": threads, "crop_size": 224, "resize_size": 256},
        "train": {"batch_size": batch, "eval_batch_size": batch}, "scaling": {"num_workers": 1},
    })


def measure(root: Path, loader: str, threads: int, batch: int, passes: int, device: torch.device) -> dict:
    spec = spec_for(root, loader, threads, batch)
    built = loaders.build(spec.data, loaders.Batches.of(spec), 0, 1, device)
    return {
        "train": images_per_second(lambda: iter(built.train), passes, device),
        "eval": images_per_second(lambda: iter(built.evals["test"]), passes, device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="a JPEG class-folder set (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="also DALI with mixed (nvJPEG) decoding on cuda:0")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "imagenet_loader.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or write_imagenet_like(Path(tmp), args.images)
        n = len(folders.scan(root, "train").files)
        cpu = torch.device("cpu")
        rates = {"torchvision": measure(root, "torchvision", args.threads, args.batch, args.passes, cpu),
                 "dali_cpu": measure(root, "dali", args.threads, args.batch, args.passes, cpu)}
        if args.gpu:
            rates["dali_mixed"] = measure(root, "dali", args.threads, args.batch, args.passes, torch.device("cuda", 0))

    result = {"images": n, "threads": args.threads, "batch": args.batch, "passes": args.passes,
              "images_per_s": rates,
              "dali_cpu_over_torchvision": {k: rates["dali_cpu"][k] / rates["torchvision"][k]
                                            for k in ("train", "eval")}}
    if args.gpu:
        result["dali_mixed_over_torchvision"] = {k: rates["dali_mixed"][k] / rates["torchvision"][k]
                                                 for k in ("train", "eval")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for kind in ("train", "eval"):
        line = ", ".join(f"{name} {r[kind]:.0f}" for name, r in rates.items())
        ratios = ", ".join(f"{k.split('_over')[0]} {v[kind]:.2f}x" for k, v in result.items()
                           if k.endswith("_over_torchvision"))
        print(f"{kind} pipeline, {n} JPEGs, {args.threads} threads, batch {args.batch}: images/s {line} -> {ratios}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
