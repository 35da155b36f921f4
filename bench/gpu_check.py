"""GPU self-check: every CUDA path of bitfleet on this node, with figures, in about 8 minutes on one GPU.

    python bench/gpu_check.py [--quick] [--out bench/results/gpu_check.json]

On synthetic data in the real formats it runs, each on its own and recorded pass/fail:
- RBNN resnet18_1w1a and float ResNet-18 training steps at 224x224, bf16 and fp16 autocast (fp16 with
  torch.amp.GradScaler), images/s;
- DALI's mixed (nvJPEG) decoding against its CPU decoding of the same JPEG folder, images/s;
- RBNN's rotation update (batched SVD) on the GPU against the CPU, seconds;
- a 2-process NCCL DDP step on two GPUs; on a one-GPU node a 1-process one (NCCL refuses two ranks on one
  device: "Duplicate GPU detected", ncclInvalidUsage), and the row says so;
- a DeepSpeed ZeRO-2 step through bitfleet's strategy;
- `bitfleet run` of imagenet_resnet18_1w1a.yaml on a synthetic JPEG folder, through a real local Ray
  started for the check, with its worker SIGKILLed after the first checkpoint and restored from it.
It prints a table and writes JSON. Without CUDA it refuses in one line (exit 2).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import imagenet_loader  # noqa: E402  (bench/: the loader benchmark's JPEG writer and measurement)
import overhead  # noqa: E402  (bench/: its child `ray start` cluster and run helpers)

from bitfleet.engine import strategy  # noqa: E402
from bitfleet.spec import TrainSpec  # noqa: E402
from workloads.rbnn import models as rbnn_models  # noqa: E402
from workloads.rbnn.layers import binary_convs  # noqa: E402

IMAGENET_SPEC = Path(__file__).parents[1] / "workloads" / "rbnn" / "specs" / "imagenet_resnet18_1w1a.yaml"


def timed_steps(model, batch: int, dtype: torch.dtype, steps: int) -> float:
    """Training images/s of `model` at 224x224 under autocast(`dtype`), after warm-up steps."""
    device = torch.device("cuda")
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    for step in range(steps + 3):
        if step == 3:  # cuDNN autotuning and allocator warm-up are over
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def check_training(args) -> dict:
    import torchvision

    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        out[f"rbnn_resnet18_1w1a_{name}_img_s"] = timed_steps(
            rbnn_models.build("resnet18_1w1a", 1000, 3, 224), args.batch, dtype, args.steps)
        out[f"float_resnet18_{name}_img_s"] = timed_steps(torchvision.models.resnet18(), args.batch, dtype, args.steps)
    return out


def check_dali(args, tmp: Path) -> dict:
    root = imagenet_loader.write_imagenet_like(tmp / "jpeg", args.images)
    gpu = imagenet_loader.measure(root, "dali", 4, 64, 2, torch.device("cuda"))
    cpu = imagenet_loader.measure(root, "dali", 4, 64, 2, torch.device("cpu"))
    return {"dali_mixed_train_img_s": gpu["train"], "dali_cpu_train_img_s": cpu["train"],
            "mixed_vs_cpu": gpu["train"] / cpu["train"]}


def check_svd(args) -> dict:
    model = rbnn_models.build("resnet18_1w1a", 1000, 3, 224)
    out = {}
    for device in ("cpu", "cuda"):
        convs = binary_convs(model.to(device))
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for conv in convs:
            conv.update_rotation(3, device)
        if device == "cuda":
            torch.cuda.synchronize()
        out[f"rotation_update_{device}_s"] = time.perf_counter() - start
    out["cpu_vs_gpu"] = out["rotation_update_cpu_s"] / out["rotation_update_cuda_s"]
    return out


def _ddp_rank(rank: int, world: int, port: int, result: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    try:
        model = torch.nn.parallel.DistributedDataParallel(
            rbnn_models.build("resnet20_1w1a", 10, 3, 32).to(device), device_ids=[device.index])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        torch.cuda.synchronize()
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(weights) for _ in range(world)]
        dist.all_gather(gathered, weights)
        result[rank] = bool(all(torch.equal(gathered[0], w) for w in gathered))
    finally:
        dist.destroy_process_group()


def check_nccl(args) -> dict:
    import torch.multiprocessing as mp

    ranks = min(2, torch.cuda.device_count())  # NCCL allows one rank per device
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_ddp_rank, args=(ranks, 29511, result), nprocs=ranks, join=True)
    assert all(result.values()) and len(result) == ranks, f"ranks disagree after the step: {dict(result)}"
    note = "" if ranks == 2 else "one GPU: NCCL takes one rank per device, so one rank ran"
    return {"ranks": ranks, "weights_equal_after_step": True, **({"note": note} if note else {})}


def check_deepspeed(args) -> dict:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        train = TrainSpec(strategy="deepspeed", deepspeed={"zero_stage": 2}, amp=True, amp_dtype="bf16",
                          batch_size=64)
        model = rbnn_models.build("resnet20_1w1a", 10, 3, 32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        wrapped = strategy.build(train, model, optimizer, torch.device("cuda"), 64)
        x, y = torch.randn(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
        losses = []
        for _ in range(5):
            with wrapped.autocast():
                loss = torch.nn.functional.cross_entropy(wrapped.model(x).float(), y)
            wrapped.step(loss)
            losses.append(loss.item())
        assert losses[-1] < losses[0], f"ZeRO-2 did not learn the batch: {losses}"
        return {"zero_stage": 2, "first_loss": losses[0], "last_loss": losses[-1]}
    finally:
        dist.destroy_process_group()


def check_run_with_a_kill(args, tmp: Path) -> dict:
    import yaml

    root = imagenet_loader.write_imagenet_like(tmp / "folder", 256, classes=8)
    raw = yaml.safe_load(IMAGENET_SPEC.read_text())
    raw.update(name="gpu-check-imagenet", storage_path=str(tmp / "results"))
    raw["data"].update(dataset="image_folder", root=str(root), loader="dali", loader_workers=4)
    raw["train"].update(epochs=3, batch_size=32, eval_batch_size=32, max_steps_per_epoch=6, max_eval_steps=2)
    raw["scaling"] = {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 1}  # the check cluster has 2 CPUs
    raw["failure"] = {"max_failures": 2, "checkpoint_every": 1, "keep": 2}
    cluster, env = overhead.start_cluster(str(tmp / "ray"), overhead.REPORT_MS)
    run_dir, log = tmp / "results" / raw["name"], tmp / "run.log"
    try:
        driver = overhead.bitfleet_run(raw, tmp, log, env)
        overhead.wait_until(lambda: (run_dir / "checkpoint_manager_snapshot.json").is_file(), 600, "a checkpoint")
        victim = [int(p) for p in re.findall(r"pid=(\d+)\) world_rank=\d+", log.read_text())][-1]
        os.kill(victim, signal.SIGKILL)
        driver.wait(timeout=900)
        history = json.loads((run_dir / "metrics.json").read_text())
        assert driver.returncode == 0, log.read_text()[-3000:]
        assert [m["epoch"] for m in history] == [1, 2, 3] and history[-1]["restores"] >= 1, history
        return {"epochs": 3, "restores": history[-1]["restores"], "img_s": history[-1]["images_per_s"]}
    finally:
        overhead.stop_cluster(cluster)


CHECKS = {  # name -> (function, needs a scratch folder)
    "training_224": (check_training, False), "dali_mixed_vs_cpu": (check_dali, True),
    "svd_gpu_vs_cpu": (check_svd, False), "nccl_ddp_2_ranks": (check_nccl, False),
    "deepspeed_zero2": (check_deepspeed, False), "bitfleet_run_killed_and_resumed": (check_run_with_a_kill, True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and images (about 3 minutes)")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), help="run these checks only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU "
              "node, with a CUDA build of torch", file=sys.stderr)
        return 2
    args.batch, args.steps, args.images = (64, 10, 256) if args.quick else (128, 30, 1024)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bitfleet-gpu-check-") as tmp:
        for name in args.only or CHECKS:
            check, scratch = CHECKS[name]
            start = time.perf_counter()
            try:
                figures = check(args, Path(tmp) / name) if scratch else check(args)
                rows.append({"check": name, "ok": True, "seconds": time.perf_counter() - start, **figures})
            except Exception as exc:  # noqa: BLE001 - a failing path is a row of the report, not the end of it
                rows.append({"check": name, "ok": False, "seconds": time.perf_counter() - start,
                             "error": f"{type(exc).__name__}: {exc}"[:400], "trace": traceback.format_exc()[-2000:]})
    device = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "cuda": torch.version.cuda}
    for row in rows:
        figures = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()
                   if k not in ("check", "ok", "seconds", "trace")}
        print(f"{row['check']:32s} {'PASS' if row['ok'] else 'FAIL'}  {row['seconds']:6.1f} s  {figures}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "checks": rows}, indent=1))
    print(f"wrote {args.out} ({device['gpu']}, torch {device['torch']}, CUDA {device['cuda']})")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
