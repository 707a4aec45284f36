"""Epoch-wise batch iterators: images -> batches of uint8 images and labels on the device.

Every random draw (order, crops, flips) comes from a generator seeded by (seed, epoch), so an epoch
is the same whether the run was interrupted before it or not: resume needs no data-loader state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from byot.data.images import ImageSet
from byot.data.transforms import apply_crop_flip, draw_crop_flip


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator for one epoch's data randomness."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass(frozen=True)
class Shard:
    """This process's part of every batch under torchrun: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    def part(self, n: int) -> tuple[int, int]:
        """[lo, hi) of a batch of ``n`` samples: contiguous parts whose sizes differ by at most one."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world


ONE_PROCESS = Shard()  # the whole of every batch: no torchrun


def batch_bounds(num_samples: int, batch_size: int, train: bool) -> list[tuple[int, int]]:
    """[start, end) of each (global) batch. In training a last batch smaller than half a batch (at least a
    single sample) joins the one before it: BatchNorm cannot normalise a single value, a tiny batch is a
    poor estimate of batch statistics, and under torchrun every process then gets at least a quarter of
    its usual part. The rule does not depend on the number of processes, so 1 or N take the same steps."""
    bounds = [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
    if train and len(bounds) >= 2 and bounds[-1][1] - bounds[-1][0] < max(2, batch_size // 2):
        bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
    return bounds


def epoch_order(num_samples: int, train: bool, generator: torch.Generator) -> torch.Tensor:
    """A random permutation in training, the file order in evaluation."""
    return torch.randperm(num_samples, generator=generator) if train else torch.arange(num_samples)


class TensorBatches:
    """Batches drawn from an ImageSet held (uint8) on the training device.

    Under torchrun every process draws the same global batches and the same crops and flips, and keeps
    its ``shard``'s part: together the processes see exactly the batches one process would.
    """

    def __init__(self, data: ImageSet, batch_size: int, train: bool, seed: int, device: torch.device,
                 crop_padding: int = 4, shard: Shard = ONE_PROCESS, pad_fill: int = 0) -> None:
        self.images = data.images.to(device)  # (N, 3, H, W) uint8
        self.labels = data.labels.to(device)  # (N,)
        self.batch_size, self.train, self.seed, self.crop_padding = batch_size, train, seed, crop_padding
        self.shard, self.pad_fill = shard, pad_fill  # pad_fill: the grey level of the crop's padding
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batch_sizes(self) -> list[int]:
        """Samples of each batch over all processes (this process holds its shard's part of each)."""
        return [e - s for s, e in batch_bounds(self.num_samples, self.batch_size, self.train)]

    def __len__(self) -> int:
        return len(batch_bounds(self.num_samples, self.batch_size, self.train))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.seed, self.epoch)
        order = epoch_order(self.num_samples, self.train, g).to(self.images.device)
        for start, end in batch_bounds(self.num_samples, self.batch_size, self.train):
            if self.train:
                offsets, flip = draw_crop_flip(end - start, self.crop_padding, g)  # for the whole global batch
            lo, hi = self.shard.part(end - start)
            if lo == hi:  # an evaluation batch smaller than the number of processes: nothing here
                continue
            idx = order[start + lo:start + hi]
            images = self.images[idx]  # (B, 3, H, W) uint8
            if self.train:
                images = apply_crop_flip(images, self.crop_padding, None if offsets is None else offsets[lo:hi],
                                         flip[lo:hi], self.pad_fill)
            yield images, self.labels[idx]
