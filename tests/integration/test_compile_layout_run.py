"""`train.compile` and `train.channels_last` through a 2-worker DDP run on a real Ray cluster (torch.compile
around DDP), then the same run resumed with both off: its checkpoint is the plain format and the spec's
digest ignores both, so the rerun continues it instead of being refused as another run."""
from __future__ import annotations

import pytest
import yaml

from bitfleet.data import synthetic
from bitfleet.engine import checkpoint
from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def write_lenet5(tmp_path, epochs: int, on: bool):
    raw = yaml.safe_load(open("workloads/tap_ppo/specs/lenet5.yaml"))
    root = tmp_path / "cifar"
    if not root.is_dir():
        synthetic.write("cifar10", root, n_train=128, n_test=32, seed=0)
    raw.pop("stages")
    raw["tap_ppo"]["stage"] = "float"
    raw["data"].update(root=str(root), val_size=16, loader_workers=0)
    raw["train"].update(epochs=epochs, batch_size=16, eval_batch_size=32, max_steps_per_epoch=3, compile=on,
                        channels_last=on)
    raw["scaling"].update(num_workers=2, cpus_per_worker=1)
    raw["storage_path"] = str(tmp_path / "runs")
    path = tmp_path / f"lenet5-{epochs}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_compiled_nhwc_ddp_run_resumes_with_both_off(ray_cluster, tmp_path):
    finish(bitfleet(ray_cluster, tmp_path / "first.log", "run", str(write_lenet5(tmp_path, 2, on=True)),
                    "--address", ray_cluster.address))
    run_dir = tmp_path / "runs" / "tap-lenet5"
    first = checkpoint.load(checkpoint.newest(run_dir.glob("checkpoint_*")))
    assert first["epoch"] == 2
    assert not any("_orig_mod" in key or key.startswith("module.") for key in first["model"])
    assert all(tensor.is_contiguous() for tensor in first["model"].values())

    out = finish(bitfleet(ray_cluster, tmp_path / "rest.log", "run", str(write_lenet5(tmp_path, 3, on=False)),
                          "--address", ray_cluster.address))
    assert "restored from checkpoint at epoch 2" in out
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]
    last = checkpoint.load(checkpoint.newest(run_dir.glob("checkpoint_*")))
    assert last["epoch"] == 3 and list(last["model"]) == list(first["model"])
