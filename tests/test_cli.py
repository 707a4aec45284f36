"""The command line as users run it: train, test, resume, --json, error paths (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import metrics, without_timing, write_cifar100_subset

from byot.cli import main

FAST = ["--width", "4", "--batch-size", "32", "--no-progress", "--print-freq", "100"]


def train(tmp: Path, data: Path, *extra: str, arch: str = "multi_resnet18_kd") -> int:
    return main(["train", arch, "--data-dir", str(data), "--save-folder", str(tmp), *FAST, *extra])


def test_train_writes_every_artefact(tmp_path, cifar100_small, capsys):
    assert train(tmp_path, cifar100_small, "--epochs", "2") == 0
    run = tmp_path / "multi_resnet18_kd"
    names = {p.name for p in run.iterdir()}
    assert {"log_train.txt", "metrics.jsonl", "config.yaml", "checkpoint_latest.pth.tar", "model_best.pth.tar"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    records = metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    r = records[-1]
    assert {"epoch", "lr", "losses", "exits", "ensemble", "epoch_seconds", "train_images_per_s"} <= set(r)
    assert [e["exit"] for e in r["exits"]] == [1, 2, 3, 4]
    expected_terms = {"loss"} | {f"ce/exit{k}" for k in range(1, 5)} | {f"{t}/exit{k}" for t in ("kd", "hint")
                                                                        for k in range(1, 4)}
    assert set(r["losses"]) == expected_terms
    assert all(0 <= e["top1"] <= e["top5"] <= 100 for e in r["exits"])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["width"] == 4 and config["alpha"] == 0.1 and config["num_classes"] == 100
    out = capsys.readouterr().out
    assert "ensemble" in out and "exit" in out
    checkpoint = torch.load(run / "checkpoint_latest.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["width"] == 4 and checkpoint["version"]
    assert {"model", "optimizer", "model_spec", "rng", "best_top1", "classes"} <= set(checkpoint)
    assert "scheduler" not in checkpoint  # the schedule is a pure function of (epoch, config)


def test_test_json_schema(tmp_path, cifar100_small, capsys):
    assert train(tmp_path, cifar100_small, "--epochs", "1") == 0
    capsys.readouterr()
    ckpt = tmp_path / "multi_resnet18_kd" / "model_best.pth.tar"
    assert main(["test", "multi_resnet18_kd", "--data-dir", str(cifar100_small), "--resume", str(ckpt),
                 "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # exactly one JSON object on stdout
    assert {"arch", "dataset", "num_images", "exits", "ensemble"} <= set(result)
    assert result["arch"] == "multi_resnet18_kd" and result["dataset"] == "cifar100"
    assert result["num_images"] == 101
    assert [e["exit"] for e in result["exits"]] == [1, 2, 3, 4]
    assert all({"top1", "top5"} <= set(e) for e in result["exits"])
    assert set(result["ensemble"]) == {"top1", "top5"}
    # the same numbers as the last epoch's evaluation during training
    last = metrics(tmp_path / "multi_resnet18_kd")[-1]
    assert [e["top1"] for e in result["exits"]] == [e["top1"] for e in last["exits"]]
    assert main(["test", "multi_resnet18_kd", "--data-dir", str(cifar100_small), "--resume", str(ckpt)]) == 0
    table = capsys.readouterr().out
    assert "compute" in table and "100%" in table


# the journal recipe with every per-image augmentation and the weight average: all of it resumes exactly
STRONG = {"recipe": "journal", "mixup": 0.2, "cutmix": 1.0, "label_smoothing": 0.1, "ema": 0.9}


@pytest.mark.parametrize("options", [{}, STRONG], ids=["iccv", "journal+mixup+cutmix+ema"])
def test_resume_ends_exactly_like_an_uninterrupted_run(tmp_path, cifar100_small, options):
    from byot.training.fit import fit
    from byot.training.resolve import resolve_config

    common = {"data_dir": str(cifar100_small), "width": 4, "batch_size": 64, "epochs": 3, "progress": False,
              "seed": 7, "arch": "multi_resnet18_kd", **options}
    cfg, _ = resolve_config({**common, "save_folder": str(tmp_path / "straight")})
    straight = fit(cfg)
    cfg, _ = resolve_config({**common, "save_folder": str(tmp_path / "stopped")})
    fit(cfg, stop_after=1)
    latest = tmp_path / "stopped" / "multi_resnet18_kd" / "checkpoint_latest.pth.tar"
    assert main(["train", "multi_resnet18_kd", "--resume", str(latest), "--no-progress"]) == 0
    resumed = metrics(tmp_path / "stopped" / "multi_resnet18_kd")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert without_timing(resumed) == without_timing(straight)
    if options:
        assert "ema" in resumed[-1] and "feature/exit1" in resumed[-1]["losses"]


def test_no_distill_trains_the_plain_backbone(tmp_path, cifar100_small):
    assert train(tmp_path, cifar100_small, "--epochs", "1", "--no-distill") == 0
    r = metrics(tmp_path / "multi_resnet18_kd")[-1]
    assert [e["exit"] for e in r["exits"]] == [4]
    assert set(r["losses"]) == {"loss", "ce/exit4"}
    assert r["losses"]["loss"] == pytest.approx(r["losses"]["ce/exit4"], rel=1e-6)


@pytest.mark.parametrize("n_batch", ["1", "7"])
def test_tiny_batches_and_single_sample_remainders(tmp_path, cifar100_full, n_batch):

    data = write_cifar100_subset(tmp_path / "d", cifar100_full, 15, 8)  # 15 = 2 x 7 + 1
    args = ["train", "multi_resnet50_kd", "--data-dir", str(data), "--save-folder", str(tmp_path / "r"),
            "--width", "2", "--batch-size", n_batch, "--epochs", "1", "--no-progress"]
    assert main(args) == 0
    ckpt = tmp_path / "r" / "multi_resnet50_kd" / "checkpoint_latest.pth.tar"
    assert main(["test", "multi_resnet50_kd", "--data-dir", str(data), "--resume", str(ckpt),
                 "--batch-size", "1"]) == 0


def test_config_file_and_flags_precedence(tmp_path, cifar100_small):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("width: 4\nepochs: 5\nalpha: 0.3\nbatch-size: 128\n")
    assert train(tmp_path, cifar100_small, "--config", str(cfg_file), "--epochs", "1") == 0
    saved = yaml.safe_load((tmp_path / "multi_resnet18_kd" / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["alpha"] == 0.3 and saved["batch_size"] == 32  # FAST passes 32


def test_image_folder_training_with_batch_remainder_of_one(tmp_path, cifar10_jpg):
    # 120 training images at batch 7: 17 batches of 7 and one of 1 (joined to the one before)
    args = ["train", "multi_resnet18_kd", "--dataset", "imagefolder", "--data-dir", str(cifar10_jpg),
            "--image-size", "32", "--width", "4", "--batch-size", "7", "--epochs", "1", "--workers", "0",
            "--save-folder", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    r = metrics(tmp_path / "multi_resnet18_kd")[-1]
    assert len(r["exits"]) == 4


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_error_missing_data_dir(tmp_path, capsys):
    assert main(["train", "multi_resnet18_kd", "--data-dir", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in error_line(capsys)


def test_error_unknown_arch(tmp_path, cifar100_small, capsys):
    assert main(["train", "resnet_bogus", "--data-dir", str(cifar100_small), "--save-folder", str(tmp_path)]) == 2
    assert "unknown arch 'resnet_bogus'" in error_line(capsys)


def test_error_bad_checkpoints(tmp_path, cifar100_small, capsys):
    assert train(tmp_path, cifar100_small, "--epochs", "1") == 0
    ckpt = str(tmp_path / "multi_resnet18_kd" / "checkpoint_latest.pth.tar")
    capsys.readouterr()
    base = ["--data-dir", str(cifar100_small), "--resume"]
    assert main(["test", "multi_resnet50_kd", *base, ckpt]) == 2
    assert "--arch 'multi_resnet50_kd' (checkpoint: 'multi_resnet18_kd')" in error_line(capsys)
    assert main(["test", "multi_resnet18_kd", *base, ckpt, "--width", "8"]) == 2
    assert "--width 8 (checkpoint: 4)" in error_line(capsys)
    assert main(["test", "multi_resnet18_kd", *base, ckpt, "--stem", "imagenet"]) == 2
    assert "--stem 'imagenet'" in error_line(capsys)
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    assert main(["test", "multi_resnet18_kd", *base, str(empty)]) == 2
    assert "cannot read checkpoint" in error_line(capsys)
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(os.urandom(1000))
    assert main(["test", "multi_resnet18_kd", *base, str(garbage)]) == 2
    assert "cannot read checkpoint" in error_line(capsys)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(Path(ckpt).read_bytes()[:5000])
    assert main(["test", "multi_resnet18_kd", *base, str(truncated)]) == 2
    assert "cannot read checkpoint" in error_line(capsys)
    assert main(["test", "multi_resnet18_kd", *base, str(tmp_path / "missing.pth.tar")]) == 2
    assert "no checkpoint at" in error_line(capsys)


def test_error_dataset_mismatch(tmp_path, cifar100_small, cifar10_jpg, capsys):
    assert train(tmp_path, cifar100_small, "--epochs", "1") == 0
    ckpt = str(tmp_path / "multi_resnet18_kd" / "checkpoint_latest.pth.tar")
    capsys.readouterr()
    code = main(["test", "multi_resnet18_kd", "--dataset", "imagefolder", "--data-dir", str(cifar10_jpg),
                 "--resume", ckpt])
    assert code == 2
    assert "--dataset 'imagefolder' (checkpoint: 'cifar100')" in error_line(capsys)


def test_refuses_to_overwrite_a_run(tmp_path, cifar100_small, capsys):
    assert train(tmp_path, cifar100_small, "--epochs", "1") == 0
    capsys.readouterr()
    assert train(tmp_path, cifar100_small, "--epochs", "1") == 2
    assert "already holds a run" in error_line(capsys)
    assert train(tmp_path, cifar100_small, "--epochs", "1", "--overwrite") == 0


def test_cli_process_exit_code_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "byot", "test", "multi_resnet18_kd", "--data-dir", str(tmp_path),
                           "--resume", str(tmp_path / "x.pth.tar")], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("byot: error: no checkpoint at")


def test_resume_tolerates_a_cut_metrics_line_and_an_equal_image_size(tmp_path, cifar100_small, capsys):
    assert train(tmp_path, cifar100_small, "--epochs", "1") == 0
    run = tmp_path / "multi_resnet18_kd"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr"')  # a crash in the middle of the append
    ckpt = str(run / "checkpoint_latest.pth.tar")
    assert main(["train", "multi_resnet18_kd", "--resume", ckpt, "--epochs", "2", "--no-progress"]) == 0
    assert [r["epoch"] for r in metrics(run)] == [1, 2]
    # the CIFAR run was trained at the data set's own 32 px: saying so again is no clash
    capsys.readouterr()
    assert main(["test", "multi_resnet18_kd", "--data-dir", str(cifar100_small), "--resume", ckpt,
                 "--image-size", "32", "--json"]) == 0
    assert main(["test", "multi_resnet18_kd", "--data-dir", str(cifar100_small), "--resume", ckpt,
                 "--image-size", "64"]) == 2


def test_bad_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("width: [1, 2\nepochs: 3\n")
    assert main(["train", "multi_resnet18_kd", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("byot: error: config") and "\n" not in err


def test_resume_auto_starts_continues_and_falls_back(tmp_path, cifar100_small, capsys):
    auto = ["--resume", "auto"]
    assert train(tmp_path, cifar100_small, "--epochs", "1", *auto) == 0  # nothing to resume: a new run
    run = tmp_path / "multi_resnet18_kd"
    assert [r["epoch"] for r in metrics(run)] == [1]
    assert train(tmp_path, cifar100_small, "--epochs", "2", *auto) == 0  # continues after epoch 1
    assert [r["epoch"] for r in metrics(run)] == [1, 2]
    assert torch.load(run / "checkpoint_previous.pth.tar", weights_only=True)["epoch"] == 1
    latest = run / "checkpoint_latest.pth.tar"
    latest.write_bytes(latest.read_bytes()[:4096])  # the newest file is cut short
    capsys.readouterr()
    assert train(tmp_path, cifar100_small, "--epochs", "2", *auto) == 0
    err = capsys.readouterr().err
    assert f"skipping {latest}" in err and "checkpoint_previous.pth.tar" in err
    assert [r["epoch"] for r in metrics(run)] == [1, 2]  # epoch 2 was trained again from epoch 1's state
    assert torch.load(latest, weights_only=True)["epoch"] == 2
