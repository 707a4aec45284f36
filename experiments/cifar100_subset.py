"""Write a class-balanced subset of CIFAR-100 in its own python-pickle layout (cifar-100-python/train, test,
meta), for studies that must fit a CPU budget: the first N training and M test images of every class.

    python experiments/cifar100_subset.py /tmp/data/cifar-100-python /tmp/c100sub --train 100 --test 20
    byot tune experiments/tune_cifar100.yaml --data-dir /tmp/c100sub ...
"""

from __future__ import annotations

import argparse
import pickle
import shutil
from pathlib import Path

import numpy as np


def subset(source: Path, out: Path, name: str, per_class: int) -> int:
    with open(source / name, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    labels = np.asarray(data["fine_labels"])
    keep = np.sort(np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in np.unique(labels)]))
    picked = {key: (np.asarray(value)[keep] if len(value) == len(labels) else value)
              for key, value in data.items() if hasattr(value, "__len__") and not isinstance(value, str)}
    picked = {k: (v.tolist() if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in picked.items()}
    picked.update({k: v for k, v in data.items() if k not in picked})
    with open(out / name, "wb") as f:
        pickle.dump(picked, f)
    return len(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a cifar-100-python folder")
    parser.add_argument("out", type=Path, help="data root to write (receives cifar-100-python/)")
    parser.add_argument("--train", type=int, default=100, help="training images per class")
    parser.add_argument("--test", type=int, default=20, help="test images per class")
    args = parser.parse_args()
    folder = args.out / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.source / "meta", folder / "meta")
    n_train = subset(args.source, folder, "train", args.train)
    n_test = subset(args.source, folder, "test", args.test)
    print(f"wrote {folder}: {n_train} training and {n_test} test images")


if __name__ == "__main__":
    main()
