"""scikit-learn's bundled 8x8 handwritten digits (1,797 real scans), upscaled: the demo's data set.

It ships inside a dependency, so ``byot demo`` needs no download and no data folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from byot.data.images import ImageSet

DIGITS_TEST_SHARE = 0.2  # held out per class, fixed split


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) with values 0-16, labels (1797,)): scikit-learn's bundled digits.

    Read straight from the file scikit-learn ships (its ``load_digits`` reads the same file the same way)
    without importing ``sklearn.datasets``, which costs about 2 s per process; scikit-learn's own loader
    where the file is not where it always has been."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def load_digits(image_size: int = 32, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets: grey 8x8 scans (values 0-16) upscaled bilinearly to ``image_size``."""
    pixels, target = digits_arrays()
    images = torch.from_numpy(pixels).float().div(16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(target).long()
    g = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):  # stratified: the same share of every digit in the test split
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(len(idx) * DIGITS_TEST_SHARE)]] = True
    classes = [str(c) for c in range(10)]
    return (ImageSet(images[~test_mask], labels[~test_mask], classes),
            ImageSet(images[test_mask], labels[test_mask], classes))
