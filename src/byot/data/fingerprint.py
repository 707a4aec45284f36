"""A data set's fingerprint: its classes, its images per split and a hash of its files. Two copies of the same
data at different paths have the same fingerprint, so a study shared by several machines accepts each
machine's copy, and refuses other data."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from byot.data.cifar import find_cifar_folder, load_cifar
from byot.data.digits import load_digits
from byot.data.folder import find_split, index_folder
from byot.errors import ByotError

CHUNK = 1 << 20  # bytes read at a time while hashing a file


def data_fingerprint(dataset: str, data_dir: str | None) -> dict[str, Any]:
    """{"dataset", "classes", "counts": {"train", "test"}, "files": SHA-256 of the files (image folders: of
    their relative paths and sizes; CIFAR: of its files' bytes; digits: of its arrays)}."""
    if dataset == "imagefolder":
        return _folder_fingerprint(_root(data_dir, dataset))
    if dataset in ("cifar10", "cifar100"):
        root = _root(data_dir, dataset)
        train, test = load_cifar(root, dataset)
        digest = hashlib.sha256()
        folder = find_cifar_folder(root, dataset)
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(path.name.encode() + b"\0")
            _hash_file(digest, path)
        return _entry(dataset, train.classes, len(train.labels), len(test.labels), digest.hexdigest())
    if dataset == "digits":
        train, test = load_digits(8)
        digest = hashlib.sha256(np.ascontiguousarray(train.images.numpy()).tobytes())
        digest.update(np.ascontiguousarray(test.images.numpy()).tobytes())
        return _entry(dataset, train.classes, len(train.labels), len(test.labels), digest.hexdigest())
    raise ByotError(f"unknown dataset {dataset!r}")


def _root(data_dir: str | None, dataset: str) -> Path:
    if not data_dir or not Path(data_dir).expanduser().is_dir():
        raise ByotError(f"--data-dir {data_dir} does not exist or is not a folder (--dataset {dataset})")
    return Path(data_dir).expanduser()


def _folder_fingerprint(root: Path) -> dict[str, Any]:
    train_dir = find_split(root, ("train",))
    test_dir = find_split(root, ("test", "val"))
    train = index_folder(train_dir)
    test = index_folder(test_dir, train.classes)
    digest = hashlib.sha256()
    for name, folder, index in (("train", train_dir, train), ("test", test_dir, test)):
        for path in index.paths:  # sorted by class, then name
            digest.update(f"{name}/{path.relative_to(folder).as_posix()}\t{path.stat().st_size}\n".encode())
    return _entry("imagefolder", train.classes, len(train.paths), len(test.paths), digest.hexdigest())


def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)


def _entry(dataset: str, classes: list[str], train: int, test: int, files: str) -> dict[str, Any]:
    return {"dataset": dataset, "classes": list(classes), "counts": {"train": train, "test": test}, "files": files}


def fingerprint_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (empty: the same data)."""
    notes = []
    if before.get("dataset") != after.get("dataset"):
        notes.append(f"data set {before.get('dataset')} -> {after.get('dataset')}")
    old, new = before.get("classes", []), after.get("classes", [])
    if old != new:
        notes.append(f"classes: {len(old)} -> {len(new)}" if len(old) != len(new) else "class names differ")
    for split in ("train", "test"):
        a, b = before.get("counts", {}).get(split), after.get("counts", {}).get(split)
        if a != b:
            notes.append(f"{split} images {a} -> {b}")
    if not notes and before.get("files") != after.get("files"):
        notes.append("the files differ (same classes and counts)")
    return notes
