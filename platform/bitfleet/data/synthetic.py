"""Small synthetic data sets written in the exact on-disk formats of the real ones (for tests and demos).

Each class has its own random template and every image is its template plus noise, so a model can learn
them; the files are read by the same loaders as the real data sets (torchvision's MNIST and CIFAR, the
JPEG folder readers). JPEG data sets come in the layouts their archives unpack to: `image_folder`
(already in class folders), `imagenet` (flat validation folder and Kaggle's LOC_val_solution.csv) and
`tinyimagenet` (train/<wnid>/images/, val/images/ with val_annotations.txt).
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from bitfleet.data import cifar


def class_templates(shape: tuple[int, ...], num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """One random image per class, shared by the train and test splits."""
    return rng.integers(0, 256, size=(num_classes, *shape)).astype(np.float32)


def class_images(n: int, templates: np.ndarray, rng: np.random.Generator):
    """(uint8 images, int labels): class template + Gaussian noise, labels balanced."""
    num_classes, shape = len(templates), templates.shape[1:]
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = templates[labels] + rng.normal(0, 40, size=(n, *shape))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file (unsigned bytes): magic 0x0000_08_<ndim>, big-endian int32 dims, then the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int, n_test: int, rng) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    templates = class_templates((28, 28), 10, rng)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = class_images(n, templates, rng)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


def write_cifar(name: str, root: Path, n_train: int, n_test: int, rng) -> Path:
    cls = cifar._CLASSES[name]
    num_classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    train_files = [f for f, _ in cls.train_list]
    splits = [(f, n_train // len(train_files) + (i < n_train % len(train_files))) for i, f in enumerate(train_files)]
    templates = class_templates((3, 32, 32), num_classes, rng)
    for filename, n in splits + [(cls.test_list[0][0], n_test)]:
        images, labels = class_images(n, templates, rng)
        batch = {"batch_label": filename, label_key: labels.tolist(), "data": images.reshape(n, -1),
                 "filenames": [f"synthetic_{i}.png" for i in range(n)]}
        with open(folder / filename, "wb") as f:
            pickle.dump(batch, f)
    meta_key = cls.meta["key"]
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({meta_key: [f"class_{c}" for c in range(num_classes)]}, f)
    return folder


def write_jpeg_folders(layout: str, root: Path, n_train: int, n_test: int, rng, num_classes: int = 4) -> Path:
    """JPEGs of varied sizes and aspect ratios (64x64 for tinyimagenet) in the layout of `layout`'s archive."""
    wnids = [f"n{1440764 + 7 * c:08d}" for c in range(num_classes)]  # WordNet-style class ids
    templates = class_templates((4, 4, 3), num_classes, rng)  # a coarse colour pattern per class
    tiny = layout == "tinyimagenet"
    val_rows = []
    for split, n in (("train", n_train), ("val", n_test)):
        _, labels = class_images(n, templates, rng)
        for i, label in enumerate(labels):
            h, w = (64, 64) if tiny else rng.integers(48, 160, size=2)
            name, folder = f"{wnids[label]}_{i}.JPEG", root / split / wnids[label]
            if split == "train" and tiny:
                folder = folder / "images"
            elif split == "val" and layout != "image_folder":  # the official validation sets are flat
                name, folder = (f"val_{i}.JPEG" if tiny else f"ILSVRC2012_val_{i + 1:08d}.JPEG"), root / "val" / (
                    "images" if tiny else "")
                val_rows.append((name, wnids[label]))
            folder.mkdir(parents=True, exist_ok=True)
            _template_jpeg(templates[label], int(h), int(w), rng).save(folder / name, quality=90)
    if layout == "imagenet":
        lines = ["ImageId,PredictionString"] + [f"{Path(n).stem},{wnid} 10 10 40 40" for n, wnid in val_rows]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    elif tiny:
        rows = [f"{n}\t{wnid}\t0\t0\t63\t63" for n, wnid in val_rows]
        (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
        (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return root


def _template_jpeg(template: np.ndarray, h: int, w: int, rng) -> Image.Image:
    pattern = Image.fromarray(template.astype(np.uint8)).resize((w, h), Image.BILINEAR)
    noisy = np.asarray(pattern, dtype=np.float32) + rng.normal(0, 25, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


JPEG_LAYOUTS = ("image_folder", "imagenet", "tinyimagenet")


def write(name: str, root: str | Path, n_train: int = 512, n_test: int = 128, seed: int = 0) -> Path:
    root, rng = Path(root).expanduser(), np.random.default_rng(seed)
    if name == "mnist":
        return write_mnist(root, n_train, n_test, rng)
    if name in JPEG_LAYOUTS:
        return write_jpeg_folders(name, root, n_train, n_test, rng)
    return write_cifar(name, root, n_train, n_test, rng)
