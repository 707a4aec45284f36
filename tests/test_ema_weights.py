"""--ema on the commands that read a checkpoint: test, calibrate, early-exit, export and predict run the weight
average byot train --ema saved (BatchNorm statistics included), say so, and refuse a checkpoint without one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from byot.cli import main
from byot.data.digits import load_digits
from byot.deploy.cascade import EarlyExitNet
from byot.deploy.policy import ExitPolicy
from byot.deploy.policy_file import policy_path
from byot.runs.runfiles import read_metrics
from byot.training.build import build_trained
from byot.training.checkpoint import load_checkpoint
from byot.training.resolve import resolve_config

ARCH = "multi_resnet18_kd"


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """A one-epoch digits run with --ema 0.9 and no hold-out: its epoch record scores the average on the test
    split, as byot test does. About 9 s on the 2-core CPU."""
    root = tmp_path_factory.mktemp("ema_run")
    assert main(["train", ARCH, "--dataset", "digits", "--image-size", "16", "--width", "4", "--epochs", "1",
                 "--batch-size", "64", "--ema", "0.9", "--save-folder", str(root), "--no-progress",
                 "--workers", "0"]) == 0
    return root / ARCH


@pytest.fixture
def ckpt(ema_run, tmp_path) -> Path:
    """A private copy of the run's checkpoint (calibrate writes its policy file beside it)."""
    target = tmp_path / "run" / "checkpoint_latest.pth.tar"
    target.parent.mkdir()
    shutil.copy(ema_run / "checkpoint_latest.pth.tar", target)
    return target


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _scores(result: dict) -> list:
    """Per-exit top-1 and top-5, then the ensemble's: what training's metrics.jsonl records."""
    return [(e["top1"], e["top5"]) for e in result["exits"]] + [(result["ensemble"]["top1"],
                                                                 result["ensemble"]["top5"])]


def _write_scans(folder: Path, n: int) -> torch.Tensor:
    """The first n digits test scans as 16 px PNG files; returns them as uint8 (n, 3, 16, 16)."""
    images = load_digits(16)[1].images[:n]
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return images


def test_test_ema_reports_what_training_recorded_for_the_average(ema_run, ckpt, capsys):
    record = read_metrics(ema_run)[-1]
    assert record["epoch"] == 1 and record["eval_split"] == "test"
    # --ema reaching TrainConfig as the decay would be refused (True == 1 is outside [0, 1)): it runs
    averaged = _json(capsys, ["test", ARCH, "--resume", str(ckpt), "--ema", "--json"])
    raw = _json(capsys, ["test", ARCH, "--resume", str(ckpt), "--json"])
    assert averaged["weights"] == "ema" and raw["weights"] == "raw"
    assert _scores(averaged) == _scores(record["ema"])
    assert _scores(raw) == _scores(record)
    assert _scores(averaged) != _scores(raw)  # the two are told apart: this run's average scores otherwise
    assert main(["test", ARCH, "--resume", str(ckpt), "--ema"]) == 0
    assert ", weight average (EMA)," in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "raw"])
def test_export_writes_the_selected_weights_tensor_by_tensor(ckpt, tmp_path, capsys, ema):
    from safetensors.torch import load_file

    out = tmp_path / "all.safetensors"
    report = _json(capsys, ["export", ARCH, "--resume", str(ckpt), "--exit", "all", "--format", "safetensors",
                            "--out", str(out), "--json", *(["--ema"] if ema else [])])
    assert report["metadata"]["weights"] == ("ema" if ema else "raw")
    checkpoint = load_checkpoint(ckpt)
    wanted, other = (checkpoint["ema"], checkpoint["model"]) if ema else (checkpoint["model"], checkpoint["ema"])
    written = {k.removeprefix("net."): v for k, v in load_file(str(out)).items() if k.startswith("net.")}
    assert set(written) == set(wanted)  # every parameter and buffer, BatchNorm's running statistics included
    assert all(torch.equal(written[k], wanted[k]) for k in wanted)
    assert any(not torch.equal(written[k], other[k]) for k in wanted if "running_var" in k)


def test_predict_and_early_exit_run_the_average(ema_run, ckpt, tmp_path, capsys):
    images = _write_scans(tmp_path / "scans", 8)
    rows = _json(capsys, ["predict", "--resume", str(ckpt), str(tmp_path / "scans"), "--threshold", "0.15",
                          "--ema", "--json"])
    # the same answers as the cascade on a model given the average as its weights, built here by hand
    cfg, checkpoint = resolve_config({"resume": str(ckpt)})
    model, runtime = build_trained(cfg, {**checkpoint, "model": checkpoint["ema"]}, torch.device("cpu"))
    with runtime.autocast():
        answer = EarlyExitNet(model, ExitPolicy((0.15, 0.15, 0.15)))(runtime.inputs(images))
    assert [r["exit"] for r in rows] == answer.exit.tolist()
    assert [r["class"] for r in rows] == [checkpoint["classes"][c] for c in answer.predicted.tolist()]
    assert [r["probability"] for r in rows] == pytest.approx(answer.probability.tolist(), abs=1e-6)
    raw = _json(capsys, ["predict", "--resume", str(ckpt), str(tmp_path / "scans"), "--threshold", "0.15", "--json"])
    assert [r["probability"] for r in raw] != pytest.approx([r["probability"] for r in rows], abs=1e-6)
    curve = _json(capsys, ["early-exit", ARCH, "--resume", str(ckpt), "--ema", "--out", str(tmp_path / "ee"),
                           "--json"])
    assert curve["weights"] == "ema"
    recorded = [e["top1"] for e in read_metrics(ema_run)[-1]["ema"]["exits"]]
    assert [e["top1"] for e in curve["exits"]] == pytest.approx(recorded, abs=1e-9)  # the same images right


def test_calibrate_ema_records_its_weights_and_the_raw_weights_are_warned(ckpt, tmp_path, capsys):
    result = _json(capsys, ["calibrate", ARCH, "--resume", str(ckpt), "--val-split", "0.25", "--ema", "--json"])
    assert result["weights"] == "ema"
    assert json.loads(policy_path(ckpt).read_text())["calibration"]["weights"] == "ema"
    _write_scans(tmp_path / "scans", 2)
    assert main(["predict", "--resume", str(ckpt), str(tmp_path / "scans")]) == 0
    assert "temperatures (byot calibrate) were fitted on the ema weights" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["test", ARCH], ["calibrate", ARCH], ["early-exit", ARCH],
                                     ["export", ARCH, "--out", "OUT"], ["predict", "SCANS"]],
                         ids=["test", "calibrate", "early-exit", "export", "predict"])
def test_a_checkpoint_without_an_average_is_refused(digits_checkpoint, tmp_path, capsys, command):
    plain = tmp_path / "model_best.pth.tar"
    shutil.copy(digits_checkpoint, plain)  # trained without --ema
    _write_scans(tmp_path / "scans", 1)
    out = tmp_path / "model.onnx"
    argv = [{"OUT": str(out), "SCANS": str(tmp_path / "scans")}.get(a, a) for a in command]
    assert main([*argv, "--resume", str(plain), "--ema"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("byot: error:")]
    assert errors == [(f"byot: error: {plain} holds no weight average (EMA): it was trained without --ema; "
                       "drop --ema to use its weights, or train with --ema DECAY")]
    assert not out.exists() and not policy_path(plain).exists()
