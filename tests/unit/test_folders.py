"""JPEG class folders: listing and labels, `data prepare` for ImageNet/TinyImageNet, `data check`, the
torchvision loader's transforms, the spec fields and their validation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitfleet import cli
from bitfleet.data import build_datasets, check_available, folders, info, loaders, prepare, synthetic
from bitfleet.errors import SpecError
from bitfleet.resolve import load_spec
from bitfleet.spec import DataSpec


def write(layout: str, root: Path, n_train=24, n_test=12, classes=4) -> Path:
    return synthetic.write_jpeg_folders(layout, root, n_train, n_test, np.random.default_rng(0), classes)


@pytest.fixture
def folder_root(tmp_path):
    return write("image_folder", tmp_path / "folders")


def test_scan_labels_follow_sorted_class_folders_like_imagefolder(folder_root):
    from torchvision.datasets import ImageFolder

    for split, folder in folders.SPLITS.items():
        images = folders.scan(folder_root, split)
        reference = ImageFolder(str(folder_root / folder))  # torchvision's own mapping, computed apart
        assert images.classes == reference.classes
        assert images.files == [p for p, _ in reference.samples]
        assert images.labels.tolist() == [label for _, label in reference.samples]


def test_scan_reads_nested_folders_and_skips_non_images(tmp_path):
    root = write("tinyimagenet", tmp_path / "tiny")  # train/<wnid>/images/*.JPEG next to <wnid>_boxes.txt
    (root / "train" / "n01440764" / "n01440764_boxes.txt").write_text("x\t0\t0\t1\t1\n")
    prepare.prepare_tinyimagenet(root)
    train = folders.scan(root, "train")
    assert len(train.files) == 24 and all(f.endswith(".JPEG") and "/images/" in f for f in train.files)


def test_a_validation_class_unknown_to_train_is_an_error(folder_root):
    (folder_root / "val" / "n09999999").mkdir()
    with pytest.raises(ValueError, match="n09999999"):
        folders.scan(folder_root, "test")


def test_prepare_imagenet_sorts_the_flat_validation_folder(tmp_path):
    root = write("imagenet", tmp_path / "imagenet")
    solution = {row.split(",")[0]: row.split(",")[1].split()[0]
                for row in (root / "LOC_val_solution.csv").read_text().splitlines()[1:]}
    assert "sorts them into classes" in check_available(DataSpec(dataset="image_folder", root=str(root)))
    assert cli.main(["data", "prepare", "imagenet", str(root), "--val-labels", str(root / "LOC_val_solution.csv")]) == 0
    moved = {p.stem: p.parent.name for p in (root / "val").glob("*/*.JPEG")}
    assert moved == solution and not list((root / "val").glob("*.JPEG"))
    assert check_available(DataSpec(dataset="image_folder", root=str(root))) is None
    assert prepare.prepare_imagenet(root, root / "LOC_val_solution.csv") == 0  # a rerun moves nothing


def test_prepare_imagenet_reads_file_wnid_lines_and_refuses_unlabelled_images(tmp_path):
    root = write("imagenet", tmp_path / "imagenet")
    rows = (root / "LOC_val_solution.csv").read_text().splitlines()[1:]
    lines = [f"{r.split(',')[0]}.JPEG {r.split(',')[1].split()[0]}" for r in rows]
    (tmp_path / "partial.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="no label for 1 images"):
        prepare.prepare_imagenet(root, tmp_path / "partial.txt")
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    assert prepare.prepare_imagenet(root, tmp_path / "labels.txt") == 12
    (tmp_path / "bad.txt").write_text("ILSVRC2012_val_00000001.JPEG\n")
    with pytest.raises(ValueError, match="bad.txt:1: expected"):
        prepare.read_imagenet_val_labels(tmp_path / "bad.txt")


def test_prepare_tinyimagenet_follows_val_annotations(tmp_path):
    root = write("tinyimagenet", tmp_path / "tiny")
    annotations = dict(line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines())
    assert cli.main(["data", "prepare", "tinyimagenet", str(root)]) == 0
    assert {p.name: p.parent.name for p in (root / "val").glob("n*/*.JPEG")} == annotations
    assert not (root / "val" / "images").exists()
    assert check_available(DataSpec(dataset="image_folder", root=str(root))) is None


def test_check_reports_corrupt_and_foreign_files_by_path_and_runs_leave_them_out(folder_root, capsys):
    good = sorted((folder_root / "train" / "n01440764").glob("*.JPEG"))
    (good[0].parent / "truncated.JPEG").write_bytes(good[0].read_bytes()[:200])
    (good[0].parent / "notes.JPEG").write_text("not an image")
    Image.new("RGB", (20, 20)).save(good[0].parent / "really_a_gif.JPEG", format="GIF")
    Image.new("RGB", (20, 20)).save(good[0].parent / "really_a_png.JPEG", format="PNG")  # both loaders decode it
    before = len(folders.scan(folder_root, "train").files)
    assert cli.main(["data", "check", str(folder_root), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    bad = ["train/n01440764/notes.JPEG", "train/n01440764/really_a_gif.JPEG", "train/n01440764/truncated.JPEG"]
    assert all(f"unreadable: {path}" in out for path in bad) and "really_a_png" not in out
    assert "train: 4 classes, 28 images" in out and "val: 4 classes, 12 images" in out
    report = json.loads((folder_root / folders.CHECK_FILE).read_text())
    assert sorted(report["unreadable"]) == bad and "GIF" in report["unreadable"][bad[1]]
    after = folders.scan(folder_root, "train").files
    assert len(after) == before - 3 and not any(os.path.relpath(f, folder_root) in bad for f in after)


def test_a_corrupt_file_is_named_when_the_torchvision_loader_meets_it(folder_root):
    path = sorted((folder_root / "val" / "n01440764").glob("*.JPEG"))[0]
    path.write_bytes(path.read_bytes()[:100])
    test = build_datasets(DataSpec(dataset="image_folder", root=str(folder_root))).test
    with pytest.raises(ValueError, match=f"cannot decode {path}.*bitfleet data check"):
        [test[i] for i in range(len(test))]


def test_torchvision_transforms_shapes_ranges_and_eval_reference(folder_root):
    yy, xx = np.mgrid[0:90, 0:130]  # a smooth picture: the reference below may resample with another filter
    smooth = np.stack([xx * 255 / 130, yy * 255 / 90, (xx + yy) * 255 / 220], -1).astype(np.uint8)
    Image.fromarray(smooth).save(folder_root / "val" / "n01440764" / "a_smooth.JPEG", quality=95)
    spec = DataSpec(dataset="image_folder", root=str(folder_root), crop_size=40, resize_size=48)
    data = build_datasets(spec)
    assert data.info == info(spec) == type(data.info)(4, 3, 40, folders.MEAN, folders.STD)
    x, y = data.train[0]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and y == int(data.train.targets[0])
    path, label = data.test.images.files[0], data.test.images.labels[0]
    x, y = data.test[0]
    with Image.open(path) as image:  # reference: PIL resize of the shorter side to 48, centre crop 40
        w, h = image.size
        size = (48, round(48 * h / w)) if w < h else (round(48 * w / h), 48)
        resized = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) / 255
    top, left = (resized.shape[0] - 40) // 2, (resized.shape[1] - 40) // 2
    ref = (torch.from_numpy(resized[top:top + 40, left:left + 40]).permute(2, 0, 1)
           - torch.tensor(folders.MEAN)[:, None, None]) / torch.tensor(folders.STD)[:, None, None]
    assert path.endswith("a_smooth.JPEG") and y == label and (x - ref).abs().max() < 0.05


def test_torchvision_loaders_shard_disjoint_with_equal_steps(folder_root):
    spec = load_spec_for(folder_root, "torchvision", workers=3, batch=6)
    built = [loaders.build(spec.data, loaders.Batches.of(spec), rank, 3, torch.device("cpu")) for rank in range(3)]
    assert len({b.steps_per_epoch for b in built}) == 1 and built[0].steps_per_epoch == 4  # ceil(24/3) // 2
    shards = [set(b.train.sampler) for b in built]
    assert set().union(*shards) == set(range(24)) and sum(map(len, shards)) == 24


def load_spec_for(root: Path, loader: str, workers: int, batch: int, **data):
    raw = {"name": "folders", "workload": "resnet_cifar", "data": {"dataset": "image_folder", "root": str(root),
           "loader": loader, "crop_size": 32, "resize_size": 36, **data},
           "train": {"batch_size": batch, "eval_batch_size": 5}, "scaling": {"num_workers": workers}}
    from bitfleet.resolve import validate_spec

    return validate_spec(raw)


@pytest.mark.parametrize("overrides,field,expected", [
    (["data.dataset=cifar10", "data.loader=dali"], "data.loader", "dali reads JPEG class folders"),
    (["data.dataset=cifar10", "data.crop_size=64"], "data.crop_size", "has a fixed size"),
    (["data.crop_size=224", "data.resize_size=200"], "data.resize_size", "smaller than crop_size"),
    (["data.crop_area=[0.5, 0.2]"], "data.crop_area", "0 < min <= max <= 1"),
    (["data.dataset=imagenet"], "data.root", "imagenet has 1000 classes"),
    (["data.dataset=tinyimagenet"], "data.root", "tinyimagenet has 200 classes"),
    (["data.root=/nonexistent/folder"], "data.root", "/nonexistent/folder/train not found"),
])
def test_bad_folder_specs_fail_at_validation(folder_root, tmp_path, overrides, field, expected):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: f\nworkload: resnet_cifar\ndata: {{dataset: image_folder, root: {folder_root}}}\n")
    with pytest.raises(SpecError, match=f"^{field}: .*{expected}"):
        load_spec(spec, overrides)


def test_dali_loader_without_dali_names_the_install(folder_root, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nvidia.dali" else real(name, *a))
    message = check_available(DataSpec(dataset="image_folder", root=str(folder_root), loader="dali"))
    assert message.startswith("data.loader: ") and "pip install bitfleet[dali]" in message
    assert "nvidia-dali-cuda120" in message


def test_default_crops_follow_the_data_set():
    assert (DataSpec(dataset="imagenet", root="/x").crop,
            DataSpec(dataset="imagenet", root="/x").eval_resize) == (224, 256)
    assert (DataSpec(dataset="tinyimagenet", root="/x").crop,
            DataSpec(dataset="tinyimagenet", root="/x").eval_resize) == (64, 64)
