"""A user's own image collection, end to end: split, check, train, test (real JPEG files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from byot.cli import main


@pytest.fixture
def hospital(tmp_path, cifar10_jpg) -> Path:
    """8 classes named 1..8 from CIFAR-10 JPEGs, train and test merged (16 images each), as users keep them."""
    src = tmp_path / "hospital_data"
    classes = sorted(p.name for p in (cifar10_jpg / "train").iterdir())[:8]
    for i, name in enumerate(classes, start=1):
        (src / str(i)).mkdir(parents=True)
        for split in ("train", "test"):
            for f in (cifar10_jpg / split / name).iterdir():
                shutil.copy(f, src / str(i) / f"{split}_{f.name}")
    return src


def test_split_then_train_and_test_both_resnets(tmp_path, hospital, capsys):
    out = tmp_path / "split"
    assert main(["split", str(hospital), "--out", str(out), "--test-ratio", "0.25", "--seed", "1"]) == 0
    table = capsys.readouterr().out
    assert "total" in table and "96" in table  # 8 x 12 training images
    manifest = json.loads((out / "split.json").read_text())
    assert manifest["classes"]["1"] == {"train": 12, "test": 4}
    # one extra training image makes 97 = 12 x 8 + 1: a last batch of one sample at batch 8
    extra = next((out / "train" / "1").iterdir())
    shutil.copy(extra, out / "train" / "1" / "extra.jpg")
    for arch, width in (("multi_resnet18_kd", "4"), ("multi_resnet50_kd", "2")):
        args = ["train", arch, "--dataset", "imagefolder", "--data-dir", str(out), "--image-size", "64",
                "--batch-size", "8", "--epochs", "1", "--width", width, "--workers", "0",
                "--save-folder", str(tmp_path / "runs"), "--no-progress"]
        assert main(args) == 0
        ckpt = tmp_path / "runs" / arch / "checkpoint_latest.pth.tar"
        capsys.readouterr()
        assert main(["test", arch, "--data-dir", str(out), "--resume", str(ckpt), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["dataset"] == "imagefolder" and result["num_images"] == 32


def test_corrupt_files_stop_training_unless_skipped(tmp_path, hospital, capsys):
    out = tmp_path / "split"
    assert main(["split", str(hospital), "--out", str(out)]) == 0
    good = next((out / "train" / "2").iterdir())
    (out / "train" / "2" / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (out / "test" / "3" / "notes.jpg").write_text("this is text, not a JPEG")
    capsys.readouterr()
    assert main(["check-data", str(out)]) == 1
    report = capsys.readouterr().out
    assert "truncated.jpg" in report and "notes.jpg" not in report.split("train:")[0]
    base = ["train", "multi_resnet18_kd", "--dataset", "imagefolder", "--data-dir", str(out), "--image-size", "32",
            "--width", "4", "--epochs", "1", "--workers", "0", "--no-progress", "--save-folder", str(tmp_path / "r")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "unreadable image(s) in the training split" in err and "truncated.jpg" in err and "--skip-corrupt" in err
    assert main([*base, "--skip-corrupt"]) == 0
    assert "leaving out 1 unreadable image(s) of the training split" in capsys.readouterr().err


def test_split_refuses_a_non_empty_destination(tmp_path, hospital, capsys):
    out = tmp_path / "split"
    out.mkdir()
    (out / "something").write_text("keep me")
    assert main(["split", str(hospital), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "something").read_text() == "keep me"


def test_per_class_report_and_pretrained_backbone(tmp_path, hospital, cifar10_jpg, capsys):
    import torch
    import torchvision

    out = tmp_path / "split"
    assert main(["split", str(hospital), "--out", str(out), "--test-ratio", "0.25"]) == 0
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)  # a local torchvision file
    args = ["train", "multi_resnet18_kd", "--dataset", "imagefolder", "--data-dir", str(out), "--image-size", "32",
            "--batch-size", "16", "--epochs", "1", "--workers", "0", "--pretrained", str(weights),
            "--save-folder", str(tmp_path / "runs"), "--no-progress"]
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "pretrained backbone:" in err and "fc.weight" in err  # the 1000-class head does not fit: reported
    ckpt = tmp_path / "runs" / "multi_resnet18_kd" / "checkpoint_latest.pth.tar"
    assert main(["test", "multi_resnet18_kd", "--data-dir", str(out), "--resume", str(ckpt), "--per-class",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result["per_class"]) == [str(i) for i in range(1, 9)]
    assert all(len(v) == 4 for v in result["per_class"].values())
    # per-class accuracies weighted by class size give the overall accuracy of each exit
    for k, e in enumerate(result["exits"]):
        overall = sum(v[k] * 4 for v in result["per_class"].values()) / 32
        assert overall == pytest.approx(e["top1"])
    for k in range(1, 5):
        assert (ckpt.parent / f"confusion_exit{k}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = (ckpt.parent / f"confusion_exit{k}.csv").read_text().splitlines()
        assert len(rows) == 9 and rows[0].split(",")[1:] == [str(i) for i in range(1, 9)]
    # an image folder with another class count (10 CIFAR-10 classes, not 8): one clear error
    capsys.readouterr()
    assert main(["test", "multi_resnet18_kd", "--data-dir", str(cifar10_jpg), "--resume", str(ckpt)]) == 2
    assert "has 8 classes but the data has 10" in capsys.readouterr().err
