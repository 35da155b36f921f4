"""The hostile corpus of data files (issue 21): annotation and label files, checkpoint manifests and CIFAR
pickles written to reach outside their folder or to run code. Each is refused naming the file; nothing is
moved, read from outside, or run. (DeepSpeed shards: tests/unit/test_strategy.py.)"""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bitfleet import cli
from bitfleet.data import cifar, synthetic
from bitfleet.engine import checkpoint


def _tiny(tmp_path: Path) -> Path:
    return synthetic.write_jpeg_folders("tinyimagenet", tmp_path / "tiny", 8, 4, np.random.default_rng(0), 2)


def _prepare(argv: list[str], capsys) -> str:
    assert cli.main(["data", "prepare", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bitfleet: error: ") and "Traceback" not in err, err
    return err


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["../../../outside.JPEG", "{outside}", "images/../../../outside.JPEG", "..",
                                  "sub/../../../../outside.JPEG"])
def test_a_tinyimagenet_annotation_leading_out_of_the_images_moves_nothing(tmp_path, capsys, name):
    root = _tiny(tmp_path)
    outside = tmp_path / "outside.JPEG"
    outside.write_bytes(b"a file of someone else")
    annotations = root / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    wnid = lines[0].split("\t")[1]
    hostile = f"{name.format(outside=outside)}\t{wnid}\t0\t0\t8\t8"
    annotations.write_text("\n".join(lines + [hostile]) + "\n")  # the good lines first: none of them moves either
    before = _files(root)
    err = _prepare(["tinyimagenet", str(root)], capsys)
    assert f"val_annotations.txt:{len(lines) + 1}:" in err and "is not a path inside" in err
    assert outside.read_bytes() == b"a file of someone else" and _files(root) == before


def test_a_tinyimagenet_annotation_that_is_not_a_record_is_named(tmp_path, capsys):
    root = _tiny(tmp_path)
    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "just one field\n")
    before = _files(root)
    err = _prepare(["tinyimagenet", str(root)], capsys)
    assert "val_annotations.txt:5: expected `<file>\\t<wnid>" in err and _files(root) == before


@pytest.mark.parametrize("label", ["../../../etc", "/tmp", "n99999999"])
def test_imagenet_labels_naming_no_class_of_train_move_nothing(tmp_path, capsys, label):
    root = synthetic.write_jpeg_folders("imagenet", tmp_path / "imagenet", 8, 4, np.random.default_rng(0), 2)
    rows = (root / "LOC_val_solution.csv").read_text().splitlines()
    first, rest = rows[1].split(",", 1)
    rows[1] = f"{first},{label} 0 0 1 1"
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    before = _files(root)
    err = _prepare(["imagenet", str(root), "--val-labels", str(root / "labels.csv")], capsys)
    assert "classes that train/ does not have" in err and _files(root) == before


def test_an_imagenet_label_row_without_a_class_is_named(tmp_path, capsys):
    root = synthetic.write_jpeg_folders("imagenet", tmp_path / "imagenet", 8, 4, np.random.default_rng(0), 2)
    (root / "labels.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001\n")
    err = _prepare(["imagenet", str(root), "--val-labels", str(root / "labels.csv")], capsys)
    assert "labels.csv:2: expected `ImageId,PredictionString`" in err


# ---------------------------------------------------------------- checkpoint manifests


def _checkpoint(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True)
    checkpoint.write_state(folder, {"model": {"w": torch.zeros(4)}, "epoch": 1, "global_step": 1})
    checkpoint.write_manifest(folder, [checkpoint.FILE], rank=0, parts=1, epoch=1, step=1)
    head = checkpoint.manifest(folder)
    head["files"].update(files)
    (folder / checkpoint.MANIFEST).write_text(json.dumps(head))
    return folder


@pytest.mark.parametrize("name", ["../secret", "/etc/hostname", "sub/../../secret"])
def test_a_manifest_naming_a_file_outside_its_checkpoint_is_refused(tmp_path, capsys, name):
    secret = tmp_path / "secret"
    secret.write_text("not a checkpoint file")
    entry = {"size": secret.stat().st_size, "sha256": "0" * 64}
    folder = _checkpoint(tmp_path / "run" / "checkpoint_000001", {name: entry})
    assert "a file outside the checkpoint" in checkpoint.problem(folder)
    with pytest.raises(FileNotFoundError, match="incomplete or corrupt"):
        checkpoint.find(folder)
    spec = Path(__file__).parents[2] / "workloads/lbpnet/specs/quickstart.yaml"
    assert cli.main(["validate", str(spec), "-o", f"train.init_from={folder}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitfleet: error: train.init_from: ") and "outside the checkpoint" in err


@pytest.mark.parametrize("manifest", ['{"files": "state.pt"}', '[1, 2]', '{"files": {"state.pt": {"size": "1"}}}',
                                      '{"files": {}, "parts": "two"}'])
def test_a_manifest_that_is_not_one_is_named_not_a_crash(tmp_path, manifest):
    folder = _checkpoint(tmp_path / "checkpoint_000001", {})
    (folder / checkpoint.MANIFEST).write_text(manifest)
    assert "is not a manifest" in checkpoint.problem(folder)


def test_a_result_file_pointing_outside_the_run_folder_is_not_followed(tmp_path, caplog):
    elsewhere = _checkpoint(tmp_path / "elsewhere" / "checkpoint_000009", {})
    run = tmp_path / "run"
    own = _checkpoint(run / "checkpoint_000001", {})
    (run / "result.json").write_text(json.dumps({"best_checkpoint": str(elsewhere)}))
    with caplog.at_level(logging.WARNING):
        assert checkpoint.find(run) == own.resolve()
    assert "outside the run folder" in caplog.text
    (run / "result.json").write_text(json.dumps({"best_checkpoint": str(own)}))
    assert checkpoint.find(run) == own.resolve()


# ---------------------------------------------------------------- CIFAR pickles


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cifar(tmp_path: Path) -> tuple[Path, SimpleNamespace]:
    synthetic.write("cifar10", tmp_path / "cifar", n_train=20, n_test=10, seed=0)
    return tmp_path / "cifar" / "cifar-10-batches-py", SimpleNamespace(dataset="cifar10", root=str(tmp_path / "cifar"))


@pytest.mark.parametrize("file", ["data_batch_3", "test_batch", "batches.meta"])
def test_a_cifar_pickle_that_runs_code_is_refused_naming_the_file(tmp_path, file):
    folder, spec = _cifar(tmp_path)
    marker = tmp_path / "ran"
    with open(folder / file, "wb") as f:
        pickle.dump({"data": _RunsCode(marker), "labels": [], "label_names": []}, f)
    with pytest.raises(ValueError, match=rf"{file}: not a CIFAR pickle, refused: it names posix.system"):
        cifar.load(spec, augment=False)
    assert not marker.exists()


@pytest.mark.parametrize("content,problem", [
    (b"\x80\x04\x95", "not a CIFAR pickle"),  # truncated
    (pickle.dumps([1, 2, 3]), "it holds a list, not a dict"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}), "uint8 images of 3x32x32"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), "one class index below 10"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "one class index below 10"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, True]}), "one class index below 10"),
    (b"cbuiltins\neval\n(S'1'\ntR.", "it names builtins.eval"),
])
def test_a_cifar_batch_that_is_not_one_is_refused_naming_the_file(tmp_path, content, problem):
    folder, spec = _cifar(tmp_path)
    (folder / "data_batch_2").write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_2: not a CIFAR") as refused:
        cifar.load(spec, augment=False)
    assert problem in str(refused.value)


def test_cifar_batches_of_every_pickle_protocol_still_load_as_torchvision_reads_them(tmp_path):
    import torchvision

    folder, spec = _cifar(tmp_path)
    for protocol in (2, 3, 4, 5):  # 2: as the official Python 2 files (numpy.core.multiarray._reconstruct)
        batch = pickle.loads((folder / "data_batch_1").read_bytes())
        (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
        train, _ = cifar.load(spec, augment=False)

        class Unchecked(torchvision.datasets.CIFAR10):  # torchvision's own reading, its MD5 check skipped
            meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}

            def _check_integrity(self):
                return True

        reference = Unchecked(spec.root, train=True)
        assert np.array_equal(train.data, reference.data) and train.targets == reference.targets
        assert train.classes == reference.classes and len(train) == 20
