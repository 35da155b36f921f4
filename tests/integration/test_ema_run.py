"""The EMA on the compressed LBPNet preset of issue 22: seed 001's `paper_mnist_rp_full60k` on the embedded
digits, 4 epochs, one worker (10 of an epoch's 16 steps: a short test on 2 busy cores). The old EMA (BN
buffers averaged from their initial values, no warm-up) left the evaluated model at chance for most of such a
run; the seeds' EMA (parameters averaged, buffers live) with warm-up follows the trained weights, and both
models' accuracies are reported.
"""
from __future__ import annotations

import json

import pytest

from tests.integration.conftest import read_metrics
from tests.integration.test_runs import bitfleet, finish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PRESET = "workloads/lbpnet/specs/paper_mnist_rp_full60k.yaml"
COMPRESSED = [  # the compression of the preset (300 epochs -> a few) on the 4,000 embedded digits
    "data.dataset=mnist_sample", "data.augment=false", "data.loader_workers=0", "train.epochs=4",
    "train.lr_schedule.warmup_epochs=1", "lbpnet.freeze_schedule.freeze_offsets_epochs=1",
    "lbpnet.freeze_schedule.freeze_gates_extra_epochs=1", "lbpnet.freeze_schedule.freeze_gate_epochs=1",
    "lbpnet.hard_finetune.enable=false", "lbpnet.hard_finetune.bn_recal_batches=4", "train.max_steps_per_epoch=10",
    "scaling.num_workers=1", "scaling.cpus_per_worker=2", "failure.max_failures=2",
]


def test_the_ema_of_the_compressed_preset_follows_the_trained_weights(ray_cluster, tmp_path):
    args = ["run", PRESET, "--address", ray_cluster.address, "-o", "name=ema-compressed",
            "-o", f"storage_path={tmp_path}", "-o", "train.ema.warmup=true"]
    for item in COMPRESSED:
        args += ["-o", item]
    finish(bitfleet(ray_cluster, tmp_path / "driver.log", *args))

    metrics = read_metrics(tmp_path / "ema-compressed")
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    last = metrics[-1]
    print([(m["test/acc"], m["ema/test/acc"]) for m in metrics], flush=True)
    assert last["test/acc"] > 25  # the trained weights learned (chance: 10%)
    assert abs(last["ema/test/acc"] - last["test/acc"]) < 5
    assert all("ema/test/loss" in m and "ema/test/acc" in m for m in metrics)
    # the EMA is the run's result: its accuracy ranked the checkpoints
    result = json.loads((tmp_path / "ema-compressed" / "result.json").read_text())
    assert result["best"]["ema/test/acc"] == max(m["ema/test/acc"] for m in metrics)
