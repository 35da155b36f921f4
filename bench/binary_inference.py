"""Bit-packed inference against torch, side by side in one run (interleaved rounds, medians):

- lbpnet: each preset's network (random weights, random gates and BN statistics) on all 1,000 embedded
  test digits: the integer engine against the model's hard path at batch 1,000, as the model runs it (its
  compiled CPU loops, `trainkernels`) and through torch's operators alone (`engine_vs_torch_ops`);
- rbnn: each binarized network on a synthetic CIFAR-10 test set written in the real format (and for
  resnet20, on the embedded digits too): the XNOR-popcount engine against torch float inference of the
  same network at batch 64.

One line per model: `MODEL engine_vs_torch=R equal=true|false latency_b1_ms=... size_bytes=...` (size: the
paper's count for lbpnet — comparisons and fusion as the engine packs them; the engine's arrays for rbnn:
packed sign bits, scales, thresholds, the float first and last layers); `equal`: the engine's predictions
equal torch's on every image. JSON with the spread of every timing: bench/results/binary_inference.json.

    python bench/binary_inference.py [--threads 2] [--rounds 5] [--models NAME ...] [--run LBPNET_RUN_DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch
import yaml
from binary_conv_kernels import cpu

from bitfleet import export, registry
from bitfleet.data import info, mnist, raw_split, synthetic
from bitfleet.data.transforms import normalise
from bitfleet.spec import DataSpec
from workloads.lbpnet import intexport, trainkernels
from workloads.lbpnet.config import ModelConfig
from workloads.lbpnet.models import LBPNet
from workloads.rbnn import models as rbnn_models

SPECS = Path(__file__).resolve().parents[1] / "workloads" / "lbpnet" / "specs"
LBPNET = {  # name: (spec file, model overrides)
    "lbpnet_quickstart_macfree_rp": ("quickstart.yaml", {}),
    "lbpnet_macfree_1x1": ("quickstart.yaml", {"blocks": {"fusion_type": "conv1x1"}}),
    "lbpnet_paper_mnist_rp": ("paper_mnist_rp.yaml", {}),
    "lbpnet_paper_mnist_rp_full60k_k8": ("paper_mnist_rp_full60k.yaml", {"rp_config": {"n_bits_per_out": 8}}),
    "lbpnet_paper_mnist_1x1": ("paper_mnist_1x1.yaml", {}),
}
RBNN = ["resnet20_1w1a", "resnet20_bireal_1w1a", "vgg_small_1w1a", "resnet18_1w1a"]
PAPER_SIZES = {  # LBPNet Table 3 (MNIST); the RBNN paper reports no model sizes
    "lbpnet_quickstart_macfree_rp": "715.5 B (RP)", "lbpnet_paper_mnist_rp": "715.5 B (RP)",
    "lbpnet_paper_mnist_rp_full60k_k8": "715.5 B (RP)", "lbpnet_macfree_1x1": "1.27 MB (1x1)",
    "lbpnet_paper_mnist_1x1": "1.27 MB (1x1)",
}


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Untrained but not trivial: random gates, BN statistics and affines, some negative scales."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gate_logits"):
                m.gate_logits.normal_()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.5)
                m.bias.normal_(0, 0.5)
    return model.eval()


def lbpnet_model(name: str, run: str | None):
    if run:
        _, _, model = export.load_model(run)
        return model
    spec_file, overrides = LBPNET[name]
    raw = yaml.safe_load((SPECS / spec_file).read_text())["model"]
    for section, values in overrides.items():
        raw[section].update(values)
    torch.manual_seed(0)
    return randomised(LBPNet(ModelConfig.model_validate(raw), 1, 10, 28))


def timed(candidates: dict, rounds: int) -> dict:
    """Median, min and max seconds of each candidate, called in turn once per round after one warm-up."""
    for run in candidates.values():
        run()
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": float(np.median(t)), "min_s": min(t), "max_s": max(t)} for name, t in times.items()}


def compare(workload: str, model, data: DataSpec, images: np.ndarray, batch: int, rounds: int) -> dict:
    """Engine against torch on `images` (uint8): predictions, speed at `batch` and at 1, sizes."""
    data_info = info(data)
    with tempfile.TemporaryDirectory() as tmp:
        written = export.write_engine(registry.get(workload), model, None, data, Path(tmp) / "engine.npz")
        engine, _ = export.load_engine(Path(tmp) / "engine.npz")
        arrays = dict(np.load(Path(tmp) / "engine.npz"))
    normalised = normalise(data_info.mean, data_info.std)
    with torch.no_grad():
        expected = np.concatenate([model(normalised(torch.from_numpy(images[i: i + batch]))).argmax(1).numpy()
                                   for i in range(0, len(images), batch)])
    got = np.concatenate([engine.logits(images[i: i + batch]).argmax(1) for i in range(0, len(images), batch)])
    x_batch, x_one = images[:batch], images[:1]
    t_batch, t_one = normalised(torch.from_numpy(x_batch)), normalised(torch.from_numpy(x_one))
    candidates = {"torch": lambda: model(t_batch), "engine": lambda: engine.logits(x_batch),
                  "torch_b1": lambda: model(t_one), "engine_b1": lambda: engine.logits(x_one)}
    if workload == "lbpnet":  # the model's hard path through torch's operators alone, as before its kernels
        candidates["torch_ops"] = lambda: _on_torch_operators(model, t_batch)
    with torch.no_grad():
        times = timed(candidates, rounds)
    exact = [bool(v) for k, v in arrays.items() if k.endswith(".exact")]
    return {"equal": bool(np.array_equal(got, expected)), "images": len(images), "batch": batch,
            "engine_vs_torch": times["torch"]["median_s"] / times["engine"]["median_s"],
            **({"engine_vs_torch_ops": times["torch_ops"]["median_s"] / times["engine"]["median_s"]}
               if "torch_ops" in times else {}),
            "latency_b1_ms": 1e3 * times["engine_b1"]["median_s"],
            "torch_latency_b1_ms": 1e3 * times["torch_b1"]["median_s"],
            "times": times, "file_bytes": written["bytes"], "weights_bytes": written["weights_bytes"],
            "exact_checks_passed": f"{sum(exact)}/{len(exact)}", "arrays": arrays}


def _on_torch_operators(model, images):
    with trainkernels.torch_operators():
        return model(images)


def lbpnet_row(name: str, rounds: int, run: str | None) -> dict:
    _, (codes, _) = mnist.embedded_sample()
    row = compare("lbpnet", lbpnet_model(name, run), DataSpec(dataset="mnist_sample"), codes.numpy(), 1000, rounds)
    row["size_bytes"] = intexport.packed_size_bits(row.pop("arrays")) / 8
    return row


def rbnn_row(name: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write("cifar10", tmp, n_train=10, n_test=512)
        cifar = DataSpec(dataset="cifar10", root=tmp)
        images = raw_split(cifar, "test")[0].numpy()
    torch.manual_seed(0)
    row = compare("rbnn", randomised(rbnn_models.build(name, 10, 3, 32)), cifar, images, 64, rounds)
    del row["arrays"]
    row["size_bytes"] = row["weights_bytes"]
    if name == "resnet20_1w1a":  # the embedded digits too: a 1-channel 28x28 network
        _, (digits, _) = mnist.embedded_sample()
        torch.manual_seed(0)
        digits_model = randomised(rbnn_models.build(name, 10, 1, 28))
        check = compare("rbnn", digits_model, DataSpec(dataset="mnist_sample"), digits.numpy(), 250, 1)
        row["equal_on_embedded_digits"] = check["equal"]
        row["equal"] = row["equal"] and check["equal"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=[*LBPNET, *RBNN])
    parser.add_argument("--run", help="an lbpnet run folder: its trained network instead of the presets'")
    parser.add_argument("--out", default="bench/results/binary_inference.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    rows = {}
    for name in args.models:  # a line as each model finishes
        row = lbpnet_row(name, args.rounds, args.run) if name in LBPNET else rbnn_row(name, args.rounds)
        rows[name] = {**row, "paper_size": PAPER_SIZES.get(name, "not reported")}
        ops = f" engine_vs_torch_ops={row['engine_vs_torch_ops']:.1f}" if "engine_vs_torch_ops" in row else ""
        print(f"{name} engine_vs_torch={row['engine_vs_torch']:.1f}{ops} equal={str(row['equal']).lower()} "
              f"latency_b1_ms={row['latency_b1_ms']:.2f} size_bytes={row['size_bytes']:.0f}", flush=True)
    result = {"cpu": cpu(), "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
              "numpy": np.__version__, "numba": numba.__version__, "models": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"cpu: {result['cpu']['model']}, avx512_vpopcntdq: {result['cpu']['avx512_vpopcntdq']}; wrote {out}")


if __name__ == "__main__":
    main()
