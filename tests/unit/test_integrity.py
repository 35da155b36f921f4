"""What a rerun reads survives a crash: checkpoints are complete only when their manifest checks out,
readers skip incomplete ones, run files are written atomically, and a rerun with a changed spec is refused."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from bitfleet import storage
from bitfleet.engine import checkpoint
from bitfleet.errors import SpecError
from bitfleet.resolve import set_aside, validate_spec
from bitfleet.scheduler import launch, pipeline

RAW = {"name": "r", "workload": "resnet_cifar", "data": {"dataset": "mnist_sample"},
       "train": {"epochs": 3, "optimizer": {"lr": 0.1}}}


def write(run_dir, name, epoch, step, parts=1):
    folder = run_dir / name
    folder.mkdir(parents=True)
    state = {"model": {"w": torch.full((64,), float(epoch))}, "epoch": epoch, "global_step": step}
    checkpoint.write_state(folder, state)
    checkpoint.write_manifest(folder, [checkpoint.FILE], rank=0, parts=parts, epoch=epoch, step=step)
    return folder


def test_a_complete_checkpoint_checks_out_and_every_kind_of_damage_is_named(tmp_path):
    good = write(tmp_path, "checkpoint_a", 1, 10)
    assert checkpoint.problem(good) is None and checkpoint.manifest(good)["step"] == 10
    truncated = write(tmp_path, "checkpoint_b", 2, 20)
    data = (truncated / checkpoint.FILE).read_bytes()
    (truncated / checkpoint.FILE).write_bytes(data[: len(data) // 2])
    assert "differs from its manifest" in checkpoint.problem(truncated)
    flipped = write(tmp_path, "checkpoint_c", 3, 30)
    data = bytearray((flipped / checkpoint.FILE).read_bytes())
    data[-100] ^= 1  # same size, one bit changed
    (flipped / checkpoint.FILE).write_bytes(bytes(data))
    assert "differs from its manifest" in checkpoint.problem(flipped)
    unfinished = tmp_path / "checkpoint_d"
    unfinished.mkdir()
    checkpoint.write_state(unfinished, {"model": {}})  # died before the manifest
    assert "no manifest.json" in checkpoint.problem(unfinished)
    sharded = write(tmp_path, "checkpoint_e", 4, 40, parts=2)  # rank 1's part never arrived
    assert "no manifest.rank1.json" in checkpoint.problem(sharded)
    (sharded / "shard1.bin").write_bytes(b"x" * 10)
    checkpoint.write_manifest(sharded, ["shard1.bin"], rank=1, parts=2)
    assert checkpoint.problem(sharded) is None


def test_the_newest_complete_checkpoint_wins_by_its_recorded_step_and_damaged_ones_are_skipped(tmp_path, caplog):
    run = tmp_path / "run"
    older = write(run, "checkpoint_2026-01-01_00-00-00.000000", 1, 10)
    newer = write(run, "checkpoint_2025-01-01_00-00-00.000000", 2, 20)  # folder names do not decide
    assert checkpoint.find(run) == newer.resolve()
    (newer / checkpoint.MANIFEST).write_text("{\"rank\": 0, \"fi")  # truncated manifest
    with caplog.at_level(logging.WARNING):
        assert checkpoint.find(run) == older.resolve()
    assert any("skipping checkpoint" in r.getMessage() and newer.name in r.getMessage() for r in caplog.records)
    (run / "result.json").write_text(json.dumps({"best_checkpoint": str(newer)}))  # best, but damaged
    assert checkpoint.find(run) == older.resolve()
    with pytest.raises(FileNotFoundError, match="incomplete or corrupt checkpoint"):
        checkpoint.find(newer)  # named directly: an error, not a silent substitute
    (older / checkpoint.FILE).unlink()
    with pytest.raises(FileNotFoundError, match="complete checkpoints"):
        checkpoint.find(run)


def test_run_files_are_replaced_whole(tmp_path):
    path = tmp_path / "deep" / "metrics.json"
    storage.write_text(str(path), "[1]")
    storage.write_text(str(path), "[1, 2]")
    assert path.read_text() == "[1, 2]" and os.listdir(path.parent) == ["metrics.json"]  # no temporary left


def test_a_checkpoint_without_room_is_refused_naming_the_path_and_the_bytes(tmp_path):
    storage.check_free_space(str(tmp_path / "run"), 1024)
    with pytest.raises(OSError, match=r"no room for a checkpoint in .*bytes free, about [\d,]+ needed"):
        storage.check_free_space(str(tmp_path / "run"), 1 << 62)
    assert checkpoint.size_estimate({"w": torch.zeros(1000), "n": 3}) >= 4000


def test_a_rerun_with_a_changed_spec_is_refused_with_the_diff_and_may_only_extend(tmp_path):
    raw = {**RAW, "storage_path": str(tmp_path)}
    launch.record_config(validate_spec(raw))
    validate_spec(raw)  # the same spec: resumes
    validate_spec({**raw, "train": {**raw["train"], "epochs": 5}})  # extended: continues
    changed = {**raw, "train": {"epochs": 3, "optimizer": {"lr": 0.2}}, "model": {"arch": "resnet32"}}
    with pytest.raises(SpecError) as info:
        validate_spec(changed)
    message = str(info.value)
    assert "\n" not in message and "holds a run of a different spec" in message and "--fresh" in message
    assert "model.arch: 'resnet20' → 'resnet32'" in message and "train.optimizer.lr: 0.1 → 0.2" in message
    with pytest.raises(SpecError, match=r"train.epochs: 3 → 2 \(a run can be extended, not shortened\)"):
        validate_spec({**raw, "train": {**raw["train"], "epochs": 2}})
    validate_spec({**raw, "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}})  # where it runs: free to change
    config = tmp_path / "r" / "config.json"
    record = json.loads(config.read_text())
    del record["spec"]["model"]["shortcut"]  # an older bitfleet recorded the model section as written
    config.write_text(json.dumps(record))
    validate_spec(raw)


def test_a_sweep_rerun_keeps_its_sweep_section(tmp_path):
    raw = {**RAW, "storage_path": str(tmp_path), "sweep": {"space": {"train.optimizer.lr": {"choice": [0.1, 0.2]}}}}
    launch.record_config(validate_spec(raw))
    changed = {**raw, "sweep": {"space": {"train.optimizer.lr": {"choice": [0.1, 0.3]}}}}
    with pytest.raises(SpecError, match=r"sweep.space.train.optimizer.lr.choice: \[0.1, 0.2\] → \[0.1, 0.3\]"):
        validate_spec(changed)


def test_fresh_keeps_the_old_run_beside_and_config_keeps_the_history(tmp_path):
    raw = {**RAW, "storage_path": str(tmp_path)}
    spec = validate_spec(raw)
    launch.record_config(spec)
    launch.record_config(validate_spec({**raw, "train": {**raw["train"], "epochs": 4}}))
    record = json.loads((tmp_path / "r" / "config.json").read_text())
    assert record["spec"]["train"]["epochs"] == 4 and [h["spec"]["train"]["epochs"] for h in record["history"]] == [3]
    changed = {**raw, "train": {"epochs": 3, "optimizer": {"lr": 0.2}}}
    fresh = validate_spec(changed, fresh=True)
    aside = set_aside(fresh)
    assert aside and (tmp_path / "r").exists() is False and json.loads(
        (tmp_path / aside.rsplit("/", 1)[1] / "config.json").read_text())["spec"]["train"]["epochs"] == 4
    validate_spec(changed)  # the name is free again


def test_a_truncated_stage_file_gets_one_clear_line(tmp_path):
    spec = validate_spec({**RAW, "storage_path": str(tmp_path), "stages": [{"name": "a"}]})
    folder = tmp_path / "r" / "a"
    folder.mkdir(parents=True)
    (folder / pipeline.STAGE_FILE).write_text('{"stage": "a", "sta')
    with pytest.raises(pipeline.StageFailed, match=r"stage\.json is unreadable .*delete it to run stage 'a' again"):
        pipeline.completed(spec, spec.stages[0])


def test_one_driver_per_run_folder_and_a_dead_drivers_lock_is_taken_over(tmp_path):
    import subprocess
    import sys
    import time

    from bitfleet.scheduler import lock

    code = (f"import time; from bitfleet.scheduler import lock\nwith lock.hold({str(tmp_path)!r}, 'r'):\n"
            "    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SpecError, match=rf"held by a running driver \(pid {holder.pid} on "):
            with lock.hold(str(tmp_path), "r"):
                pass
        with pytest.raises(SpecError, match="held by a running driver"):
            lock.check_unheld(str(tmp_path), "r")
    finally:
        holder.kill()
        holder.wait()
    with lock.hold(str(tmp_path), "r") as path:  # its holder died without releasing it: taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "r" / lock.LOCK_FILE).exists()  # released
    with lock.hold(str(tmp_path), "new"):
        assert (tmp_path / "new" / lock.LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists()  # a folder made only for the lock goes with it (a refused run)
    (tmp_path / "r" / lock.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(SpecError, match="on elsewhere"):  # another host's driver with a fresh heartbeat
        with lock.hold(str(tmp_path), "r"):
            pass
    old = time.time() - lock.STALE_S - 1
    os.utime(tmp_path / "r" / lock.LOCK_FILE, (old, old))  # its heartbeat stopped long ago
    with lock.hold(str(tmp_path), "r"):
        pass


def test_checkpoints_are_ranked_by_the_objectives_metric_on_val_when_one_is_held_out():
    assert launch.checkpoint_score(validate_spec(RAW)) == ("test/acc", "max")
    held_out = {**RAW, "data": {"dataset": "mnist_sample", "val_size": 200}}
    assert launch.checkpoint_score(validate_spec(held_out)) == ("val/acc", "max")
    by_loss = {**held_out, "failure": {"checkpoint_metric": "val/loss"}}
    assert launch.checkpoint_score(validate_spec(by_loss)) == ("val/loss", "min")
    with pytest.raises(SpecError, match=r"failure.checkpoint_metric: 'val/acc' is not a metric of this run.*val "
                                        r"needs data.val_size > 0"):
        validate_spec({**RAW, "failure": {"checkpoint_metric": "val/acc"}})
    with pytest.raises(SpecError, match=r"failure.checkpoint_mode: set max or min: resnet_cifar's objective does "
                                        r"not know whether a higher 'rbnn/t' is better"):
        validate_spec({**RAW, "failure": {"checkpoint_metric": "test/rbnn/t"}})
    custom = {**RAW, "failure": {"checkpoint_metric": "test/rbnn/t", "checkpoint_mode": "min"}}
    assert launch.checkpoint_score(validate_spec(custom)) == ("test/rbnn/t", "min")
