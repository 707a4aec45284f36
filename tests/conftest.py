"""Shared fixtures: small subsets of the real data sets in ../shared/data, in their real formats."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite's two workers (pyproject's -n 2) share the 2 cores
    import torch

    torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR100_TAR = SHARED_DATA / "cifar-100-python.tar.xz"
CIFAR10_JPG_TAR = SHARED_DATA / "cifar10-jpg.tar.gz"


@pytest.fixture(autouse=True)
def _byot_logger_restored():
    """Each in-process ``main()`` points the "byot" logger at that test's captured stderr and its run
    folder; put it back afterwards so later tests neither write to closed streams nor miss caplog."""
    logger = logging.getLogger("byot")
    before = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in logger.handlers:
        if handler not in before[0]:
            handler.close()
    logger.handlers[:] = before[0]
    logger.setLevel(before[1])
    logger.propagate = before[2]


TIMING = {"epoch_seconds", "train_seconds", "train_images_per_s"}  # the only fields two equal runs differ in


def metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, strictly: a cut or malformed line fails the test."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def between_samples(confidence, share: float = 0.5) -> float:
    """A threshold that lets about ``share`` of the images leave, half-way between two of their confidences:
    a threshold equal to one image's confidence (a quantile of an odd count) flips that image on the last
    bit in which the cascade's smaller batches may round differently from the whole batch's."""
    import torch

    ordered = torch.sort(confidence.double()).values
    k = min(max(int(len(ordered) * (1 - share)), 1), len(ordered) - 1)
    return float((ordered[k - 1] + ordered[k]) / 2)


def assert_cascade_is_the_policy(model, runtime, batches) -> None:
    """The real early-exit cascade (batches shrinking stage by stage) answers every image of ``batches`` as the
    policy simulated on the whole batches' logits does, with the same class and the same exit, and some images
    leave early (thresholds at each shallow exit's median confidence, see ``between_samples``)."""
    import torch

    from byot.deploy.cascade import EarlyExitNet
    from byot.deploy.policy import ExitPolicy, simulate
    from byot.training.evaluate import collect_logits

    logits, _ = collect_logits(model, batches, runtime)
    confidence = [torch.softmax(z, dim=1).max(dim=1).values.double() for z in logits[:-1]]
    policy = ExitPolicy(tuple(between_samples(c) for c in confidence))
    simulated = simulate(logits, policy)
    net = EarlyExitNet(model, policy)
    answers = [net(runtime.inputs(images)) for images, _ in batches]
    assert torch.equal(torch.cat([a.predicted for a in answers]), simulated.predicted)
    stage = torch.tensor(model.exit_stages)[simulated.exit_position]
    assert torch.equal(torch.cat([a.exit for a in answers]), stage)
    assert len(set(stage.tolist())) > 1  # the policy really exits early for some images


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data beside the checkout)")


@pytest.fixture(scope="session")
def cifar100_full(tmp_path_factory) -> dict:
    """The real CIFAR-100 pickles, unpacked once per test run: {"train": dict, "test": dict, "meta": dict}.

    Decompressing the xz archive takes seconds (about 12 on the 2-core CPU), so one worker writes its
    pickles into the run's temporary folder and the others read them from there."""
    _need(CIFAR100_TAR)
    basetemp = tmp_path_factory.getbasetemp()
    shared = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp  # this run's, not the next
    folder = shared / "cifar-100-python-unpacked"
    with open(shared / "cifar-100-python.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.exists():
            staging = shared / f".cifar-100-python-{os.getpid()}"
            staging.mkdir()
            with tarfile.open(CIFAR100_TAR, "r|xz") as tar:  # a stream: decompressed once, front to back
                for member in tar:
                    if member.isfile():
                        (staging / Path(member.name).name).write_bytes(tar.extractfile(member).read())
            staging.rename(folder)
    return {p.name: pickle.loads(p.read_bytes(), encoding="latin1") for p in folder.iterdir()}


def write_cifar100_subset(root: Path, full: dict, n_train: int, n_test: int) -> Path:
    """A cifar-100-python/ folder with the first n_train training images and n_test test images
    taken evenly over the class-ordered test split, written as the standard pickles (str keys)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    test_idx = np.linspace(0, len(full["test"]["data"]) - 1, n_test).round().astype(int)
    for name, idx in (("train", np.arange(n_train)), ("test", test_idx)):
        d = full[name]
        subset = {"data": d["data"][idx], "fine_labels": [d["fine_labels"][i] for i in idx],
                  "coarse_labels": [d["coarse_labels"][i] for i in idx]}
        (folder / name).write_bytes(pickle.dumps(subset))
    (folder / "meta").write_bytes(pickle.dumps(full["meta"]))
    return root


@pytest.fixture(scope="session")
def cifar100_small(cifar100_full, tmp_path_factory) -> Path:
    """--data-dir of a real CIFAR-100 subset: 300 training images (odd batches), 101 test images."""
    return write_cifar100_subset(tmp_path_factory.mktemp("cifar100"), cifar100_full, 300, 101)


@pytest.fixture(scope="session")
def cifar10_jpg(tmp_path_factory) -> Path:
    """Real CIFAR-10 JPEGs: train/<class>/ with 12 per class and test/<class>/ with 4 per class."""
    _need(CIFAR10_JPG_TAR)
    root = tmp_path_factory.mktemp("cifar10jpg")
    quota = {"train": 12, "test": 4}
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR10_JPG_TAR, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] not in quota:
                continue
            key = (parts[0], parts[1])
            if taken.get(key, 0) >= quota[parts[0]]:
                continue
            taken[key] = taken.get(key, 0) + 1
            target = root.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return root


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> Path:
    """model_best of a real (if small) run: multi_resnet18_kd, width 8, 16 px digits, 12 epochs, 25% held
    out for validation. About 7 s on the 2-core CPU. Tests copy it before changing it."""
    from byot.config import build_config
    from byot.training.fit import fit

    root = tmp_path_factory.mktemp("digits_run")
    cfg = build_config({}, {"arch": "multi_resnet18_kd", "dataset": "digits", "width": 8, "epochs": 12,
                            "batch_size": 64, "lr": 0.05, "schedule": "cosine", "val_split": 0.25,
                            "image_size": 16, "save_folder": str(root), "progress": False})
    fit(cfg, overwrite=True)
    return root / "multi_resnet18_kd" / "model_best.pth.tar"


@pytest.fixture
def ckpt(digits_checkpoint, tmp_path) -> Path:
    """A private copy of the trained digits checkpoint in a run folder of its own (commands write their policy
    file beside it)."""
    import shutil

    target = tmp_path / "run" / "model_best.pth.tar"
    target.parent.mkdir()
    shutil.copy(digits_checkpoint, target)
    return target
