"""byot split on real files: stratified counts, seeded and order-free, SRC untouched, nothing outside DST."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from byot.data import split as split_module
from byot.data.folder import index_folder
from byot.data.split import assign_split, format_split_table, n_test, split_folder
from byot.errors import ByotError


def write_image(path: Path, seed: int, size: int = 8) -> Path:
    """A small real image of random pixels in the format the suffix names (contents differ by seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_tree(root: Path, sizes: dict[str, int], order: str = "forward") -> Path:
    """root/<class>/<i>.png with ``sizes[class]`` images each, created in the given order."""
    jobs = [(c, i) for c, n in sizes.items() for i in range(n)]
    if order == "reverse":
        jobs.reverse()
    for c, i in jobs:
        write_image(root / c / f"{i:03d}.png", seed=int(hashlib.sha256(f"{c}/{i}".encode()).hexdigest()[:8], 16))
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every entry below root (links not followed) -> content hash, link target or 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
    return out


def listing(dst: Path) -> dict[str, dict[str, list[str]]]:
    """What DST holds on disk: split -> class -> sorted file names."""
    return {s: {c.name: sorted(f.name for f in c.iterdir()) for c in sorted((dst / s).iterdir())}
            for s in ("train", "test")}


def test_real_jpegs_are_split_stratified_and_readable(cifar10_jpg, tmp_path):
    src, dst = cifar10_jpg / "train", tmp_path / "out"
    report = split_folder(src, dst, test_ratio=0.2, seed=0)
    classes = sorted(p.name for p in src.iterdir())
    assert len(classes) == 10
    assert report.classes == {c: (10, 2) for c in classes}  # 12 * 0.2 = 2.4 -> 2 test images
    on_disk = listing(dst)
    assert on_disk == report.files
    for c in classes:
        train, test = set(on_disk["train"][c]), set(on_disk["test"][c])
        assert not train & test
        assert train | test == {p.name for p in (src / c).iterdir()}
        for split, names in (("train", train), ("test", test)):
            for name in names:
                assert (dst / split / c / name).read_bytes() == (src / c / name).read_bytes()
    # the result is what byot's image-folder reader expects
    assert index_folder(dst / "test", index_folder(dst / "train").classes).classes == classes


@pytest.mark.parametrize("ratio, expected", [
    (0.1, {"c01": (1, 0), "c02": (1, 1), "c03": (2, 1), "c05": (4, 1), "c07": (6, 1), "c10": (9, 1)}),
    (0.5, {"c01": (1, 0), "c02": (1, 1), "c03": (1, 2), "c05": (3, 2), "c07": (3, 4), "c10": (5, 5)}),
    (0.9, {"c01": (1, 0), "c02": (1, 1), "c03": (1, 2), "c05": (1, 4), "c07": (1, 6), "c10": (1, 9)}),
])
def test_counts_are_rounded_ratio_clamped_per_class(tmp_path, ratio, expected):
    # 0.5: 1.5 -> 2, 2.5 -> 2, 3.5 -> 4 (halves to even); 0.9 * 10 = 9 but 0.9 * 7 = 6.3 -> 6
    src = make_tree(tmp_path / "src", {c: int(c[1:]) for c in expected})
    report = split_folder(src, tmp_path / "out", test_ratio=ratio, seed=3)
    assert report.classes == expected
    counts = {c: (len(report.files["train"][c]), len(report.files["test"][c])) for c in expected}
    assert counts == expected
    assert (tmp_path / "out" / "test" / "c01").is_dir()  # kept so both splits list the same classes
    assert not any((tmp_path / "out" / "test" / "c01").iterdir())


def test_n_test_rule():
    assert [n_test(n, 0.2) for n in (0, 1, 2, 3, 7, 8, 12, 13)] == [0, 0, 1, 1, 1, 2, 2, 3]
    assert n_test(4, 0.99) == 3 and n_test(4, 0.01) == 1


def test_same_seed_same_split_whatever_the_creation_order(tmp_path):
    sizes = {"cat": 9, "dog": 7, "emu": 12}
    a = make_tree(tmp_path / "a", sizes)
    b = make_tree(tmp_path / "b", sizes, order="reverse")
    # renamed away and back: new directory order and inodes, same names
    for p in sorted((b / "dog").iterdir()):
        p.rename(p.with_name("tmp-" + p.name))
    for p in sorted((b / "dog").iterdir(), reverse=True):
        p.rename(p.with_name(p.name.removeprefix("tmp-")))
    ra = split_folder(a, tmp_path / "out_a", test_ratio=0.3, seed=7)
    rb = split_folder(b, tmp_path / "out_b", test_ratio=0.3, seed=7)
    assert ra.files == rb.files
    assert listing(tmp_path / "out_a") == listing(tmp_path / "out_b")
    other = split_folder(a, tmp_path / "out_c", test_ratio=0.3, seed=8)
    assert other.classes == ra.classes and other.files != ra.files


def test_split_is_pinned_across_versions():
    # golden values: a change to the hashing would silently re-split every user's data set
    names = [f"{i}.png" for i in range(10)]
    train, test = assign_split(names, seed=0, class_name="cat", test_ratio=0.3)
    assert test == ["2.png", "7.png", "8.png"]
    assert train == sorted(set(names) - set(test))
    assert assign_split(list(reversed(names)), 0, "cat", 0.3) == (train, test)
    assert assign_split(names, 0, "dog", 0.3)[1] != test  # classes with the same file names differ
    # a name stored decomposed (macOS) splits as the composed one does
    # (unnormalised, seed 0 would send b.png to test in one spelling and café.png in the other)
    assert assign_split(["caf\u00e9.png", "b.png"], 0, "\u00e9t\u00e9", 0.5) == (["caf\u00e9.png"], ["b.png"])
    assert assign_split(["cafe\u0301.png", "b.png"], 0, "e\u0301te\u0301", 0.5) == (["cafe\u0301.png"], ["b.png"])


@pytest.mark.parametrize("mode", ["copy", "hardlink", "symlink"])
def test_src_unchanged_and_files_equal_the_source(tmp_path, mode):
    src = make_tree(tmp_path / "src", {"cat": 5, "dog": 4})
    (src / "cat" / "notes.txt").write_text("not an image")
    before = snapshot(src)
    dst = tmp_path / "out"
    report = split_folder(src, dst, test_ratio=0.25, seed=1, mode=mode)
    assert snapshot(src) == before
    for split, by_class in report.files.items():
        for c, names in by_class.items():
            for name in names:
                made, source = dst / split / c / name, src / c / name
                assert made.read_bytes() == source.read_bytes()
                assert made.is_symlink() == (mode == "symlink")
                assert os.path.samefile(made, source) == (mode != "copy")
                if mode == "symlink":
                    assert os.readlink(made) == str(source.resolve())


def test_hardlink_refused_by_the_file_system_is_a_clear_error(tmp_path, monkeypatch):
    def cross_device(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setitem(split_module.PLACERS, "hardlink", cross_device)
    src = make_tree(tmp_path / "src", {"cat": 3})
    with pytest.raises(ByotError, match="--mode copy"):
        split_folder(src, tmp_path / "out", mode="hardlink")
    assert not (tmp_path / "out" / "split.json").exists()  # never marked finished


def test_non_empty_dst_needs_force_and_force_replaces_only_the_split(tmp_path):
    src = make_tree(tmp_path / "src", {"cat": 6, "dog": 6})
    dst = tmp_path / "out"
    write_image(dst / "train" / "cat" / "stale.png", seed=99)  # left by an earlier split
    (dst / "notes.md").write_text("mine")
    with pytest.raises(ByotError, match="not empty.*--force"):
        split_folder(src, dst)
    assert (dst / "train" / "cat" / "stale.png").exists() and not (dst / "split.json").exists()
    split_folder(src, dst, seed=0, force=True)
    first = listing(dst)
    report = split_folder(src, dst, seed=1, force=True)  # a new seed: nothing of the old split survives
    assert listing(dst) == report.files != first
    for c in ("cat", "dog"):
        assert not set(report.files["train"][c]) & set(report.files["test"][c])
    assert (dst / "notes.md").read_text() == "mine"


def test_dst_inside_src_or_src_inside_dst_split_is_refused(tmp_path):
    src = make_tree(tmp_path / "src", {"cat": 3})
    before = snapshot(src)
    for dst in (src, src / "out", src / "cat" / "deeper"):
        with pytest.raises(ByotError, match="inside"):
            split_folder(src, dst)
    inner = make_tree(tmp_path / "data" / "train" / "raw", {"cat": 3})
    with pytest.raises(ByotError, match="inside"):
        split_folder(inner, tmp_path / "data", force=True)  # --force would replace data/train = SRC
    assert snapshot(src) == before
    assert len(list((inner / "cat").iterdir())) == 3


def test_symlinks_out_of_src_are_skipped_not_followed(tmp_path):
    outside = tmp_path / "outside"
    secret = write_image(outside / "secret.png", seed=42)
    for i in range(3):
        write_image(outside / "intruders" / f"{i}.png", seed=100 + i)
    src = make_tree(tmp_path / "src", {"cat": 4})
    (src / "cat" / "escape.png").symlink_to(secret)
    (src / "intruders").symlink_to(outside / "intruders", target_is_directory=True)
    (src / "cat" / "alias.png").symlink_to(src / "cat" / "000.png")  # inside SRC but a second name
    before_outside = snapshot(outside)
    dst = tmp_path / "out"
    report = split_folder(src, dst, test_ratio=0.5)
    assert set(report.classes) == {"cat"}
    assert not (dst / "train" / "intruders").exists() and not (dst / "test" / "intruders").exists()
    assert {"cat/escape.png", "intruders", "cat/alias.png"} <= set(report.skipped)
    assert any(r.startswith("cat/escape.png: symlink to") for r in report.refused)
    assert any(r.startswith("intruders: symlink to") for r in report.refused)
    assert "cat/alias.png: same file as cat/000.png" in report.refused
    made = [p.read_bytes() for p in dst.rglob("*.png")]
    assert len(made) == 4 and secret.read_bytes() not in made
    assert snapshot(outside) == before_outside


def test_hidden_non_image_and_empty_class_entries_are_skipped_and_listed(tmp_path):
    src = make_tree(tmp_path / "src", {"cat": 3, "dog": 2})
    write_image(src / "cat" / ".hidden.png", seed=5)
    (src / "cat" / "notes.txt").write_text("x")
    (src / "dog" / "Thumbs.db").write_bytes(b"\0" * 10)
    (src / "README.md").write_text("x")
    (src / ".git").mkdir()
    (src / "empty").mkdir()
    (src / "words").mkdir()
    (src / "words" / "list.csv").write_text("a,b")
    report = split_folder(src, tmp_path / "out")
    assert report.skipped == [".git/", "README.md", "cat/.hidden.png", "cat/notes.txt", "dog/Thumbs.db",
                              "empty/", "words/list.csv", "words/"]
    assert report.refused == []
    assert set(report.classes) == {"cat", "dog"}
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == sorted(
        ["000.png", "001.png", "002.png", "000.png", "001.png", "split.json"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_special_files_with_image_names_are_refused(tmp_path):
    src = make_tree(tmp_path / "src", {"cat": 3})
    os.mkfifo(src / "cat" / "pipe.png")  # copying it would block forever
    (src / "cat" / "album.jpg").mkdir()
    report = split_folder(src, tmp_path / "out")
    assert report.classes == {"cat": (2, 1)}
    assert report.refused == ["cat/album.jpg: not a regular file", "cat/pipe.png: not a regular file"]


def test_every_image_format_is_split(tmp_path):
    src = tmp_path / "src"
    for i, suffix in enumerate((".png", ".bmp", ".tif", ".webp", ".jpg", ".JPEG")):
        write_image(src / "mixed" / f"img{i}{suffix}", seed=i)
    deep = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(deep).save(src / "mixed" / "deep16.png")  # 16-bit grey
    report = split_folder(src, tmp_path / "out", test_ratio=0.3)
    assert report.classes == {"mixed": (5, 2)}
    assert report.skipped == []


def test_split_json_records_the_split(tmp_path):
    src = make_tree(tmp_path / "src", {"cat": 4, "dog": 3, "café": 2})
    (src / "dog" / "x.txt").write_text("x")
    dst = tmp_path / "out"
    report = split_folder(src, dst, test_ratio=0.4, seed=11, mode="symlink")
    assert report.manifest == dst.resolve() / "split.json"
    data = json.loads(report.manifest.read_text())
    assert {k: data[k] for k in ("seed", "test_ratio", "mode", "source")} == {
        "seed": 11, "test_ratio": 0.4, "mode": "symlink", "source": str(src.resolve())}
    assert data["classes"] == {"café": {"train": 1, "test": 1}, "cat": {"train": 2, "test": 2},
                               "dog": {"train": 2, "test": 1}}
    assert data["files"] == listing(dst)
    assert data["skipped"] == ["dog/x.txt"]


@pytest.mark.parametrize("kwargs, message", [
    ({"test_ratio": 0.0}, "between 0 and 1"),
    ({"test_ratio": 1.0}, "between 0 and 1"),
    ({"test_ratio": -0.2}, "between 0 and 1"),
    ({"test_ratio": float("nan")}, "between 0 and 1"),
    ({"mode": "move"}, "copy, hardlink, symlink"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    src = make_tree(tmp_path / "src", {"cat": 3})
    with pytest.raises(ByotError, match=message):
        split_folder(src, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_or_classless_src_names_it(tmp_path):
    with pytest.raises(ByotError, match="nowhere.*does not exist"):
        split_folder(tmp_path / "nowhere", tmp_path / "out")
    flat = tmp_path / "flat"
    write_image(flat / "a.png", seed=1)
    with pytest.raises(ByotError, match="flat holds no class folder"):
        split_folder(flat, tmp_path / "out")
    done = tmp_path / "done"
    write_image(done / "train" / "cat" / "a.png", seed=1)
    with pytest.raises(ByotError, match="already split"):
        split_folder(done, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_format_split_table(tmp_path):
    src = make_tree(tmp_path / "src", {"cat": 5, "dog": 4})
    for i in range(12):
        (src / "cat" / f"n{i:02d}.txt").write_text("x")
    text = format_split_table(split_folder(src, tmp_path / "out", test_ratio=0.2))
    lines = text.splitlines()
    assert lines[0].split() == ["class", "train", "test", "total"]
    assert lines[1].split() == ["cat", "4", "1", "5"]
    assert lines[2].split() == ["dog", "3", "1", "4"]
    assert lines[3].split() == ["total", "7", "2", "9"]
    assert lines[4].startswith("skipped 12: cat/n00.txt, ") and lines[4].endswith("cat/n09.txt (and 2 more)")
    assert "cat/n10.txt" not in text


def test_class_symlink_inside_src_brings_no_image_twice(tmp_path):
    # kitty -> cat: followed (it stays inside SRC), but each image is split once, under cat
    src = make_tree(tmp_path / "src", {"cat": 4})
    (src / "kitty").symlink_to(src / "cat", target_is_directory=True)
    report = split_folder(src, tmp_path / "out")
    assert set(report.classes) == {"cat"}
    assert "kitty/" in report.skipped
    assert sum(1 for r in report.refused if r.startswith("kitty/") and "same file as cat/" in r) == 4
