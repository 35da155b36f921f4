"""The DALI pipelines on CPU (`device_id=None`): shapes, dtypes and ranges, labels identical to the
torchvision path, disjoint shards that cover the data with equal steps, eval counting every image once,
the same epoch after a restart, and agreement with the torchvision transforms."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="DALI is the [dali] extra; CI installs it")

from bitfleet.data import folders, loaders, synthetic  # noqa: E402
from bitfleet.data.dali import DaliLoader, epoch_order  # noqa: E402
from bitfleet.resolve import validate_spec  # noqa: E402
from bitfleet.spec import DataSpec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.write_jpeg_folders("image_folder", tmp_path_factory.mktemp("jpeg"), 30, 13,
                                        np.random.default_rng(1), num_classes=5)


def data_spec(root, **fields):
    return DataSpec(**{"dataset": "image_folder", "root": str(root), "loader": "dali", "crop_size": 32,
                       "resize_size": 36, **fields})


def indexed(images: folders.ImageList) -> folders.ImageList:
    """The same files labelled by their position: what comes out of a pipeline says which file went in."""
    return folders.ImageList(images.files, np.arange(len(images.files)), images.classes)


def loader(images, spec, *, train, batch, rank=0, world=1, seed=0):
    return DaliLoader(images, spec, train=train, batch_size=batch, rank=rank, world=world, seed=seed, device=CPU)


def labels_of(batches) -> list[int]:
    return [int(y) for _, labels in batches for y in labels]


def test_batches_are_normalised_float_nchw_with_int64_labels(root):
    spec = data_spec(root)
    for train in (True, False):
        images, labels = next(iter(loader(folders.scan(Path(root), "train"), spec, train=train, batch=8)))
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and images.device == CPU
        assert labels.shape == (8,) and labels.dtype == torch.int64
        low = min((0 - m) / s for m, s in zip(folders.MEAN, folders.STD))
        high = max((1 - m) / s for m, s in zip(folders.MEAN, folders.STD))
        assert low - 1e-4 <= images.min() and images.max() <= high + 1e-4 and images.std() > 0.3


def test_labels_and_eval_images_match_the_torchvision_path(root):
    spec = data_spec(root)
    test = folders.scan(Path(root), "test")
    batches = list(loader(test, spec, train=False, batch=4))
    reference = folders.FolderImages(test, folders.transforms(spec, train=False))
    x = torch.cat([images for images, _ in batches])
    ref = torch.stack([reference[i][0] for i in range(len(reference))])
    assert labels_of(batches) == [reference[i][1] for i in range(len(reference))] == test.labels.tolist()
    assert x.shape == ref.shape and (x - ref).abs().mean() < 0.15  # decoders and resampling filters differ a little


@pytest.mark.parametrize("world,batch", [(2, 4), (3, 4), (4, 3)])
def test_train_shards_are_disjoint_cover_the_data_and_have_equal_steps(root, world, batch):
    images = indexed(folders.scan(Path(root), "train"))
    spec, n = data_spec(root), len(images.files)
    steps = loaders.steps_per_epoch(n, world, batch)
    shards = []
    for rank in range(world):
        dali = loader(images, spec, train=True, batch=batch, rank=rank, world=world)
        dali.set_epoch(2)
        batches = list(dali)
        assert len(batches) >= steps and all(len(labels) == batch for _, labels in batches[:steps])
        shards.append(labels_of(batches))
    assert len({len(s) for s in shards}) <= 2  # contiguous shards differ by one image at most
    seen = [set(s) for s in shards]
    assert set().union(*seen) == set(range(n)) and sum(map(len, seen)) == n  # disjoint, every file once
    order = epoch_order(n, 0, 2)  # the epoch's permutation, cut into contiguous shards
    assert [i for s in shards for i in s] == order


def test_eval_counts_every_image_once_over_ranks(root):
    test = indexed(folders.scan(Path(root), "test"))
    for world in (2, 3, 5):
        got = [labels_of(loader(test, data_spec(root), train=False, batch=2, rank=r, world=world))
               for r in range(world)]
        assert sorted(i for shard in got for i in shard) == list(range(13))


def test_epochs_reshuffle_and_a_restarted_epoch_reads_the_same_batches(root):
    images = folders.scan(Path(root), "train")
    spec = data_spec(root)
    run = loader(images, spec, train=True, batch=6, rank=1, world=2)
    epochs = []
    for epoch in range(3):
        run.set_epoch(epoch)
        epochs.append(list(run))
    assert labels_of(epochs[0]) != labels_of(epochs[1])
    restarted = loader(images, spec, train=True, batch=6, rank=1, world=2)  # a fresh worker restored at epoch 2
    restarted.set_epoch(2)
    again = list(restarted)
    assert labels_of(again) == labels_of(epochs[2])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, epochs[2]))  # same crops and flips too


def test_augmentation_is_random_resized_crop_and_flip(root):
    images = folders.scan(Path(root), "train")
    plain = torch.cat([x for x, _ in loader(images, data_spec(root, augment=False), train=True, batch=10)])
    augmented = torch.cat([x for x, _ in loader(images, data_spec(root), train=True, batch=10)])
    order = epoch_order(len(images.files), 0, 0)
    unshuffled = torch.empty_like(plain)
    unshuffled[order] = plain  # undo the epoch's shuffle: image i of the folder at row i
    reference = folders.FolderImages(images, folders.transforms(data_spec(root), train=False))
    assert (unshuffled[0] - reference[0][0]).abs().mean() < 0.15  # augment off: the eval transform
    assert (augmented - plain).abs().mean() > 0.3


def test_loaders_build_dali_with_a_held_out_validation_split(root):
    raw = {"name": "d", "workload": "resnet_cifar",
           "data": {"dataset": "image_folder", "root": str(root), "loader": "dali",
                    "crop_size": 32, "resize_size": 36, "val_size": 5},
           "train": {"batch_size": 8, "eval_batch_size": 4}, "scaling": {"num_workers": 2}}
    spec = validate_spec(raw)
    built = [loaders.build(spec.data, loaders.Batches.of(spec), rank, 2, CPU) for rank in range(2)]
    assert built[0].info.num_classes == 5 and built[0].info.image_size == 32
    assert {b.steps_per_epoch for b in built} == {loaders.steps_per_epoch(25, 2, 4)}
    val = sorted(y for b in built for y in labels_of(b.evals["val"]))
    assert len(val) == 5 and sorted(set(val)) == list(range(5))  # stratified: one per class
    assert sum(len(labels_of(b.evals["test"])) for b in built) == 13


def test_eval_decodes_the_centre_window_that_resize_and_centre_crop_keep(tmp_path):
    """The eval pipeline decodes only the centre square and scales it to the crop: on smooth gradients (where
    decoders agree) it matches torchvision's Resize + CenterCrop closely, and a window 10% off does not."""
    for i, (w, h) in enumerate([(150, 100), (90, 140), (120, 120), (201, 77)]):  # landscape, portrait, square
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([255 * x / w, 255 * y / h, 255 * (x + y) / (w + h)], -1).astype(np.uint8)
        for split in ("train", "val"):
            (tmp_path / split / "a").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(tmp_path / split / "a" / f"{i}.jpg", quality=95)
    test = folders.scan(tmp_path, "test")
    got = torch.cat([x for x, _ in loader(test, data_spec(tmp_path), train=False, batch=4)])

    def error(resize: int) -> torch.Tensor:
        spec = data_spec(tmp_path, resize_size=resize)
        reference = folders.FolderImages(test, folders.transforms(spec, train=False))
        return (got - torch.stack([reference[i][0] for i in range(len(reference))])).abs().mean((1, 2, 3))

    assert error(36).max() < 0.04
    assert error(32).min() > 0.05 and error(40).min() > 0.05


def test_a_pass_resumed_mid_epoch_yields_the_rest_of_the_epoch_unchanged(root):
    images = folders.scan(Path(root), "train")
    run = loader(images, data_spec(root), train=True, batch=4, rank=0, world=2)
    run.set_epoch(3)
    full = list(run)
    run.set_epoch(3, skip_batches=2)
    resumed = list(run)
    assert len(resumed) == len(full) - 2 == len(run) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, full[2:]))
    assert len(list(run)) == len(full)  # only the resumed pass starts late
