"""CIFAR-10/100 from their python pickles, in torchvision's layout and through torchvision's dataset class.

The batches are pickles, and an ordinary unpickler runs whatever a pickle names: anyone who can write the
data folder would run code in every worker. They are read here by an unpickler that admits only what the
format holds — dicts, lists, strings, bytes, numbers and numpy arrays — and their shape is checked; a file
that names anything else is refused, naming the file. (torchvision's own loader unpickles them freely
after an MD5 check against the official archive, which also refuses the small synthetic files our tests
write in the same format.)
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torchvision
from torchvision.datasets import VisionDataset

from bitfleet.data.transforms import image_transform

STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CLASSES = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
# the globals a pickled numpy array names (numpy 1 and 2 module paths; pickle protocols 2 to 5; Python 3's
# protocol 2 writes bytes as `_codecs.encode(text, "latin1")`), nothing else
_ARRAY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{module}", name) for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))}


class _BatchUnpickler(pickle.Unpickler):
    """Builds plain data and numpy arrays only: a pickle that names any other global (a function to call, a
    class to build) is refused before anything of it runs."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR pickle does not hold")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    """One CIFAR pickle (a batch or the meta file) as a dict, or a ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            content = _BatchUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path}: not a CIFAR pickle, refused: {exc}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: not a CIFAR pickle, refused: it holds a {type(content).__name__}, not a dict")
    return content


def _batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """(images as N x 3072 uint8 rows, labels) of one batch, its layout checked."""
    entry = read_pickle(path)
    data, labels = entry.get("data"), entry.get(label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise ValueError(f"{path}: not a CIFAR batch: expected `data`, uint8 images of 3x32x32 in rows")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(type(label) is int and 0 <= label < num_classes for label in labels)):
        raise ValueError(f"{path}: not a CIFAR batch: expected `{label_key}`, one class index below "
                         f"{num_classes} per image")
    return data, labels


def _reading_pickles(cls, label_key: str) -> type:
    """torchvision's CIFAR class (its items, transforms, `classes`) with its files read by `read_pickle`."""

    def __init__(self, root: str, train: bool, transform=None):
        VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        folder = Path(root) / cls.base_folder
        meta = folder / cls.meta["filename"]
        classes = read_pickle(meta).get(cls.meta["key"])
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{meta}: not CIFAR's meta file: expected `{cls.meta['key']}`, a list of class names")
        batches = [_batch(folder / name, label_key, len(classes))
                   for name, _ in (cls.train_list if train else cls.test_list)]
        self.data = np.vstack([data for data, _ in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [label for _, labels in batches for label in labels]
        self.classes, self.class_to_idx = classes, {name: i for i, name in enumerate(classes)}

    return type(cls.__name__, (cls,), {"__init__": __init__})


_LOADERS = {"cifar10": _reading_pickles(torchvision.datasets.CIFAR10, "labels"),
            "cifar100": _reading_pickles(torchvision.datasets.CIFAR100, "fine_labels")}


def _files_present(cls, root: Path) -> bool:
    folder = root / cls.base_folder
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return all((folder / n).is_file() for n in names)


def load(spec, *, augment: bool):
    name, root = spec.dataset, spec.root
    mean, std = STATS[name]
    train_tf = image_transform(32, mean, std, augment=augment, pad=4, flip=True)
    test_tf = image_transform(32, mean, std, augment=False, pad=0, flip=False)
    cls = _LOADERS[name]
    return cls(str(root), train=True, transform=train_tf), cls(str(root), train=False, transform=test_tf)


def missing(spec) -> str | None:
    name, root = spec.dataset, Path(spec.root)
    cls = _CLASSES[name]
    if _files_present(cls, root):
        return None
    return (
        f"data.root: {name} pickles not found under {root / cls.base_folder}; "
        f"get them with `bitfleet data download {name} --root {root}`"
    )


def download(name: str, root: Path) -> None:
    _CLASSES[name](str(root), train=True, download=True)
