"""Data sets -> batches of uint8 images on the device. ``build_data`` is the one entry point."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from byot.config import DEFAULT_IMAGE_SIZE
from byot.data.batches import ONE_PROCESS, Shard, TensorBatches, batch_bounds
from byot.data.cifar import load_cifar
from byot.data.digits import load_digits
from byot.data.folder import FolderBatches, FolderIndex, find_split, index_folder
from byot.data.images import ImageSet
from byot.data.scan import scan_images, without_corrupt
from byot.errors import ByotError

log = logging.getLogger("byot.data")

# per-channel mean and std of the training images (the reference's CIFAR constants; ImageNet's)
NORMALIZATION = {
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "digits": ((0.3059,) * 3, (0.3241,) * 3),  # measured on the digits' training split at 32 px
}
DATASETS = tuple(NORMALIZATION)


class Batches(Protocol):
    num_samples: int

    def set_epoch(self, epoch: int) -> None: ...
    def global_batch_sizes(self) -> list[int]: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class DataBundle:
    """Everything training and evaluation need to know about the data."""

    train: Batches
    test: Batches
    classes: list[str]
    image_size: int  # px, square
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_counts: list[int]  # training images per class
    val: Batches | None = None  # hold-out from the training set (--val-split): selects checkpoints


def stratified_holdout(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(keep, holdout) indices: ``fraction`` of every class held out (at least one image of a class
    with two or more), drawn with a generator seeded by ``seed``; both lists sorted."""
    g = torch.Generator().manual_seed(seed + 7919)  # not the data-order stream of epoch 0
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    holdout: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        n = len(idx)
        take = min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0
        holdout += [idx[j] for j in torch.randperm(n, generator=g)[:take].tolist()]
    held = set(holdout)
    return [i for i in range(len(labels)) if i not in held], sorted(holdout)


def build_data(dataset: str, data_dir: str | None, batch_size: int, image_size: int | None, seed: int,
               device: torch.device, workers: int = 0, download: bool = False,
               eval_batch_size: int | None = None, skip_corrupt: bool = False,
               val_split: float = 0.0, shard: Shard = ONE_PROCESS, pad_fill: int = 0) -> DataBundle:
    """Load ``dataset`` and wrap both splits in epoch-wise batch iterators on ``device``.

    Image folders are scanned first: every file is decoded once, and unreadable ones stop the run
    with their paths listed, or are left out with ``skip_corrupt``.
    """
    if batch_size < 1:
        raise ByotError(f"--batch-size must be at least 1, got {batch_size}")
    eval_batch_size = eval_batch_size or batch_size
    mean, std = NORMALIZATION[dataset]
    if dataset == "imagefolder":
        root = _existing_dir(data_dir, dataset)
        size = image_size or DEFAULT_IMAGE_SIZE["imagefolder"]
        train_index = index_folder(find_split(root, ("train",)))
        test_index = index_folder(find_split(root, ("test", "val")), train_index.classes)
        train_index = _preflight(train_index, "training", workers, skip_corrupt)
        test_index = _preflight(test_index, "test", workers, skip_corrupt)
        val = None
        if val_split > 0:
            keep, held = _holdout(train_index.labels, val_split, seed)
            val_index = _pick(train_index, held)
            train_index = _pick(train_index, keep)
            val = FolderBatches(val_index, size, eval_batch_size, False, seed, device, workers, shard)
        return DataBundle(
            FolderBatches(train_index, size, batch_size, True, seed, device, workers, shard),
            FolderBatches(test_index, size, eval_batch_size, False, seed, device, workers, shard),
            train_index.classes, size, mean, std, _counts(train_index.labels, len(train_index.classes)), val)
    if dataset == "digits":
        train, test = load_digits(image_size or 32)
    elif dataset in ("cifar10", "cifar100"):
        if image_size not in (None, 32):
            raise ByotError(f"{dataset} images are 32 px; --image-size {image_size} applies to image folders")
        train, test = load_cifar(_existing_dir(data_dir, dataset, create=download), dataset, download)
    else:
        raise ByotError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    val = None
    if val_split > 0:
        keep, held = _holdout(train.labels.tolist(), val_split, seed)
        train, held_out = train.subset(torch.tensor(keep)), train.subset(torch.tensor(held, dtype=torch.long))
        val = TensorBatches(held_out, eval_batch_size, False, seed, device, shard=shard)
    return DataBundle(TensorBatches(train, batch_size, True, seed, device, shard=shard, pad_fill=pad_fill),
                      TensorBatches(test, eval_batch_size, False, seed, device, shard=shard),
                      train.classes, train.images.shape[-1], mean, std,
                      _counts(train.labels.tolist(), len(train.classes)), val)


def _holdout(labels: list[int], val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """``stratified_holdout``, refusing a hold-out of nothing: checkpoints would be chosen on no images
    (or, silently, on the test split)."""
    keep, held = stratified_holdout(labels, val_split, seed)
    if not held:
        raise ByotError(f"--val-split {val_split} holds out no image: every class has a single training image "
                        "and keeps it for training; add images or train without --val-split")
    return keep, held


def _pick(index: FolderIndex, positions: list[int]) -> FolderIndex:
    return FolderIndex([index.paths[i] for i in positions], [index.labels[i] for i in positions], index.classes)


def _counts(labels: list[int], num_classes: int) -> list[int]:
    return torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).tolist()


def _preflight(index: FolderIndex, split: str, workers: int, skip_corrupt: bool) -> FolderIndex:
    report = scan_images(index.paths, workers)
    if not report.corrupt:
        return index
    if not skip_corrupt:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in report.corrupt[:20])
        more = f"\n  ... and {len(report.corrupt) - 20} more" if len(report.corrupt) > 20 else ""
        raise ByotError(f"{len(report.corrupt)} unreadable image(s) in the {split} split; fix or remove them, "
                        f"or pass --skip-corrupt to leave them out:\n{listed}{more}")
    log.warning("--skip-corrupt: leaving out %d unreadable image(s) of the %s split", len(report.corrupt), split)
    return without_corrupt(index, report)


def _existing_dir(data_dir: str | None, dataset: str, create: bool = False) -> Path:
    if not data_dir:
        raise ByotError(f"--data-dir is required for --dataset {dataset}")
    path = Path(data_dir).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise ByotError(f"--data-dir {data_dir} does not exist or is not a folder")
    return path


__all__ = ["DATASETS", "NORMALIZATION", "Batches", "DataBundle", "ImageSet", "Shard", "batch_bounds", "build_data"]
