"""Reference loss curves: a tiny deterministic CPU run of each workload's quickstart model, in one process.

Each curve is the per-step training loss of a few dozen steps (Ray Train's local mode: one process, no
cluster), written to `tests/assets/losses/<workload>.txt` as `repr` floats, one a line. The test in
`tests/unit/test_reference_losses.py` reruns them and compares bit for bit: a refactor that changes a
loss fails it.

Bit for bit on any x86-64 machine, not only the one that wrote them: each curve is computed in a child
process whose numerics are pinned to code paths that do not depend on the CPU. Left alone, torch and MKL
pick kernels by the CPU they find (AVX-512 or AVX2 vector widths, blockings sized to its caches), and the
sums come out in a different order on another CPU: the curves then differ in the last bits, and a binary
network's signs turn that into other losses. Pinned: torch's own kernels at their portable (non-vectorised
by hand) width, one thread, oneDNN and NNPACK off (convolutions take torch's im2col and MKL's GEMM), and MKL
in its `COMPATIBLE` conditional-numerical-reproducibility mode, the one that gives the same results on Intel
and AMD processors (its AVX2 mode did not: curves written on one machine differed on another under it).

Regenerate (after a change that is meant to alter the numbers, and say so in the commit):

    python -m tests.reference_losses --write
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets" / "losses"
SPECS = Path(__file__).parents[1] / "workloads"
TINY = ["train.epochs=3", "train.max_steps_per_epoch=8", "train.batch_size=32", "train.max_eval_steps=2",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", "data.loader_workers=0"]
RUNS = {  # workload -> (spec, its extra overrides): every schedule of the quickstart acts inside 3 epochs
    "resnet_cifar": ("resnet_cifar/specs/quickstart.yaml", []),
    "rbnn": ("rbnn/specs/quickstart.yaml", ["rbnn.bn_recalibration_batches=2"]),
    "lbpnet": ("lbpnet/specs/quickstart.yaml", ["lbpnet.hard_finetune.start_epoch=2",
                                               "lbpnet.hard_finetune.bn_recal_batches=2"]),
    "tap_ppo": ("tap_ppo/specs/lenet5.yaml", ["stages=[]", "tap_ppo.stage=float", "data.val_size=32",
                                              "data.augment=true"]),
}


PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1"}


def losses(workload: str) -> list[float]:
    """The per-step training losses of `workload`'s tiny run, computed in a child with pinned numerics."""
    child = subprocess.run([sys.executable, "-m", "tests.reference_losses", "--child", workload],
                           env={**os.environ, **PINNED_NUMERICS}, cwd=Path(__file__).parents[1],
                           capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"the reference run of {workload} failed:\n{child.stdout}\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def _losses_here(workload: str) -> list[float]:
    """The per-step training losses of `workload`'s tiny run, in this process (the child of `losses`)."""
    torch.backends.mkldnn.enabled = False  # its kernels' blockings follow the CPU's caches
    torch.backends.nnpack.set_flags(False)  # likewise
    torch.set_num_threads(1)
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from bitfleet.data import synthetic
    from bitfleet.engine import loop
    from bitfleet.resolve import load_spec

    spec_file, extra = RUNS[workload]
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*TINY, *extra, f"storage_path={tmp}/runs"]
        if workload == "tap_ppo":
            synthetic.write("cifar10", Path(tmp) / "cifar10", n_train=256, n_test=64, seed=0)
            overrides.append(f"data.root={tmp}/cifar10")
        spec = load_spec(SPECS / spec_file, overrides)
        recorded: list[float] = []

        def train_fn():
            trainer = loop.Trainer(spec)
            step = trainer.train_step

            def recording(images, labels):
                loss, logits = step(images, labels)
                recorded.append(loss.item())
                return loss, logits

            trainer.train_step = recording
            trainer.fit()

        # num_workers=0: Ray Train's local mode runs the loop here, rank 0 of 1, without a cluster
        TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=0)).fit()
    return recorded


def path(workload: str) -> Path:
    return ASSETS / f"{workload}.txt"


def read(workload: str) -> list[float]:
    return [float(line) for line in path(workload).read_text().split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the curves instead of comparing them")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("workloads", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_losses_here(args.workloads[0])))
        return
    for workload in args.workloads:
        curve = losses(workload)
        if args.write:
            ASSETS.mkdir(parents=True, exist_ok=True)
            path(workload).write_text("".join(f"{value!r}\n" for value in curve))
        same = path(workload).is_file() and read(workload) == curve
        print(f"{workload}: {len(curve)} steps, first {curve[0]:.6f}, last {curve[-1]:.6f}, "
              f"{'written' if args.write else 'equal' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
