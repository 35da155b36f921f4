"""Datasets and loaders: MNIST, CIFAR-10/100, the embedded MNIST sample, sharded by world rank.

`build_datasets` is the one entry point the engine uses; `check_available` runs on the driver at
validation time so a missing data set is reported before any Ray work starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from bitfleet.data import cifar, mnist


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its input."""

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] = ()  # the normalisation the loaders apply, per channel
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class Datasets:
    train: Dataset
    test: Dataset
    info: DataInfo
    val: Dataset | None = None  # held out of the training set when `val_size` > 0


# name -> (module that loads it, DataInfo)
_DATASETS = {
    "mnist_sample": (mnist, DataInfo(10, 1, 28, mnist.MEAN, mnist.STD)),
    "mnist": (mnist, DataInfo(10, 1, 28, mnist.MEAN, mnist.STD)),
    "cifar10": (cifar, DataInfo(10, 3, 32, *cifar.STATS["cifar10"])),
    "cifar100": (cifar, DataInfo(100, 3, 32, *cifar.STATS["cifar100"])),
}


def info(name: str) -> DataInfo:
    return _DATASETS[name][1]


def build_datasets(spec) -> Datasets:
    """Train and test datasets of a `DataSpec`, with the training augmentation when `augment`."""
    module, data_info = _DATASETS[spec.dataset]
    root = Path(spec.root).expanduser() if spec.root else None
    train, test = module.load(spec.dataset, root, augment=spec.augment)
    if not spec.val_size:
        return Datasets(train, test, data_info)
    plain, _ = module.load(spec.dataset, root, augment=False)  # validation images are not augmented
    train_idx, val_idx = split_indices(plain.targets, spec.val_size, spec.split_seed, spec.stratified)
    return Datasets(Subset(train, train_idx), test, data_info, val=Subset(plain, val_idx))


def split_indices(labels, val_size: int, seed: int, stratified: bool) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: `val_size` images held out, in proportion to each class when `stratified`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if not stratified:
        order = rng.permutation(len(labels))
        return np.sort(order[val_size:]), np.sort(order[:val_size])
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / len(labels) * val_size).astype(int)
    quota[np.argsort(-(counts / len(labels) * val_size - quota))[: val_size - quota.sum()]] += 1  # largest remainders
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)])
    return np.setdiff1d(np.arange(len(labels)), val), np.sort(val)


def check_available(spec) -> str | None:
    """None when the data set is on disk, else a message saying how to get it."""
    module, _ = _DATASETS[spec.dataset]
    root = Path(spec.root).expanduser() if spec.root else None
    return module.missing(spec.dataset, root)


def download(name: str, root: str | Path) -> None:
    """Fetch a data set with torchvision's downloaders (needs internet)."""
    _DATASETS[name][0].download(name, Path(root).expanduser())
