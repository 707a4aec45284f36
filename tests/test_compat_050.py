"""A run directory written by byot 0.5.0 (tests/fixtures/byot050: a width-8 model on the digits, calibrated and
with fitted thresholds inside its checkpoint, as 0.5.0 stored them) is read by every command of this version:
test gives the numbers 0.5.0 measured, resume goes on, calibrate and early-exit write a policy file beside it
and leave its bytes alone, and export and predict use what it holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from byot.cli import main
from byot.config import load_yaml
from byot.runs.trainchild import stored_config
from byot.training.checkpoint import load_checkpoint

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "byot050"
ARCH = "multi_resnet18_kd"
DATA = ["--dataset", "digits"]


@pytest.fixture
def run050(tmp_path) -> Path:
    """A copy of the 0.5.0 run directory (the committed one is never written)."""
    shutil.copytree(FIXTURE, tmp_path / "run050")
    return tmp_path / "run050" / ARCH


def test_the_fixture_is_what_byot_050_wrote():
    checkpoint = load_checkpoint(FIXTURE / ARCH / "model_best.pth.tar")
    assert checkpoint["version"] == "0.5.0" and checkpoint["config"]["width"] == 8
    assert {"calibration", "early_exit"} <= set(checkpoint)  # the values 0.5.0 kept inside


def test_byot_test_gives_the_numbers_050_measured(run050, capsys):
    assert main(["test", ARCH, *DATA, "--resume", str(run050 / "model_best.pth.tar"), "--json"]) == 0
    now = json.loads(capsys.readouterr().out)
    then = json.loads((run050 / "test_result.json").read_text())
    assert now["num_images"] == then["num_images"] == 359
    assert [e["top1"] for e in now["exits"]] == pytest.approx([e["top1"] for e in then["exits"]], abs=1e-9)
    assert now["ensemble"]["top1"] == pytest.approx(then["ensemble"]["top1"], abs=1e-9)


def test_its_config_yaml_and_metrics_still_read(run050):
    cfg = stored_config(run050)
    assert cfg is not None and (cfg.width, cfg.epochs, cfg.val_split) == (8, 2, 0.2)
    assert load_yaml(run050 / "config.yaml")["byot_version"] == "0.5.0"


def test_a_resume_goes_on_from_its_epoch(run050, tmp_path):
    assert main(["train", ARCH, *DATA, "--resume", str(run050 / "model_best.pth.tar"), "--epochs", "3",
                 "--save-folder", str(tmp_path / "on"), "--no-progress", "--workers", "0"]) == 0
    assert load_checkpoint(tmp_path / "on" / ARCH / "checkpoint_latest.pth.tar")["epoch"] == 3


def test_calibrate_and_early_exit_write_a_policy_file_and_leave_the_050_checkpoint_alone(run050, capsys):
    checkpoint = run050 / "model_best.pth.tar"
    before = checkpoint.read_bytes()
    assert main(["calibrate", ARCH, *DATA, "--resume", str(checkpoint)]) == 0
    assert main(["early-exit", ARCH, *DATA, "--resume", str(checkpoint), "--max-drop", "5", "--json"]) == 0
    assert checkpoint.read_bytes() == before
    policy = json.loads((run050 / "model_best.pth.tar.policy.json").read_text())
    assert len(policy["calibration"]["temperatures"]) == 4  # one per exit
    assert len(policy["early_exit"]["thresholds"]) == 3  # one per shallow exit


def test_export_and_predict_use_the_thresholds_050_stored(run050, tmp_path, capsys):
    checkpoint = run050 / "model_best.pth.tar"
    stored = torch.load(checkpoint, weights_only=True)["early_exit"]["thresholds"]
    assert main(["export", ARCH, "--resume", str(checkpoint), "--exit", "2", "--format", "onnx",
                 "--out", str(tmp_path / "exit2.onnx")]) == 0
    assert (tmp_path / "exit2.onnx").stat().st_size > 0
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (40 * i, 255 - 40 * i, 128)).save(images / f"{i}.png")
    capsys.readouterr()
    assert main(["predict", "--resume", str(checkpoint), str(images), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(r["exit"] in (1, 2, 3, 4) for r in rows)
    capsys.readouterr()
    # with the thresholds given by hand as the ones stored, the answers are the same: predict used them
    assert main(["predict", "--resume", str(checkpoint), str(images), "--json", "--threshold",
                 *map(str, stored)]) == 0
    assert json.loads(capsys.readouterr().out) == rows
