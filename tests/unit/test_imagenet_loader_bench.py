"""bench/imagenet_loader.py's measurement: torchvision's loaders kept alive between passes with the run's own
dataset and sampler, the loaders taking turns per round, and ratios summarised from the same rounds."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is the [dali] extra; CI installs it")
sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))

import imagenet_loader as bench  # noqa: E402

CPU = torch.device("cpu")


def test_torchvision_is_measured_with_persistent_workers_over_the_runs_own_data(tmp_path):
    root = bench.write_imagenet_like(tmp_path, 6, classes=2)
    built = bench.build(root, "torchvision", 1, 4, CPU)
    run = bench.loaders.build(bench.spec_for(root, "torchvision", 1, 4).data, bench.loaders.Batches(4, 4, 0), 0, 1, CPU)
    assert built["train"].persistent_workers and not built["train"].pin_memory
    assert type(built["train"].sampler) is type(run.train.sampler) and built["train"].batch_size == 4
    assert len(built["eval"].dataset) == len(run.evals["test"].dataset) == 6


def test_rounds_interleave_the_loaders_and_the_ratio_comes_from_the_same_rounds(tmp_path):
    root = bench.write_imagenet_like(tmp_path, 6, classes=2)
    pipelines = {name: bench.build(root, loader, 1, 4, CPU)
                 for name, loader in (("torchvision", "torchvision"), ("dali_cpu", "dali"))}
    rates = bench.interleaved(pipelines, rounds=2)
    assert all(len(r[k]) == 2 and min(r[k]) > 0 for r in rates.values() for k in bench.KINDS)
    ratio = bench.summary(rates)["dali_cpu_over_torchvision"]["eval"]
    per_round = [d / t for d, t in zip(rates["dali_cpu"]["eval"], rates["torchvision"]["eval"])]
    assert ratio["min"] == min(per_round) and ratio["max"] == max(per_round)
