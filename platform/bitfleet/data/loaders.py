"""This rank's loaders for a run: the training shard and the eval splits, torchvision or DALI.

Both kinds shard the training set by world rank with equal steps on every rank (Ray's report barrier
and DDP's collectives depend on it), shuffle by (seed, epoch) so a restarted epoch reads the same
order, and shard the eval splits without padding so every image counts once in the summed totals.

Resuming inside an epoch: `set_epoch(epoch, skip_batches)` starts the next pass over the training shard
at a batch, and what each sample looks like does not depend on where the pass started: the torchvision
path draws every sample's augmentation from its own generator, seeded by (seed, epoch, index)
(`SampleSeeded`), so neither loader worker processes nor the training step's own draws (dropout, mixup)
share a random stream with it; DALI's pipeline draws per pipeline, so a resumed pass re-reads the skipped
batches and drops them (the same draws, at the cost of decoding them again).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from bitfleet.data import NO_VAL, DataInfo, build_datasets, eval_split, folders, info, split_indices
from bitfleet.data.sample_seeds import sample_seeds
from bitfleet.errors import SpecError
from bitfleet.spec import DataSpec, RunSpec


@dataclass
class Loaders:
    train: Iterable  # (images, labels) batches of this rank's shard
    evals: dict[str, Iterable]  # "val" (held out of train) and "test"
    info: DataInfo
    steps_per_epoch: int  # the same on every rank
    set_epoch: Callable[..., None]  # (epoch, skip_batches=0): the epoch's order, its next pass from a batch


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


class SampleSeeded(Dataset):
    """`dataset[i]` drawn under a torch generator seeded by (seed, epoch, i): a sample's augmentation is
    the same whichever process loads it and wherever the pass over the epoch started."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """A batch's samples (the DataLoader asks for a batch at once): their seeds computed together, and
        the caller's stream saved and restored once per batch, not once per sample."""
        seeds = sample_seeds(self.seed, self.epoch, indices).tolist()
        # the CPU generator alone, which transforms draw from: torch.manual_seed (and fork_rng) also visit
        # every accelerator backend, ~100 us a sample against ~2 us for this
        generator = torch.default_generator
        caller = generator.get_state()
        try:
            samples = []
            for index, seed in zip(indices, seeds):
                generator.manual_seed(seed)
                samples.append(self.dataset[index])
            return samples
        finally:
            generator.set_state(caller)  # the caller's stream is left as it was


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose next pass can start `skip` samples into this rank's order of the epoch."""

    skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        skip, self.skip = self.skip, 0  # only the pass that resumes starts late (BN recalibration reads all)
        return itertools.islice(super().__iter__(), skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def _torchvision(data: DataSpec, batches: Batches, per_worker: int, rank: int, world: int, device) -> Loaders:
    sets = build_datasets(data)
    dataset = SampleSeeded(sets.train, batches.seed)
    sampler = ResumableSampler(dataset, world, rank, shuffle=True, seed=batches.seed)
    workers, pin = data.loader_workers, device.type == "cuda"
    # its own generator: the base seed a pass draws for worker processes leaves the global stream alone
    train = DataLoader(dataset, per_worker, sampler=sampler, num_workers=workers, pin_memory=pin,
                       drop_last=len(sampler) >= per_worker,  # a batch-of-one would break BatchNorm
                       generator=torch.Generator())

    def set_epoch(epoch: int, skip_batches: int = 0) -> None:
        dataset.epoch = epoch
        sampler.set_epoch(epoch, skip_batches * per_worker)

    evals = {
        split: DataLoader(Subset(dataset, range(rank, len(dataset), world)), batches.eval_batch_size,
                          num_workers=workers, pin_memory=pin)
        for split, dataset in (("val", sets.val), ("test", sets.test)) if dataset is not None
    }
    return Loaders(train, evals, sets.info, steps_per_epoch(len(sets.train), world, per_worker), set_epoch)


def _dali(data: DataSpec, batches: Batches, per_worker: int, rank: int, world: int, device) -> Loaders:
    from bitfleet.data.dali import DaliLoader  # DALI is an extra: imported only when a spec asks for it

    images = _folder_splits(data)
    common = dict(spec=data, rank=rank, world=world, seed=batches.seed, device=device)
    train = DaliLoader(images["train"], train=True, batch_size=per_worker, **common)
    evals = {split: DaliLoader(images[split], train=False, batch_size=batches.eval_batch_size, **common)
             for split in ("val", "test") if split in images}
    return Loaders(train, evals, info(data), steps_per_epoch(len(images["train"].files), world, per_worker),
                   train.set_epoch)


def _folder_splits(data: DataSpec) -> dict[str, folders.ImageList]:
    """A folder data set's image lists: train (less the images `val_size` holds out), val, test."""
    root = Path(data.root)
    train, test = folders.scan(root, "train"), folders.scan(root, "test")
    if not data.val_size:
        return {"train": train, "test": test}
    train_idx, val_idx = split_indices(train.labels, data.val_size, data.split_seed, data.stratified)
    return {"train": train.subset(train_idx), "val": train.subset(val_idx), "test": test}


def split_loader(data: DataSpec, split: str, batch_size: int, device: torch.device) -> Iterable:
    """All of one split in order, for one process (`bitfleet eval`): val and test as a run's evaluation reads
    them, the training split through the same evaluation transforms (no augmentation)."""
    plain = data.model_copy(update={"augment": False})
    if data.loader != "dali":
        return DataLoader(eval_split(plain, split), batch_size, num_workers=data.loader_workers,
                          pin_memory=device.type == "cuda")
    from bitfleet.data.dali import DaliLoader

    images = _folder_splits(plain)
    if split not in images:
        raise SpecError(NO_VAL)
    return DaliLoader(images[split], plain, train=False, batch_size=batch_size, rank=0, world=1, seed=0, device=device)
