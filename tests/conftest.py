"""Shared fixtures: a small synthetic data set and a tiny run spec written in tmp folders."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bitfleet.data import synthetic


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """Synthetic MNIST in the real IDX layout (torchvision's MNIST/raw)."""
    root = tmp_path_factory.mktemp("mnist")
    synthetic.write("mnist", root, n_train=1024, n_test=256, seed=0)
    return root


def write_spec(folder: Path, name: str, data_root: Path, storage: Path, **train) -> Path:
    """A small resnet_cifar run on synthetic MNIST with 2 workers; `train` entries override the defaults."""
    spec = {
        "name": name,
        "workload": "resnet_cifar",
        "model": {"arch": "resnet20", "shortcut": "A"},
        "data": {"dataset": "mnist", "root": str(data_root)},
        "train": {
            "epochs": 3, "batch_size": 64, "eval_batch_size": 256,
            "optimizer": {"type": "sgd", "lr": 0.05},
            "lr_schedule": {"type": "cosine", "warmup_epochs": 0.5},
            **train,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "failure": {"max_failures": 3, "checkpoint_every": 1, "keep": 2},
        "storage_path": str(storage),
        "seed": 7,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
