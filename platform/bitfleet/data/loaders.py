"""This rank's loaders for a run: the training shard and the eval splits, torchvision or DALI.

Both kinds shard the training set by world rank with equal steps on every rank (Ray's report barrier
and DDP's collectives depend on it), shuffle by (seed, epoch) so a restarted epoch reads the same
order, and shard the eval splits without padding so every image counts once in the summed totals.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from bitfleet.data import DataInfo, build_datasets, folders, info, split_indices
from bitfleet.spec import DataSpec, RunSpec


@dataclass
class Loaders:
    train: Iterable  # (images, labels) batches of this rank's shard
    evals: dict[str, Iterable]  # "val" (held out of train) and "test"
    info: DataInfo
    steps_per_epoch: int  # the same on every rank
    set_epoch: Callable[[int], None]  # reshuffles the training shard for an epoch


@dataclass(frozen=True)
class Batches:
    """How a run batches its data (from its `train:` section) and its seed, which orders the shuffles."""

    batch_size: int  # global: split evenly over the workers
    eval_batch_size: int
    seed: int

    @classmethod
    def of(cls, spec: RunSpec) -> Batches:
        return cls(spec.train.batch_size, spec.train.eval_batch_size, spec.seed)


def build(data: DataSpec, batches: Batches, rank: int, world: int, device: torch.device) -> Loaders:
    """Loaders of a data section for one worker; the global batch is split evenly over the workers."""
    build_kind = _dali if data.loader == "dali" else _torchvision
    return build_kind(data, batches, batches.batch_size // world, rank, world, device)


def steps_per_epoch(n: int, world: int, per_worker: int) -> int:
    """Full batches of the padded shard, or one partial batch when the shard is smaller than a batch."""
    shard = math.ceil(n / world)
    return shard // per_worker if shard >= per_worker else 1


def _torchvision(data: DataSpec, batches: Batches, per_worker: int, rank: int, world: int, device) -> Loaders:
    sets = build_datasets(data)
    sampler = DistributedSampler(sets.train, world, rank, shuffle=True, seed=batches.seed)
    workers, pin = data.loader_workers, device.type == "cuda"
    train = DataLoader(sets.train, per_worker, sampler=sampler, num_workers=workers, pin_memory=pin,
                       drop_last=len(sampler) >= per_worker)  # a batch-of-one would break BatchNorm
    evals = {
        split: DataLoader(Subset(dataset, range(rank, len(dataset), world)), batches.eval_batch_size,
                          num_workers=workers, pin_memory=pin)
        for split, dataset in (("val", sets.val), ("test", sets.test)) if dataset is not None
    }
    return Loaders(train, evals, sets.info, steps_per_epoch(len(sets.train), world, per_worker), sampler.set_epoch)


def _dali(data: DataSpec, batches: Batches, per_worker: int, rank: int, world: int, device) -> Loaders:
    from bitfleet.data.dali import DaliLoader  # DALI is an extra: imported only when a spec asks for it

    root = Path(data.root)
    train_images, test_images = folders.scan(root, "train"), folders.scan(root, "test")
    splits = {"test": test_images}
    if data.val_size:
        train_idx, val_idx = split_indices(train_images.labels, data.val_size, data.split_seed, data.stratified)
        train_images, splits = train_images.subset(train_idx), {"val": train_images.subset(val_idx), **splits}
    common = dict(spec=data, rank=rank, world=world, seed=batches.seed, device=device)
    train = DaliLoader(train_images, train=True, batch_size=per_worker, **common)
    evals = {split: DaliLoader(images, train=False, batch_size=batches.eval_batch_size, **common)
             for split, images in splits.items()}
    return Loaders(train, evals, info(data), steps_per_epoch(len(train_images.files), world, per_worker),
                   train.set_epoch)
