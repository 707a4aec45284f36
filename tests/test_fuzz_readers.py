"""Property tests of the readers: whatever bytes a file holds, the answer is a clean error or a correct result.

Random bytes (some behind real image signatures) as image files, real images of random size, mode and
format, and random pickles as CIFAR files. A reader may refuse (ByotError, or a reason from the scan);
it must not raise anything else or hand back a malformed image.
"""

from __future__ import annotations

import contextlib
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from byot.cli import main
from byot.data.cifar import load_cifar
from byot.data.folder import IMAGE_EXTENSIONS, to_rgb
from byot.data.scan import check_image
from byot.deploy.predict import read_image
from byot.errors import ByotError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIGNATURES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP"]
SUFFIXES = [".png", ".jpg", ".gif", ".bmp", ".tif", ".webp"]


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A fresh folder per example (hypothesis runs many examples in one test call), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="byot-fuzz-") as folder:
        yield Path(folder)


@FUZZ
@given(head=st.sampled_from(SIGNATURES), body=st.binary(max_size=2048), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_as_an_image_file(head, body, suffix):
    with _workdir() as folder:
        path = folder / f"x{suffix}"
        path.write_bytes(head + body)
        reason = check_image(path)
        assert reason is None or (isinstance(reason, str) and reason)
        try:
            image = read_image(path, 16, 1.0)
        except ByotError as e:
            assert str(path) in str(e)
            return
        assert image.dtype.is_floating_point is False and tuple(image.shape) == (3, 16, 16)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK"]
FORMATS = {".png": "PNG", ".tif": "TIFF", ".bmp": "BMP", ".jpg": "JPEG", ".webp": "WEBP"}


@FUZZ
@given(mode=st.sampled_from(MODES), width=st.integers(1, 48), height=st.integers(1, 48),
       suffix=st.sampled_from(list(FORMATS)), seed=st.integers(0, 2**16))
def test_real_images_of_any_size_mode_and_format(mode, width, height, suffix, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode in ("I;16", "I", "F"):
        image = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16 if mode == "I;16"
                                                                               else np.int32 if mode == "I"
                                                                               else np.float32))
    else:
        image = image.convert(mode)
    with _workdir() as folder:
        path = folder / f"x{suffix}"
        try:
            image.save(path, FORMATS[suffix])
        except (OSError, ValueError, KeyError):
            return  # PIL cannot write this mode in this format: not a file a user could have
        assert check_image(path) is None  # a valid file is never reported corrupt
        with Image.open(path) as raw:
            rgb = to_rgb(raw)
        assert rgb.mode == "RGB" and rgb.size == (width, height)
        tensor = read_image(path, 16, 1.0)
        assert tuple(tensor.shape) == (3, 16, 16)


def _arrays() -> st.SearchStrategy:
    dtypes = st.sampled_from([np.uint8, np.int64, np.float32, np.int8, np.uint16])
    shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
    return st.builds(lambda d, s, seed: np.random.default_rng(seed).integers(0, 255, s).astype(d), dtypes, shapes,
                     st.integers(0, 1000))


VALUES = st.recursive(st.none() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5)
                      | st.binary(max_size=5) | _arrays(),
                      lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=5) | st.binary(max_size=5), children, max_size=3),
                      max_leaves=8)


def _cifar_like() -> st.SearchStrategy:
    """A dict with the keys a CIFAR file has, holding anything: near misses reach the deepest checks."""
    rows = st.integers(0, 3)
    good_data = rows.map(lambda n: np.zeros((n, 3072), np.uint8))
    data = good_data | _arrays() | VALUES
    labels = st.lists(st.integers(-2, 120), max_size=4) | VALUES
    return st.fixed_dictionaries({"data": data, "fine_labels": labels, "coarse_labels": labels})


@FUZZ
@given(train=_cifar_like() | VALUES, test=_cifar_like() | VALUES, meta=VALUES,
       raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_random_pickles_as_cifar_files(train, test, meta, raw):
    with _workdir() as root:
        folder = root / "cifar-100-python"
        folder.mkdir()
        (folder / "train").write_bytes(raw if raw is not None else pickle.dumps(train, protocol=2))
        (folder / "test").write_bytes(pickle.dumps(test, protocol=2))
        (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
        try:
            train_set, test_set = load_cifar(root, "cifar100")
        except ByotError:
            return
        for split in (train_set, test_set):
            assert split.images.dtype.is_floating_point is False and tuple(split.images.shape[1:]) == (3, 32, 32)
            assert len(split.labels) == len(split.images) and len(split.classes) == 100
            assert all(0 <= int(y) < 100 for y in split.labels)


@pytest.mark.parametrize("seed", range(3))
def test_check_data_lists_junk_files_without_a_traceback(seed, tmp_path, capsys):
    rng = np.random.default_rng(seed)
    junk = []
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "good.png")
            head = SIGNATURES[int(rng.integers(len(SIGNATURES)))]
            junk.append(folder / f"junk{SUFFIXES[int(rng.integers(len(SUFFIXES)))]}")
            junk[-1].write_bytes(head + rng.bytes(int(rng.integers(0, 500))))
    code = main(["check-data", str(tmp_path)])
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert code == 1  # at least one junk file has an image suffix here
    assert "Traceback" not in said
    for path in junk:  # files with an image suffix are reported corrupt; others are not images to byot
        assert (f"corrupt: {path}" in said) == (path.suffix in IMAGE_EXTENSIONS)
    assert "good.png" not in said
