"""Image transforms shared by the data sets: seed 004's pad-crop + flip augmentation and normalisation."""
from __future__ import annotations

import torch
from torchvision.transforms import v2


def image_transform(size: int, mean, std, *, augment: bool, pad: int, flip: bool) -> v2.Compose:
    """uint8 image (PIL or tensor) -> normalised float CHW tensor; random pad-crop (+ flip) when augment."""
    steps = [v2.ToImage()]
    if augment:
        steps.append(v2.RandomCrop(size, padding=pad))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, *normalise(mean, std).transforms])


def normalise(mean, std) -> v2.Compose:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std per channel: the last steps of every data set's transform."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def without_normalise(transform: v2.Compose) -> v2.Compose:
    """`transform` up to its `normalise` steps: what it makes of an image as uint8 (resized, cropped)."""
    steps = transform.transforms
    assert [type(t) for t in steps[-2:]] == [v2.ToDtype, v2.Normalize], steps
    return v2.Compose(steps[:-2])


def input_lut(mean, std) -> torch.Tensor:
    """(channels, 256) float32: what `normalise` makes of each pixel code, channel by channel. An element-wise
    transform, so a table of it gives the loader's floats bit for bit."""
    codes = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(len(mean), 1, 256)
    return normalise(mean, std)(codes).view(len(mean), 256)


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W) with int labels, transformed on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images, self.targets, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.targets[i])
