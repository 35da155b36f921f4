"""Runs in object storage are read as local ones: checkpoints chosen by the same integrity rules (newest
complete, best by metric, damaged ones passed over), `bitfleet report`, `train.init_from`. Through file://
URIs: pyarrow's local filesystem behind the URI code path that s3:// and gs:// take."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from bitfleet import registry, report
from bitfleet.data import info
from bitfleet.engine import checkpoint, loop
from bitfleet.errors import SpecError
from bitfleet.resolve import validate_spec
from tests.unit.test_integrity import write
from tests.unit.test_report import write_run


def test_a_uri_run_gives_its_newest_complete_checkpoint_and_only_what_was_checked_is_read(tmp_path, caplog):
    run = tmp_path / "store" / "run"
    oldest, older, newer = (write(run, f"checkpoint_{e}", e, 10 * e) for e in (1, 2, 3))
    (newer / checkpoint.FILE).write_bytes((newer / checkpoint.FILE).read_bytes()[:-8])  # truncated
    uri = f"file://{run}"
    with caplog.at_level(logging.WARNING), checkpoint.fetched(uri) as found:
        assert found.name == older.name and not found.is_relative_to(run)  # a temporary copy
        assert checkpoint.load(found)["epoch"] == 2
        assert not (found.parent / oldest.name / checkpoint.FILE).exists()  # never needed, never downloaded
        copy = found
    assert not copy.exists()  # removed with the block
    assert any("skipping checkpoint" in r.getMessage() and newer.name in r.getMessage() for r in caplog.records)

    # the best checkpoint, recorded by a driver that saw the run elsewhere: found by its name in the run
    (run / "result.json").write_text(json.dumps({"best_checkpoint": f"/elsewhere/run/{oldest.name}"}))
    with checkpoint.fetched(uri) as found:
        assert found.name == oldest.name and checkpoint.load(found)["epoch"] == 1
    with checkpoint.fetched(f"{uri}/{older.name}") as found:  # a checkpoint named directly
        assert checkpoint.load(found)["epoch"] == 2
    with pytest.raises(FileNotFoundError, match=f"{uri}/{newer.name}: an incomplete or corrupt checkpoint"):
        with checkpoint.fetched(f"{uri}/{newer.name}"):
            pass
    with pytest.raises(FileNotFoundError):
        with checkpoint.fetched(f"file://{tmp_path}/nothing"):
            pass


def test_report_reads_a_uri_run_and_writes_beside_it(tmp_path):
    write_run(tmp_path / "store" / "lbp")
    out = report.write([f"file://{tmp_path}/store/lbp"])
    assert out == f"file://{tmp_path}/store/lbp"
    (row,) = json.loads((tmp_path / "store" / "lbp" / "summary.json").read_text())
    assert row["best_test_acc"] == 97.0
    assert (tmp_path / "store" / "lbp" / "test_accuracy.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        report.write([f"file://{tmp_path}/store"])


RAW = {"name": "init", "workload": "resnet_cifar", "model": {"arch": "resnet20", "shortcut": "A"},
       "data": {"dataset": "mnist_sample", "loader_workers": 0},
       "train": {"epochs": 1, "batch_size": 32}, "scaling": {"num_workers": 1, "cpus_per_worker": 1}}


def test_init_from_a_uri_is_checked_before_the_run_and_loaded_in_the_worker(tmp_path):
    spec = validate_spec({**RAW, "storage_path": str(tmp_path / "runs")})
    torch.manual_seed(123)  # other weights than the run's own initialisation (seed 0)
    source = registry.get("resnet_cifar").build_model(spec.model, info(spec.data))
    folder = tmp_path / "store" / "src" / "checkpoint_a"
    folder.mkdir(parents=True)
    checkpoint.save(folder, {"model": source.state_dict(), "ema": None, "epoch": 1, "global_step": 4})
    damaged = write(tmp_path / "store" / "bad", "checkpoint_b", 1, 4)
    (damaged / checkpoint.FILE).write_bytes(b"")
    with pytest.raises(SpecError, match=f"train.init_from: file://{damaged}: an incomplete or corrupt checkpoint"):
        validate_spec({**RAW, "storage_path": str(tmp_path / "runs"), "train": {"init_from": f"file://{damaged}"}})

    raw = {**RAW, "storage_path": str(tmp_path / "runs"), "train": {**RAW["train"], "init_from": f"file://{folder.parent}"}}
    spec = validate_spec(raw)
    loaded = []
    # num_workers=0: Ray Train's local mode builds the worker's Trainer here, without a cluster
    TorchTrainer(lambda: loaded.append(loop.Trainer(spec).model.state_dict()),
                 scaling_config=ScalingConfig(num_workers=0)).fit()
    assert checkpoint.weights_sha256(loaded[0]) == checkpoint.weights_sha256(source.state_dict())
