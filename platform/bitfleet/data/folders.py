"""JPEG class folders (ImageNet, TinyImageNet, any `image_folder`): listing, labels, torchvision loading.

Layout: `<root>/train/<class>/**/*.JPEG` and `<root>/val/<class>/**/*.JPEG` (`bitfleet data prepare`
puts the official validation sets in this shape). Classes are the sorted folder names of `train/`, the
same mapping torchvision's ImageFolder uses; both loaders (DALI and torchvision) read the one list made
here, so labels are identical between them by construction. `val/` is evaluated as the `test` split:
it is what the papers report. Files that `bitfleet data check` found unreadable are left out.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from bitfleet.data.transforms import normalise

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, used for every folder data set
EXTENSIONS = (".jpeg", ".jpg", ".png")
CHECK_FILE = "bitfleet-check.json"  # written by `bitfleet data check`: counts and unreadable files
SPLITS = {"train": "train", "test": "val"}  # our split -> folder under the root
NUM_CLASSES = {"imagenet": 1000, "tinyimagenet": 200}


@dataclass(frozen=True)
class ImageList:
    """The files of one split with their integer labels, in a fixed (sorted) order."""

    files: list[str]
    labels: np.ndarray
    classes: list[str]

    def subset(self, indices) -> ImageList:
        return ImageList([self.files[i] for i in indices], self.labels[indices], self.classes)


def class_names(root: Path) -> list[str]:
    train = root / SPLITS["train"]
    return sorted(entry.name for entry in os.scandir(train) if entry.is_dir())


def scan(root: Path, split: str) -> ImageList:
    """Every image of `split` ("train" or "test") under its class folder, less the unreadable ones."""
    classes = class_names(root)
    index = {name: i for i, name in enumerate(classes)}
    folder = root / SPLITS[split]
    excluded = unreadable(root)
    files, labels = [], []
    for name in sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()):
        if name not in index:
            raise ValueError(f"data.root: {folder / name} is a class that {root / SPLITS['train']} does not have")
        for path in image_files(folder / name):
            if os.path.relpath(path, root) not in excluded:
                files.append(path)
                labels.append(index[name])
    return ImageList(files, np.asarray(labels, dtype=np.int64), classes)


def image_files(folder: Path) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(folder):
        found += [os.path.join(dirpath, n) for n in names if n.lower().endswith(EXTENSIONS)]
    return sorted(found)


def unreadable(root: Path) -> set[str]:
    """Paths (relative to the root) that the last `bitfleet data check` could not decode."""
    path = root / CHECK_FILE
    return set(json.loads(path.read_text())["unreadable"]) if path.is_file() else set()


def missing(spec) -> str | None:
    """None when the folders are laid out as expected, else what is wrong and how to fix it."""
    root = Path(spec.root)
    for _split, folder in SPLITS.items():
        if not (root / folder).is_dir():
            hint = (f"; `bitfleet data prepare {spec.dataset} {root}` lays it out"
                    if spec.dataset != "image_folder" else "")
            return f"data.root: {root / folder} not found (expected {root}/{folder}/<class>/*.JPEG){hint}"
    classes = class_names(root)
    if not classes:
        return f"data.root: no class folders in {root / SPLITS['train']}"
    expected = NUM_CLASSES.get(spec.dataset)
    if expected and len(classes) != expected:
        return f"data.root: {spec.dataset} has {expected} classes; {root / SPLITS['train']} holds {len(classes)}"
    flat = [p for p in (root / SPLITS["test"]).iterdir() if p.is_file() and p.name.lower().endswith(EXTENSIONS)]
    if flat:
        return (f"data.root: {root / SPLITS['test']} holds images outside class folders ({flat[0].name}, ...); "
                f"`bitfleet data prepare {spec.dataset} {root}` sorts them into classes")
    return None


# --------------------------------------------------------------------------- torchvision path


def transforms(spec, *, train: bool) -> v2.Compose:
    """The same steps as the DALI pipelines: random-resized crop + flip, or resize + centre crop."""
    if train and spec.augment:
        steps = [v2.RandomResizedCrop(spec.crop, scale=spec.crop_area, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(spec.eval_resize, antialias=True), v2.CenterCrop(spec.crop)]
    return v2.Compose([v2.ToImage(), *steps, *normalise(MEAN, STD).transforms])


class FolderImages(torch.utils.data.Dataset):
    """An `ImageList` read with PIL; a file that cannot be decoded is named in the error."""

    def __init__(self, images: ImageList, transform):
        self.images, self.transform = images, transform
        self.targets = images.labels

    def __len__(self) -> int:
        return len(self.images.files)

    def __getitem__(self, i):
        path = self.images.files[i]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot decode {path}: {exc}; `bitfleet data check` lists such files "
                             f"so that runs leave them out") from None
        return self.transform(rgb), int(self.images.labels[i])


def load(spec, *, augment: bool):
    root = Path(spec.root)
    train_tf = transforms(spec.model_copy(update={"augment": augment}), train=True)
    return (FolderImages(scan(root, "train"), train_tf),
            FolderImages(scan(root, "test"), transforms(spec, train=False)))
