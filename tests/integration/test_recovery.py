"""A rerun continues from the newest complete checkpoint: a corrupt newest one is passed over (no crash
loop), and a complete one that Ray never registered is found on storage."""
from __future__ import annotations

import pytest

from bitfleet.engine import checkpoint
from tests.conftest import write_spec
from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_corrupt_newest_checkpoint_is_skipped_and_an_unregistered_one_is_used(ray_cluster, mnist_root, tmp_path):
    spec = write_spec(tmp_path, "recover", mnist_root, tmp_path / "results", epochs=2, max_steps_per_epoch=4)
    run_dir = tmp_path / "results" / "recover"

    def run(epochs: int, log: str) -> str:
        return finish(bitfleet(ray_cluster, tmp_path / log, "run", str(spec), "--address", ray_cluster.address,
                               "-o", f"train.epochs={epochs}", "-o", "failure.keep=5",
                               "-o", "failure.max_failures=-1", "-o", "scaling.num_workers=1"))

    run(2, "first.log")
    first = read_metrics(run_dir)
    newest = max(run_dir.glob("checkpoint_*/"), key=lambda p: checkpoint.manifest(p)["epoch"])
    assert checkpoint.manifest(newest)["epoch"] == 2
    state = newest / checkpoint.FILE
    state.write_bytes(state.read_bytes()[:1000])  # a write cut short

    out = run(3, "corrupt.log")  # Ray hands the newest registered checkpoint: the corrupt one
    assert f"skipping checkpoint {newest}" in out and "restored from checkpoint at epoch 1" in out
    again = read_metrics(run_dir)
    assert [m["epoch"] for m in again] == [1, 2, 3] and again[-1]["restores"] == 1
    assert again[1]["test/acc"] == first[1]["test/acc"]  # epoch 2 run again from epoch 1: the same result

    (run_dir / "checkpoint_manager_snapshot.json").unlink()  # Ray forgets every checkpoint it registered
    out = run(4, "unregistered.log")
    assert "restored from checkpoint at epoch 3" in out
    last = read_metrics(run_dir)
    assert [m["epoch"] for m in last] == [1, 2, 3, 4] and last[-1]["restores"] == 2
