"""Epoch-wise batch iterators: images -> batches of uint8 images and labels on the device.

Every random draw (order, crops, flips) comes from a generator seeded by (seed, epoch), so an epoch
is the same whether the run was interrupted before it or not: resume needs no data-loader state.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from byot.data.images import ImageSet
from byot.data.transforms import random_crop_flip


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator for one epoch's data randomness."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def batch_bounds(num_samples: int, batch_size: int, train: bool) -> list[tuple[int, int]]:
    """[start, end) of each batch. In training a last batch of one sample joins the one before it:
    BatchNorm cannot normalise a single value, and one sample is a poor estimate of batch statistics."""
    bounds = [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
    if train and len(bounds) >= 2 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
    return bounds


def epoch_order(num_samples: int, train: bool, generator: torch.Generator) -> torch.Tensor:
    """A random permutation in training, the file order in evaluation."""
    return torch.randperm(num_samples, generator=generator) if train else torch.arange(num_samples)


class TensorBatches:
    """Batches drawn from an ImageSet held (uint8) on the training device."""

    def __init__(self, data: ImageSet, batch_size: int, train: bool, seed: int, device: torch.device,
                 crop_padding: int = 4) -> None:
        self.images = data.images.to(device)  # (N, 3, H, W) uint8
        self.labels = data.labels.to(device)  # (N,)
        self.batch_size, self.train, self.seed, self.crop_padding = batch_size, train, seed, crop_padding
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(batch_bounds(self.num_samples, self.batch_size, self.train))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.seed, self.epoch)
        order = epoch_order(self.num_samples, self.train, g).to(self.images.device)
        for start, end in batch_bounds(self.num_samples, self.batch_size, self.train):
            idx = order[start:end]
            images = self.images[idx]  # (B, 3, H, W) uint8
            if self.train:
                images = random_crop_flip(images, self.crop_padding, g)
            yield images, self.labels[idx]
