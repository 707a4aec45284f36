"""Data readers on real files, and the batch iterators' promises (coverage, no 1-sample batches, seeds)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from byot.data import batch_bounds, build_data
from byot.data.batches import TensorBatches
from byot.data.cifar import load_cifar
from byot.data.digits import digits_arrays, load_digits
from byot.data.folder import FolderBatches, index_folder, to_rgb
from byot.data.images import ImageSet
from byot.data.transforms import normalize, random_crop_flip
from byot.errors import ByotError


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 17, 100])
@pytest.mark.parametrize("bs", [1, 2, 8, 16])
def test_batch_bounds_cover_everything_once(n, bs):
    for train in (True, False):
        bounds = batch_bounds(n, bs, train)
        covered = [i for s, e in bounds for i in range(s, e)]
        assert covered == list(range(n))
        if train and bs > 1 and n > 1:
            assert all(e - s >= 2 for s, e in bounds), bounds  # no single-sample training batch
        if train and len(bounds) > 1:
            assert all(e - s >= bs // 2 for s, e in bounds), bounds  # no batch under half a batch
        if not train:
            assert all(e - s <= bs for s, e in bounds)


def test_random_crop_flip_matches_per_sample_crops():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(5))
    # the same draws, replayed, applied one sample at a time with plain slicing
    g = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 5, (6, 2), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for b in range(6):
        oy, ox = offsets[b].tolist()
        crop = padded[b, :, oy:oy + 8, ox:ox + 8]
        if flips[b]:
            crop = crop.flip(2)
        assert torch.equal(out[b], crop)


def test_normalize():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = normalize(x, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.5, 1.0]))
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_tensor_batches_are_seeded_per_epoch():
    data = ImageSet(torch.randint(0, 256, (21, 3, 8, 8), dtype=torch.uint8), torch.arange(21) % 3, ["a", "b", "c"])
    a = TensorBatches(data, 8, True, seed=1, device=torch.device("cpu"))
    b = TensorBatches(data, 8, True, seed=1, device=torch.device("cpu"))
    first = [y for _, y in a]
    assert [torch.equal(x, y) for x, y in zip(first, [y for _, y in b])] == [True] * len(first)
    a.set_epoch(1)
    assert not all(torch.equal(x, y) for x, y in zip(first, [y for _, y in a]))
    assert sorted(torch.cat(first).tolist()) == sorted(data.labels.tolist())
    test = TensorBatches(data, 8, False, seed=1, device=torch.device("cpu"))
    assert torch.equal(torch.cat([x for x, _ in test]), data.images)  # evaluation: file order, no augmentation


def test_cifar100_reader_on_real_data(cifar100_small, cifar100_full):
    train, test = load_cifar(cifar100_small, "cifar100")
    assert train.images.shape == (300, 3, 32, 32) and test.images.shape == (101, 3, 32, 32)
    assert train.classes[:3] == ["apple", "aquarium_fish", "baby"] and len(train.classes) == 100
    raw = cifar100_full["train"]
    assert train.labels[:10].tolist() == raw["fine_labels"][:10]
    # pixel (row 0, col 1) of image 0 in each channel: the pickle stores 1024 R, then G, then B values
    assert train.images[0, :, 0, 1].tolist() == [raw["data"][0][1], raw["data"][0][1025], raw["data"][0][2049]]
    # the folder itself works as --data-dir too
    assert len(load_cifar(cifar100_small / "cifar-100-python", "cifar100")[0]) == 300


def test_cifar10_reader_with_bytes_keys(tmp_path, cifar10_jpg):
    # The original CIFAR-10 pickles come from Python 2 with bytes keys; build one from the real JPEGs.
    classes = sorted(p.name for p in (cifar10_jpg / "train").iterdir())
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((cifar10_jpg / "train" / name).iterdir())[:2]:
            rows.append(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).reshape(-1))
            labels.append(label)
    batch = {b"data": np.stack(rows), b"labels": labels}
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in classes]}))
    train, test = load_cifar(tmp_path, "cifar10")
    assert len(train) == 100 and len(test) == 20 and train.classes == classes
    assert torch.equal(train.images[0].permute(1, 2, 0), torch.from_numpy(rows[0].reshape(3, 32, 32).transpose(1, 2, 0)))


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "train").write_bytes(pickle.dumps({"data": Evil()}))
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(ByotError, match="not a CIFAR pickle"):
        load_cifar(tmp_path, "cifar100")


def test_missing_cifar_folder_names_the_fix(tmp_path):
    with pytest.raises(ByotError, match="cifar-100-python/train"):
        load_cifar(tmp_path, "cifar100")


def test_digits_are_scikit_learns_own():
    # read from scikit-learn's file without importing sklearn.datasets (2 s per process): the same arrays
    from sklearn.datasets import load_digits as sk_load_digits

    images, labels = digits_arrays()
    bunch = sk_load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)


def test_digits_split_is_stratified():
    train, test = load_digits(16)
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (3, 16, 16)
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # ~20% of each digit's 174-183 scans


def test_image_folder_reads_real_jpegs(cifar10_jpg):
    data = build_data("imagefolder", str(cifar10_jpg), 8, 32, 0, torch.device("cpu"), workers=0)
    assert data.classes == sorted(p.name for p in (cifar10_jpg / "train").iterdir())
    assert data.train.num_samples == 120 and data.test.num_samples == 40
    images, labels = next(iter(data.test))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    sizes = [len(y) for _, y in data.train]
    assert sum(sizes) == 120 and min(sizes) >= 2


def test_folder_batches_repeat_for_a_seed_with_workers(cifar10_jpg):
    index = index_folder(cifar10_jpg / "train")
    runs = []
    for workers in (0, 2):
        b = FolderBatches(index, 24, 16, True, seed=3, device=torch.device("cpu"), workers=workers)
        b.set_epoch(2)
        runs.append(torch.cat([x for x, _ in b]))
    assert torch.equal(runs[0], runs[1])


def test_folder_class_mismatch_is_named(tmp_path, cifar10_jpg):
    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat", "frog"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            src = next((cifar10_jpg / "train" / c).iterdir())
            (tmp_path / split / c / src.name).write_bytes(src.read_bytes())
    with pytest.raises(ByotError, match=r"missing \['dog'\].*extra \['frog'\]"):
        build_data("imagefolder", str(tmp_path), 4, 32, 0, torch.device("cpu"))


def test_empty_class_folder_is_named(tmp_path):
    (tmp_path / "train" / "empty").mkdir(parents=True)
    (tmp_path / "train" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ByotError, match="empty holds no images"):
        index_folder(tmp_path / "train")


def test_modes_become_8bit_rgb():
    gray16 = Image.fromarray(np.array([[0, 65535], [32768, 256]], dtype=np.uint16))
    rgb = np.asarray(to_rgb(gray16))
    assert rgb.shape == (2, 2, 3) and rgb[0, 1, 0] == 255 and rgb[1, 0, 0] == 128 and rgb[1, 1, 0] == 1
    rgba = Image.new("RGBA", (2, 2), (200, 100, 50, 0))  # fully transparent -> black background
    assert np.asarray(to_rgb(rgba)).max() == 0
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [10, 20, 30]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert to_rgb(raw).size == (2, 4)
