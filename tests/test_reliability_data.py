"""The data path's answers to the reliability issue, on real files and real processes: links that bring one
image twice, splits made of links, interrupted splits, empty hold-outs and test splits, and stopping a
parallel scan or a DataLoader worker with a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byot.data import build_data
from byot.data import split as split_module
from byot.data.folder import FolderBatches, index_folder
from byot.data.images import ImageSet
from byot.data.scan import scan_folder, scan_images
from byot.data.split import split_folder
from byot.errors import ByotError

CPU = torch.device("cpu")


def write_image(path: Path, seed: int, size: int = 8) -> Path:
    """A small real PNG of random pixels (contents differ by seed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def make_classes(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """root/<class>/<i>.png with ``sizes[class]`` images each; an entry of 0 makes an empty folder."""
    for k, (name, n) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / name / f"{i:03d}.png", seed=seed + 100 * k + i)
    return root


def load(root: Path, **kwargs):
    return build_data("imagefolder", str(root), 4, 16, 0, CPU, **kwargs)


# 1. one folder or one file under two names ---------------------------------------------------------------

def test_a_class_folder_that_links_to_another_class_is_refused_naming_both(tmp_path):
    root = tmp_path / "data"
    make_classes(root / "train", {"cat": 3})
    (root / "train" / "dog").symlink_to(root / "train" / "cat", target_is_directory=True)
    make_classes(root / "test", {"cat": 1, "dog": 1})
    with pytest.raises(ByotError, match=r"class folders .*cat and .*dog .*same folder"):
        index_folder(root / "train")
    with pytest.raises(ByotError, match="same folder"):
        load(root)


def test_second_names_of_one_file_are_listed_once_with_a_warning(tmp_path, caplog):
    train = make_classes(tmp_path / "train", {"cat": 2, "dog": 2})
    os.link(train / "cat" / "000.png", train / "dog" / "hard.png")  # a hard link: same inode
    (train / "dog" / "soft.png").symlink_to(train / "cat" / "001.png")  # a link that stays inside the split
    (train / "cat" / "002.png").symlink_to(train / "cat" / "000.png")  # a second name in the same class
    index = index_folder(train)
    assert [str(p.relative_to(train)) for p in index.paths] == ["cat/000.png", "cat/001.png", "dog/000.png",
                                                                 "dog/001.png"]
    assert index.labels == [0, 0, 1, 1]
    assert "dog/hard.png: same file as" in caplog.text and "cat/000.png" in caplog.text
    assert "dog/soft.png: same file as" in caplog.text and "cat/002.png: same file as" in caplog.text


# 2. a split made with --mode symlink is readable, and only its own links are followed --------------------

def test_a_symlink_split_is_read_by_training_and_check_data(tmp_path, caplog):
    src = make_classes(tmp_path / "src", {"cat": 5, "dog": 4})
    dst = tmp_path / "split"
    report = split_folder(src, dst, test_ratio=0.25, mode="symlink")
    assert all(p.is_symlink() for p in (dst / "train" / "cat").iterdir())
    data = load(dst)
    total = {s: sum(v[i] for v in report.classes.values()) for i, s in enumerate(("train", "test"))}
    assert (data.train.num_samples, data.test.num_samples) == (total["train"], total["test"]) == (7, 2)
    reports = scan_folder(dst)
    assert {s: len(r.ok) for s, r in reports.items()} == total and not any(r.corrupt for r in reports.values())
    assert "not followed" not in caplog.text
    # a link that byot did not make, out of SRC, is still refused ...
    secret = write_image(tmp_path / "elsewhere" / "secret.png", seed=7)
    (dst / "train" / "cat" / "zzz.png").symlink_to(secret)
    assert secret not in [p.resolve() for p in index_folder(dst / "train").paths]
    assert "zzz.png: symlink to" in caplog.text
    # ... and the links into SRC are followed only because split.json says byot made them
    manifest = json.loads((dst / "split.json").read_text())
    (dst / "split.json").write_text(json.dumps({**manifest, "mode": "copy"}))
    with pytest.raises(ByotError, match="holds no images"):
        index_folder(dst / "train")


# 3. an interrupted byot split is recognisable and refused until rerun --------------------------------------

def test_an_interrupted_split_is_refused_and_a_forced_rerun_finishes_it(tmp_path, monkeypatch):
    src = make_classes(tmp_path / "src", {"cat": 4, "dog": 4})
    dst = tmp_path / "split"
    copy, placed = split_module.PLACERS["copy"], []

    def ctrl_c_at_the_last_file(source, target):
        if len(placed) == 7:  # 3 + 1 cat, 3 dog, then Ctrl-C before the last dog test image
            raise KeyboardInterrupt
        placed.append(target)
        return copy(source, target)

    monkeypatch.setitem(split_module.PLACERS, "copy", ctrl_c_at_the_last_file)
    with pytest.raises(KeyboardInterrupt):
        split_folder(src, dst)
    assert len(placed) == 7 and not (dst / "split.json").exists()
    for reader in (lambda: load(dst), lambda: scan_folder(dst), lambda: scan_folder(dst / "train"),
                   lambda: index_folder(dst / "train")):
        with pytest.raises(ByotError, match=rf"interrupted.*byot split {src.resolve()} --out .* --force"):
            reader()
    with pytest.raises(ByotError, match="--force"):
        split_folder(src, dst)  # without --force the unfinished DST is not silently kept
    monkeypatch.setitem(split_module.PLACERS, "copy", copy)
    split_folder(src, dst, force=True)
    data = load(dst)
    assert (data.train.num_samples, data.test.num_samples) == (6, 2)
    assert sorted(p.name for p in dst.iterdir()) == ["split.json", "test", "train"]


def test_an_interrupted_forced_rerun_is_refused_too(tmp_path, monkeypatch):
    src = make_classes(tmp_path / "src", {"cat": 4})
    dst = tmp_path / "split"
    split_folder(src, dst)

    def ctrl_c(source, target):
        raise KeyboardInterrupt

    monkeypatch.setitem(split_module.PLACERS, "copy", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        split_folder(src, dst, seed=5, force=True)
    with pytest.raises(ByotError, match="interrupted"):
        scan_folder(dst)


# 4. a hold-out of nothing ----------------------------------------------------------------------------------

def test_val_split_holding_out_no_image_is_refused_for_folders(tmp_path):
    root = tmp_path / "data"
    make_classes(root / "train", {"cat": 1, "dog": 1})  # a class keeps its only image for training
    make_classes(root / "test", {"cat": 1, "dog": 1}, seed=50)
    assert load(root).val is None
    with pytest.raises(ByotError, match=r"--val-split 0.2 holds out no image"):
        load(root, val_split=0.2)


def test_val_split_holding_out_no_image_is_refused_for_tensor_data(monkeypatch):
    one_each = ImageSet(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.arange(3), ["a", "b", "c"])
    monkeypatch.setattr("byot.data.load_digits", lambda size: (one_each, one_each))
    with pytest.raises(ByotError, match=r"--val-split 0.5 holds out no image"):
        build_data("digits", None, 4, 8, 0, CPU, val_split=0.5)


# 5. a test split without images ----------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["test", "val"])
def test_a_test_split_without_any_image_is_refused_before_training(tmp_path, split):
    root = tmp_path / "data"
    make_classes(root / "train", {"cat": 2, "dog": 2})
    make_classes(root / split, {"cat": 0, "dog": 0})
    with pytest.raises(ByotError, match=rf"{split} holds no images"):
        load(root)
    with pytest.raises(ByotError, match=rf"{split} holds no images"):
        scan_folder(root)


def test_a_test_class_without_images_is_only_a_warning(tmp_path, caplog):
    root = tmp_path / "data"
    make_classes(root / "train", {"cat": 2, "dog": 1})
    make_classes(root / "test", {"cat": 1, "dog": 0})
    assert load(root).test.num_samples == 1
    assert "test/dog holds no images; that class is not evaluated" in caplog.text


# 8. --workers below 0 --------------------------------------------------------------------------------------

def test_negative_or_huge_workers_are_refused(tmp_path):
    image = write_image(tmp_path / "train" / "cat" / "a.png", seed=1)
    with pytest.raises(ByotError, match=r"--workers must lie in \[0, 256\], not -1"):
        scan_images([image], workers=-1)
    with pytest.raises(ByotError, match=r"--workers must lie in \[0, 256\], not -2"):
        scan_folder(tmp_path, workers=-2)
    with pytest.raises(ByotError, match=r"--workers must lie in \[0, 256\], not 100000"):  # would fork 100,000
        scan_images([image, image], workers=100000)


# 7. DataLoader workers of image folders leave signals to the main process ----------------------------------

def test_folder_batches_workers_ignore_sigint_and_sigterm(tmp_path, monkeypatch):
    index = index_folder(make_classes(tmp_path / "train", {"cat": 2, "dog": 2}))

    def report_handlers(self, key):  # runs in the worker: which SIGINT / SIGTERM handlers it has
        ignored = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)]
        return torch.tensor(ignored, dtype=torch.uint8), 0

    monkeypatch.setattr("byot.data.folder.FolderDataset.__getitem__", report_handlers)
    previous = signal.signal(signal.SIGINT, lambda *_: None)  # the main process has a handler of its own
    try:
        batches = FolderBatches(index, 8, 4, False, seed=0, device=CPU, workers=1)
        flags, _ = next(iter(batches))
        assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN  # the main process keeps its handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert flags.tolist() == [[1, 1]] * 4


# 6. stopping a parallel scan: the process and its workers end within seconds --------------------------------

SCAN_CHILD = """
import contextlib, sys
from pathlib import Path
from byot.data.scan import scan_images
from byot.runs.signals import handle_signals
with handle_signals() if sys.argv[2] == "handled" else contextlib.nullcontext():
    print("scanning", flush=True)
    scan_images([Path(sys.argv[1])] * 20000, workers=2)
print("finished", flush=True)
"""


def _children(pid: int) -> set[int]:
    """PIDs of the live processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's bookkeeping is left


def _start_scan(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, set[int]]:
    image = write_image(tmp_path / "big.png", seed=3, size=256)  # decoding it takes about a millisecond
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", SCAN_CHILD, str(image), mode], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert child.stdout.readline() == "scanning\n"
    deadline = time.monotonic() + 30
    while len(_children(child.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(child.pid)
    assert len(workers) == 2, "the scan's two workers did not start"
    time.sleep(0.5)  # both busy decoding
    return child, workers


def _ends_with_its_workers(child: subprocess.Popen, workers: set[int], within: float = 5.0) -> str:
    try:
        _, err = child.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail(f"the scan did not end within {within} s of the signal")
    deadline = time.monotonic() + within
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "scan workers outlived the process"
    return err


needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux")


@needs_proc
def test_ctrl_c_during_a_parallel_scan_ends_it_and_its_workers(tmp_path):
    child, workers = _start_scan(tmp_path, "plain")
    os.killpg(child.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    err = _ends_with_its_workers(child, workers)
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert err.count("Traceback") == 1, err  # the main process's alone: the workers ignored the signal


@needs_proc
@pytest.mark.parametrize("how", ["second signal", "parent killed"])
def test_a_second_signal_or_a_killed_parent_leaves_no_worker(tmp_path, how):
    child, workers = _start_scan(tmp_path, "handled")
    if how == "second signal":  # byot's handler: the first raises Interrupted, the second ends at once
        os.killpg(child.pid, signal.SIGTERM)
        time.sleep(0.05)  # two at once would reach the process as one
        os.killpg(child.pid, signal.SIGTERM)
    else:  # no cleanup at all can run: the workers must end on their own
        os.kill(child.pid, signal.SIGKILL)
    _ends_with_its_workers(child, workers)
    assert child.returncode != 0
