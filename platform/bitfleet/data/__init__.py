"""Datasets and loaders: MNIST, CIFAR-10/100, the embedded MNIST sample, sharded by world rank.

`build_datasets` is the one entry point the engine uses; `check_available` runs on the driver at
validation time so a missing data set is reported before any Ray work starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from bitfleet.data import cifar, mnist


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its input."""

    num_classes: int
    in_channels: int
    image_size: int


@dataclass(frozen=True)
class Datasets:
    train: Dataset
    test: Dataset
    info: DataInfo


# name -> (module that loads it, DataInfo)
_DATASETS = {
    "mnist_sample": (mnist, DataInfo(10, 1, 28)),
    "mnist": (mnist, DataInfo(10, 1, 28)),
    "cifar10": (cifar, DataInfo(10, 3, 32)),
    "cifar100": (cifar, DataInfo(100, 3, 32)),
}


def info(name: str) -> DataInfo:
    return _DATASETS[name][1]


def build_datasets(spec) -> Datasets:
    """Train and test datasets of a `DataSpec`, with the training augmentation when `augment`."""
    module, data_info = _DATASETS[spec.dataset]
    root = Path(spec.root).expanduser() if spec.root else None
    train, test = module.load(spec.dataset, root, augment=spec.augment)
    return Datasets(train, test, data_info)


def check_available(spec) -> str | None:
    """None when the data set is on disk, else a message saying how to get it."""
    module, _ = _DATASETS[spec.dataset]
    root = Path(spec.root).expanduser() if spec.root else None
    return module.missing(spec.dataset, root)


def download(name: str, root: str | Path) -> None:
    """Fetch a data set with torchvision's downloaders (needs internet)."""
    _DATASETS[name][0].download(name, Path(root).expanduser())
