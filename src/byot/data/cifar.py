"""CIFAR-10/100 from the standard python-pickle folders, read without running pickled code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from byot.data.images import ImageSet
from byot.errors import ByotError

# folder name, training files, test file, meta file, label key, class-name key
_LAYOUTS = {
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
    ),
}

# A CIFAR pickle holds dicts, lists, str/bytes and one numpy array; nothing else may be built.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = _SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except OSError as e:
        raise ByotError(f"cannot read {path}: {e.strerror}") from e
    except Exception as e:  # any malformed pickle: a user-facing error, not a traceback
        raise ByotError(f"{path} is not a CIFAR pickle file ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict):
        raise ByotError(f"{path} is not a CIFAR pickle file (holds {type(raw).__name__}, not a dict)")
    # Python 2 pickles decoded as latin1 have str keys; some re-pickled copies have bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def find_cifar_folder(data_dir: Path, dataset: str) -> Path:
    """``data_dir`` itself or its ``cifar-100-python`` / ``cifar-10-batches-py`` subfolder."""
    folder, train_files, *_ = _LAYOUTS[dataset]
    for candidate in (data_dir / folder, data_dir):
        if all((candidate / name).is_file() for name in train_files):
            return candidate
    raise ByotError(
        f"no {dataset} data under {data_dir}: expected {folder}/{train_files[0]} (the python version of "
        f"the data set); point --data-dir at the folder that holds {folder}/, or add --download"
    )


def _as_array(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array of numbers, or None (ragged lists, strings, dicts, None...)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None
    return array if array.dtype.kind in "iuf" or (array.size == 0 and array.dtype.kind in "iufO") else None


def _read_split(paths: list[Path], label_key: str, num_classes: int, classes: list[str]) -> ImageSet:
    datas, labels = [], []
    for path in paths:
        d = _load_pickle(path)
        if "data" not in d or label_key not in d:
            raise ByotError(f"{path} lacks the '{'data' if 'data' not in d else label_key}' entry of a CIFAR file")
        data, lab = _as_array(d["data"]), _as_array(d[label_key])
        if data is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if data is not None else type(d["data"]).__name__
            raise ByotError(f"{path}: expected 'data' as uint8 of shape (N, 3072), got {got}")
        if lab is None or lab.ndim != 1 or len(lab) != len(data) or (len(lab) and lab.dtype.kind not in "iu"):
            got = f"{lab.dtype} {lab.shape}" if lab is not None else type(d[label_key]).__name__
            raise ByotError(f"{path}: expected '{label_key}' as {len(data)} integer labels, got {got}")
        if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
            raise ByotError(f"{path}: labels must lie in 0..{num_classes - 1}")
        datas.append(data)
        labels.append(lab.astype(np.int64))
    images = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32)
    return ImageSet(images, torch.from_numpy(np.concatenate(labels)), classes)


def load_cifar(data_dir: str | Path, dataset: str, download: bool = False) -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets of ``dataset`` ("cifar10" or "cifar100") found under ``data_dir``."""
    data_dir = Path(data_dir).expanduser()
    if download:
        _download(data_dir, dataset)
    root = find_cifar_folder(data_dir, dataset)
    _, train_files, test_file, meta_file, label_key, names_key = _LAYOUTS[dataset]
    num_classes = 100 if dataset == "cifar100" else 10
    classes = [str(i) for i in range(num_classes)]
    if (root / meta_file).is_file():
        names = _load_pickle(root / meta_file).get(names_key)
        if isinstance(names, list) and len(names) == num_classes:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if not (root / test_file).is_file():
        raise ByotError(f"{root} has the training files but no {test_file}")
    train = _read_split([root / n for n in train_files], label_key, num_classes, classes)
    test = _read_split([root / test_file], label_key, num_classes, classes)
    return train, test


def _download(data_dir: Path, dataset: str) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR100 if dataset == "cifar100" else torchvision.datasets.CIFAR10
    try:
        cls(str(data_dir), train=True, download=True)
    except Exception as e:  # no network, bad checksum, full disk
        raise ByotError(f"could not download {dataset} into {data_dir}: {e}") from e
