"""NVIDIA DALI pipelines over JPEG class folders: each Ray Train worker reads and decodes its own shard.

The file reader gets the epoch's file list already shuffled (the permutation DistributedSampler would
draw from the same seed and epoch) and takes its contiguous shard `shard_id = rank` of `num_shards =
world size`, padded so that every rank has the same number of batches. Because the order is a function
of (seed, epoch) alone, a worker restarted from an epoch-boundary checkpoint reads exactly the epoch it
would have read; each pass builds a fresh pipeline for that reason. One restarted mid-epoch builds the
same pipeline and drops the batches already trained on: the pipeline's crops and flips are drawn per
pipeline, in batch order, so dropping them (not skipping their files) keeps the rest of the epoch's draws
exact. Decoding is `mixed` (nvJPEG) when the
worker holds a GPU and `cpu` otherwise, chosen from the device Ray Train gave the worker.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dali_math

from bitfleet.data.folders import MEAN, STD, ImageList

READER = "reader"
PREFETCH = 2  # batches the pipeline computes ahead of the one being consumed


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of an epoch: the one `DistributedSampler(shuffle=True, seed=seed)` draws."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


@pipeline_def(enable_conditionals=False)
def _pipeline(files, labels, shard_id, num_shards, decoder, *, augment, crop, resize, area):
    jpegs, label = fn.readers.file(
        files=files, labels=labels, shard_id=shard_id, num_shards=num_shards, random_shuffle=False,
        stick_to_shard=True, pad_last_batch=True, name=READER,
    )
    if augment:  # torchvision's RandomResizedCrop + RandomHorizontalFlip, the crop fused into decoding
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder, output_type=types.RGB, random_area=list(area),
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
        )
        images = fn.resize(images, resize_x=crop, resize_y=crop, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
    else:  # Resize(shorter side) + CenterCrop
        images = _decode_centre_crop(jpegs, decoder, crop, resize)
        mirror = 0
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=(crop, crop), mirror=mirror,
        mean=[255 * m for m in MEAN], std=[255 * s for s in STD],
    )
    return images, label


def _decode_centre_crop(jpegs, decoder, crop, resize):
    """torchvision's Resize(`resize`) + CenterCrop(`crop`) with the crop taken first: the crop keeps the centre
    square of side shorter * crop / resize of the original, so only that square is decoded, then scaled
    straight to crop x crop (the same window at the same scale; the rest of the image is neither decoded
    nor resampled, which on the CPU is a third of the work)."""
    shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)  # (height, width, channels), read from the header
    side = dali_math.min(shape[0], shape[1]) * (crop / resize)
    images = fn.decoders.image_crop(jpegs, device=decoder, output_type=types.RGB, crop_w=side, crop_h=side,
                                    crop_pos_x=0.5, crop_pos_y=0.5)
    return fn.resize(images, resize_x=crop, resize_y=crop, antialias=True)


class DaliLoader:
    """This rank's batches of an `ImageList`: (float NCHW images on the worker's device, int64 labels).

    `train`: shuffled per epoch, augmented when `spec.augment`; otherwise the files in order, resized and
    centre-cropped. The reader pads shards to an equal number of batches; the iterator drops that padding,
    so every image is read once per pass (a short shard ends in a short batch, past `steps_per_epoch`).
    """

    def __init__(self, images: ImageList, spec, *, train: bool, batch_size: int, rank: int, world: int,
                 seed: int, device: torch.device):
        self.images, self.spec, self.train = images, spec, train
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.decoder, self.device_id = ("mixed", device.index or 0) if device.type == "cuda" else ("cpu", None)
        self.device = device
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch's order; its next pass drops its first `skip_batches` (a pass resumed mid-epoch: the
        pipeline's augmentation draws per pipeline, so the skipped batches are drawn again, not skipped)."""
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        """Batches per rank and pass (the same on every rank)."""
        return math.ceil(math.ceil(len(self.images.files) / self.world) / self.batch_size)

    def __iter__(self):
        """The pass's batches, run through DALI's scheduled API so that the pipeline computes exactly this
        pass's batches: its own iterator keeps `PREFETCH` runs queued past the last one, work a short pass
        (an eval split, a small data set) pays for and throws away."""
        pipe, shard, steps = self._build(), self._shard_size(), len(self)
        skip, self.skip = self.skip, 0
        for _ in range(min(PREFETCH, steps)):
            pipe.schedule_run()
        for step in range(steps):
            with self.device:  # exec_dynamic: the outputs stay valid while torch holds them (no copy)
                images, labels = (torch.from_dlpack(out.as_tensor()) for out in pipe.share_outputs())
            pipe.release_outputs()
            if step + PREFETCH < steps:
                pipe.schedule_run()
            real = shard - step * self.batch_size  # the reader pads a shard's last batch with repeats
            if step >= skip and real > 0:  # a shard shorter than the longest ends in a batch of padding only
                yield images[:real], labels.view(-1)[:real].long()

    def _build(self):
        images = self.images
        if self.train:
            images = images.subset(epoch_order(len(images.files), self.seed, self.epoch))
        pipe = _pipeline(
            images.files, images.labels.tolist(), self.rank, self.world, self.decoder,
            augment=self.train and self.spec.augment, crop=self.spec.crop, resize=self.spec.eval_resize,
            area=self.spec.crop_area, batch_size=self.batch_size, num_threads=max(1, self.spec.loader_workers),
            device_id=self.device_id, seed=self._pipeline_seed(), prefetch_queue_depth=PREFETCH, exec_dynamic=True,
        )
        pipe.build()
        return pipe

    def _shard_size(self) -> int:
        """Images in this rank's shard: the file reader cuts [n * rank // world, n * (rank + 1) // world)."""
        n = len(self.images.files)
        return n * (self.rank + 1) // self.world - n * self.rank // self.world

    def _pipeline_seed(self) -> int:
        """Augmentation randomness from (seed, epoch, rank): a restarted epoch draws the same crops."""
        return int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0] % 2**31)
