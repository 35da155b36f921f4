"""`bitfleet data prepare | check`: put official validation sets into class folders; find unreadable images.

ImageNet's validation archive unpacks flat (`val/ILSVRC2012_val_00000001.JPEG`) with the labels in a
separate file; TinyImageNet's keeps them in `val/val_annotations.txt`. Both are moved (renamed, no copy)
into `val/<wnid>/`, the layout `folders.scan` reads. Rerunning is harmless: moved files stay put.
`check` decodes every image and records the unreadable ones in `<root>/bitfleet-check.json`, which the
loaders read to leave them out, so a corrupt file is reported here by path rather than crashing a worker.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from bitfleet import storage
from bitfleet.data.folders import CHECK_FILE, EXTENSIONS, SPLITS, class_names, image_files

DECODABLE = {"JPEG", "PNG"}  # what both loaders decode (DALI's nvImageCodec and PIL)


def read_imagenet_val_labels(path: Path) -> dict[str, str]:
    """{image stem: wnid} from Kaggle's LOC_val_solution.csv or from lines of `<file> <wnid>`."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    labels = {}
    if lines and lines[0].startswith("ImageId,"):
        for number, line in enumerate(lines[1:], 2):
            image_id, _, prediction = line.partition(",")
            if not prediction.split():
                raise ValueError(f"{path}:{number}: expected `ImageId,PredictionString`, got {line!r}")
            labels[image_id] = prediction.split()[0]  # "<wnid> x y x y [<wnid> ...]": one class per image
    else:
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 2 or not parts[1].startswith("n"):
                raise ValueError(f"{path}:{number}: expected `<file> <wnid>` (e.g. ILSVRC2012_val_00000001.JPEG "
                                 f"n01751748) or Kaggle's LOC_val_solution.csv, got {line!r}")
            labels[Path(parts[0]).stem] = parts[1]
    return labels


def prepare_imagenet(root: Path, val_labels: Path) -> int:
    """Move `val/*.JPEG` into `val/<wnid>/`; returns how many moved. Classes must be train's."""
    labels = read_imagenet_val_labels(val_labels)
    val = Path(root) / SPLITS["test"]
    flat = sorted(p for p in val.iterdir() if p.is_file() and p.name.lower().endswith(EXTENSIONS))
    unlabelled = [p.name for p in flat if p.stem not in labels]
    if unlabelled:
        raise ValueError(f"--val-labels {val_labels}: no label for {len(unlabelled)} images of {val} "
                         f"(first: {unlabelled[0]})")
    return _move(val, [(p, labels[p.stem]) for p in flat], class_names(Path(root)))


def prepare_tinyimagenet(root: Path) -> int:
    """Move `val/images/*` into `val/<wnid>/` after `val/val_annotations.txt`; returns how many moved."""
    val = Path(root) / SPLITS["test"]
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise ValueError(f"{annotations} not found: is {root} an unpacked tiny-imagenet-200?")
    moves = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{annotations}:{number}"
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{where}: expected `<file>\\t<wnid>\\t...`, got {line!r}")
        image = storage.inside(val / "images", fields[0], where)  # nothing from outside is moved in
        if image.is_file():
            moves.append((image, fields[1]))
    moved = _move(val, moves, class_names(Path(root)))
    if (val / "images").is_dir() and not any((val / "images").iterdir()):
        (val / "images").rmdir()
    return moved


def _move(val: Path, moves: list[tuple[Path, str]], classes: list[str]) -> int:
    """Every move checked before the first is made: a wrong label file moves nothing."""
    unknown = sorted({wnid for _, wnid in moves} - set(classes))
    if unknown:
        raise ValueError(f"validation labels name classes that train/ does not have: {', '.join(unknown[:5])}")
    for path, wnid in moves:
        (val / wnid).mkdir(exist_ok=True)
        os.replace(path, val / wnid / path.name)
    return len(moves)


# --------------------------------------------------------------------------- check


def decode_error(path: str) -> str | None:
    """None when PIL decodes the file as JPEG or PNG, else why not."""
    try:
        with Image.open(path) as image:
            if image.format not in DECODABLE:
                return f"{image.format} image, expected JPEG or PNG"
            image.draft("RGB", (image.width // 8 + 1, image.height // 8 + 1))  # JPEG: decode at 1/8 scale
            image.convert("RGB").load()
    except Exception as exc:  # noqa: BLE001 - any failure to decode is the finding
        return f"{type(exc).__name__}: {exc}"
    return None


def check(root: Path, workers: int = 1) -> dict:
    """Count classes and images per split, decode every image, write and return the report."""
    root = Path(root)
    report = {"root": str(root), "splits": {}, "unreadable": {}}
    files = []
    for folder in SPLITS.values():
        split_files = image_files(root / folder) if (root / folder).is_dir() else []
        classes = {Path(f).relative_to(root / folder).parts[0] for f in split_files}
        report["splits"][folder] = {"classes": len(classes), "images": len(split_files)}
        files += split_files
    with ProcessPoolExecutor(max(1, workers)) as pool:
        errors = pool.map(decode_error, files, chunksize=256)
        for path, error in zip(files, errors):
            if error:
                report["unreadable"][os.path.relpath(path, root)] = error
    storage.write_text(str(root / CHECK_FILE), json.dumps(report, indent=1))
    return report
