"""What ASHA saves: the same grid of configurations swept twice in one run — every configuration trained to
the last epoch (FIFO), then under ASHA — counting the compute each spends in trial-epochs, and whether
both pick the same best configuration. Each trial is a full bitfleet run (rbnn resnet20_1w1a on the
embedded MNIST sample, the shipped `cifar10_resnet20_tsweep.yaml` shrunk by overrides).

    python bench/asha_budget.py [--epochs 4] [--steps 8] [--out bench/results/asha_budget.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray
import yaml

from bitfleet.resolve import apply_override, validate_spec
from bitfleet.scheduler import sweep

SPEC = Path(__file__).parent.parent / "workloads/rbnn/specs/cifar10_resnet20_tsweep.yaml"
GRID = {"rbnn.tmin": [1.0e-3, 1.0e-1], "train.optimizer.lr": [0.02, 0.2]}


def run_sweep(scheduler: str, storage: Path, epochs: int, steps: int) -> dict:
    raw = yaml.safe_load(SPEC.read_text())
    for item in [f"storage_path={storage}", f"name=bench-{scheduler}", "data.dataset=mnist_sample",
                 "data.loader_workers=0", "scaling.cpus_per_worker=1", "train.batch_size=64", f"train.epochs={epochs}",
                 f"train.max_steps_per_epoch={steps}", "train.max_eval_steps=4", "failure.max_failures=2"]:
        apply_override(raw, item)
    raw["sweep"].update(  # the space's keys are dotted paths: set as a whole, not through -o overrides
        num_samples=1, search={"type": "grid"}, space={path: {"grid": values} for path, values in GRID.items()},
        scheduler=({"type": "fifo"} if scheduler == "fifo"
                   else {"type": "asha", "grace_period": 1, "reduction_factor": 2}))
    spec = validate_spec(raw)
    summary = sweep.run_sweep(spec)
    rows = json.loads((storage / spec.name / "trials.json").read_text())
    return {"trial_epochs": sum(r["epochs"] for r in rows), "best_config": summary["best_config"],
            "best_test_acc": summary["test/acc"],
            "trials": [{k: r[k] for k in ("trial", "state", "epochs", "test/acc")} for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="training steps per epoch")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "asha_budget.json")
    args = parser.parse_args()
    ray.init()
    with tempfile.TemporaryDirectory() as tmp:
        fifo = run_sweep("fifo", Path(tmp), args.epochs, args.steps)
        asha = run_sweep("asha", Path(tmp), args.epochs, args.steps)
    result = {"grid": GRID, "epochs": args.epochs, "fifo": fifo, "asha": asha,
              "compute_ratio": fifo["trial_epochs"] / asha["trial_epochs"],
              "same_best": fifo["best_config"] == asha["best_config"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{len(fifo['trials'])} configurations x {args.epochs} epochs: every one to the end {fifo['trial_epochs']} "
          f"trial-epochs, ASHA {asha['trial_epochs']} -> {result['compute_ratio']:.2f}x less compute; "
          f"same best configuration: {result['same_best']} (FIFO {fifo['best_config']}, ASHA {asha['best_config']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
