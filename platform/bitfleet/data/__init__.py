"""Datasets: MNIST, CIFAR-10/100, the embedded MNIST sample, JPEG class folders (ImageNet, TinyImageNet).

`build_datasets` gives torch datasets (the torchvision path); `loaders.build` turns a spec into this
rank's train and eval loaders, torchvision or DALI. `check_available` runs on the driver at validation
time so a missing data set or loader is reported before any Ray work starts.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from bitfleet.data import cifar, folders, mnist
from bitfleet.data.transforms import without_normalise
from bitfleet.errors import SpecError


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


_MODULES = {"mnist_sample": mnist, "mnist": mnist, "cifar10": cifar, "cifar100": cifar,
            "imagenet": folders, "tinyimagenet": folders, "image_folder": folders}
_FIXED = {
    "mnist_sample": DataInfo(10, 1, 28, mnist.MEAN, mnist.STD),
    "mnist": DataInfo(10, 1, 28, mnist.MEAN, mnist.STD),
    "cifar10": DataInfo(10, 3, 32, *cifar.STATS["cifar10"]),
    "cifar100": DataInfo(100, 3, 32, *cifar.STATS["cifar100"]),
}


def info(spec) -> DataInfo:
    """What the model sees from a `DataSpec`: folder data sets take their crop and class count from it."""
    if spec.dataset in _FIXED:
        return _FIXED[spec.dataset]
    classes = folders.NUM_CLASSES.get(spec.dataset) or len(folders.class_names(Path(spec.root)))
    return DataInfo(classes, 3, spec.crop, folders.MEAN, folders.STD)


def build_datasets(spec) -> Datasets:
    """Train and test datasets of a `DataSpec`, with the training augmentation when `augment`."""
    module = _MODULES[spec.dataset]
    train, test = module.load(spec, augment=spec.augment)
    if not spec.val_size:
        return Datasets(train, test, info(spec))
    plain, _ = module.load(spec, augment=False)  # validation images are not augmented
    train_idx, val_idx = split_indices(plain.targets, spec.val_size, spec.split_seed, spec.stratified)
    return Datasets(Subset(train, train_idx), test, info(spec), val=Subset(plain, val_idx))


NO_VAL = "--split: 'val' needs images held out of the training set (data.val_size > 0)"


def eval_split(spec, split: str) -> Dataset:
    """One split as evaluation reads it: val and test as a run's evaluation reads them, the training split
    through the same evaluation transforms (no augmentation). A SpecError for val when none is held out."""
    sets = build_datasets(spec.model_copy(update={"augment": False}))
    dataset = {"train": sets.train, "val": sets.val, "test": sets.test}[split]
    if dataset is None:
        raise SpecError(NO_VAL)
    return dataset


def raw_split(spec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, C, H, W), labels) of a split as evaluation sees it before normalising: resized and
    cropped for folder data sets. What an exported engine takes (it normalises by its own table)."""
    dataset = eval_split(spec, split)
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    base.transform = without_normalise(base.transform)
    images, labels = zip(*DataLoader(dataset, batch_size=512))
    return torch.cat(images), torch.cat(labels)


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
    """None when the data set (and its loader) is there, else a message saying how to get it."""
    if spec.loader == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        return ("data.loader: dali needs NVIDIA DALI: `pip install bitfleet[dali]` (the CUDA 13 build, "
                "nvidia-dali-cuda130; for CUDA 12 install nvidia-dali-cuda120), or use `loader: torchvision`")
    return _MODULES[spec.dataset].missing(spec)


def download(name: str, root: str | Path) -> None:
    """Fetch a data set with torchvision's downloaders (needs internet)."""
    _MODULES[name].download(name, Path(root).expanduser())
