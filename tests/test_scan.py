"""The data scan on real files: broken files are found with a reason, good ones of every kind pass."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from byot.data.folder import index_folder
from byot.data.scan import (
    check_image,
    class_counts,
    format_scan,
    scan_folder,
    scan_images,
    unreadable_classes,
    without_corrupt,
)
from byot.errors import ByotError


def noise(size: int = 64, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (size, size, channels) if channels > 1 else (size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def mixed(tmp_path) -> dict[str, Path]:
    """Good files of many kinds and broken ones, each a real file in tmp_path."""
    files = {}

    def put(name: str, data: bytes) -> None:
        files[name] = tmp_path / name
        files[name].write_bytes(data)

    jpeg, png = encoded(Image.fromarray(noise()), "JPEG"), encoded(Image.fromarray(noise(seed=1)), "PNG")
    put("good.jpg", jpeg)
    put("good.png", png)
    put("deep16.png", encoded(Image.fromarray(np.arange(4096, dtype=np.uint16).reshape(64, 64) * 16), "PNG"))
    put("rgba.png", encoded(Image.fromarray(noise(channels=4, seed=2), mode="RGBA"), "PNG"))
    put("grey.bmp", encoded(Image.fromarray(noise(channels=1, seed=3)), "BMP"))
    put("good.tif", encoded(Image.fromarray(noise(seed=4)), "TIFF"))
    put("good.webp", encoded(Image.fromarray(noise(seed=5)), "WEBP"))
    put("png_named.jpg", png)  # PIL decodes by content, as training does
    put("half.jpg", jpeg[: len(jpeg) // 2])
    put("half.png", png[: len(png) // 2])
    put("text.jpg", b"this is a text file, renamed\n")
    put("empty.png", b"")
    return files


BROKEN = {"half.jpg", "half.png", "text.jpg", "empty.png"}


def test_broken_files_are_corrupt_with_a_reason_and_good_ones_pass(mixed):
    paths = list(mixed.values())
    report = scan_images(paths)
    assert report.ok == [p for p in paths if p.name not in BROKEN]
    reasons = {p.name: r for p, r in report.corrupt}
    assert list(reasons) == [p.name for p in paths if p.name in BROKEN]
    assert "truncated" in reasons["half.jpg"].lower()
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["text.jpg"].startswith("not an image")
    assert all("\n" not in r and r for r in reasons.values())


def test_truncated_real_jpeg_is_corrupt(cifar10_jpg, tmp_path):
    original = min((cifar10_jpg / "train" / "cat").iterdir())
    data = original.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert check_image(original) is None
    reason = check_image(cut)
    assert reason is not None and "truncated" in reason.lower()


def test_truncated_files_stay_corrupt_when_pil_was_told_to_accept_them(mixed, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(mixed["half.jpg"]) as image:
        image.load()  # the setting does hide the damage from a plain decode
    report = scan_images([mixed["half.jpg"], mixed["half.png"], mixed["good.jpg"]])
    assert [p.name for p, _ in report.corrupt] == ["half.jpg", "half.png"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_decompression_bomb_is_corrupt_and_the_limit_is_not_changed(mixed, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000: an error
    report = scan_images([mixed["good.png"]])
    assert report.ok == []
    assert report.corrupt[0][1].startswith("decompression bomb")
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_workers_give_the_same_report_in_the_given_order(mixed):
    paths = list(mixed.values())
    order = np.random.default_rng(0).permutation(len(paths))
    shuffled = [paths[i] for i in order] * 2  # repeated: more items than one chunk per worker
    serial, parallel = scan_images(shuffled, workers=0), scan_images(shuffled, workers=2)
    assert parallel == serial
    assert serial.ok == [p for p in shuffled if p.name not in BROKEN]
    assert [p for p, _ in serial.corrupt] == [p for p in shuffled if p.name in BROKEN]


@pytest.fixture
def data_root(cifar10_jpg, tmp_path) -> Path:
    """A copy of the real CIFAR-10 JPEG folder with one truncated train image in cat/."""
    root = tmp_path / "data"
    shutil.copytree(cifar10_jpg, root)
    victim = sorted((root / "train" / "cat").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:300])
    return root


def test_scan_folder_reports_every_split_and_the_broken_file(data_root):
    reports = scan_folder(data_root)
    assert list(reports) == ["train", "test"]
    train, test = reports["train"], reports["test"]
    victim = sorted((data_root / "train" / "cat").iterdir())[3]
    assert [p for p, _ in train.corrupt] == [victim]
    assert len(train.ok) == 119 and len(test.ok) == 40 and test.corrupt == []
    counts = class_counts(train)
    assert counts["cat"] == (11, 1) and counts["dog"] == (12, 0) and len(counts) == 10
    assert unreadable_classes(train) == []
    text = format_scan(reports)
    assert "train: 120 images, 119 readable, 1 corrupt" in text
    assert f"corrupt: {victim}: " in text and "test: 40 images, 40 readable, 0 corrupt" in text
    assert scan_folder(data_root / "test").keys() == {"test"}  # one split folder on its own


def test_without_corrupt_drops_bad_files_and_refuses_an_unreadable_class(data_root):
    index = index_folder(data_root / "train")
    report = scan_folder(data_root)["train"]
    clean = without_corrupt(index, report)
    assert len(clean.paths) == 119 and clean.classes == index.classes
    assert all(index.classes[label] == p.parent.name for p, label in zip(clean.paths, clean.labels))
    for p in (data_root / "train" / "dog").iterdir():
        p.write_bytes(b"not a jpeg")
    report = scan_images(index.paths)
    assert unreadable_classes(report) == [data_root / "train" / "dog"]
    with pytest.raises(ByotError, match=r"train/dog has no readable image"):
        without_corrupt(index, report)


def test_scan_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(ByotError, match="missing.*does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ByotError, match="flat holds no class folders"):
        scan_folder(tmp_path / "flat")
