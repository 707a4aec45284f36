"""Checkpoints are immutable after training: calibrate and early-exit write the policy file beside the checkpoint,
predict and export read it, a policy file of another checkpoint is never applied, and a byot 0.5.0 checkpoint
with the values inside still works."""

from __future__ import annotations

import hashlib
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
from byot.deploy.policy_file import POLICY_FORMAT, policy_path, read_fitted
from byot.deploy.run import resolve_policy
from byot.training.build import build_trained
from byot.training.checkpoint import DIGEST, load_checkpoint, save_checkpoint
from byot.training.resolve import resolve_config
from byot.version import __version__

ARCH = "multi_resnet18_kd"
SCANS = 32  # digits test scans written as PNG files for predict


@pytest.fixture(scope="module")
def fitted_run(digits_checkpoint, tmp_path_factory) -> Path:
    """A copy of the digits checkpoint, calibrated, then given thresholds fitted with --max-drop 1."""
    ckpt = tmp_path_factory.mktemp("fitted") / "run" / "model_best.pth.tar"
    ckpt.parent.mkdir()
    shutil.copy(digits_checkpoint, ckpt)
    assert main(["calibrate", ARCH, "--resume", str(ckpt), "--json"]) == 0
    assert main(["early-exit", ARCH, "--resume", str(ckpt), "--max-drop", "1", "--out",
                 str(ckpt.parent.parent / "curve"), "--json"]) == 0
    return ckpt


@pytest.fixture
def ckpt(fitted_run, tmp_path) -> Path:
    """A private copy of the fitted run's folder: the checkpoint and its policy file."""
    shutil.copytree(fitted_run.parent, tmp_path / "run")
    return tmp_path / "run" / fitted_run.name


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """The first SCANS digits test scans as 16 px PNG files (the model's size: no resize)."""
    folder = tmp_path_factory.mktemp("scans")
    for i, image in enumerate(load_digits(16)[1].images[:SCANS]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    return folder


def _json(capsys, argv: list) -> dict | list:
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def _stored(ckpt: Path) -> dict:
    return json.loads(policy_path(ckpt).read_text())


def _answers(rows: list[dict]) -> list[tuple]:
    return [(Path(r["path"]).name, r["class"], r["exit"], round(r["probability"], 6)) for r in rows]


def test_calibrate_and_early_exit_write_the_policy_file_and_leave_the_checkpoint_unchanged(digits_checkpoint,
                                                                                            tmp_path, capsys):
    ckpt = tmp_path / "run" / "model_best.pth.tar"
    ckpt.parent.mkdir()
    shutil.copy(digits_checkpoint, ckpt)
    before = ckpt.read_bytes()
    calibrated = _json(capsys, ["calibrate", ARCH, "--resume", ckpt, "--json"])
    fitted = _json(capsys, ["early-exit", ARCH, "--resume", ckpt, "--max-drop", "1", "--out", tmp_path / "curve",
                            "--json"])["fitted"]
    assert ckpt.read_bytes() == before
    assert policy_path(ckpt).name == "model_best.pth.tar.policy.json"
    assert policy_path(ckpt).exists() and not any(".tmp-" in p.name for p in ckpt.parent.iterdir())
    stored = _stored(ckpt)
    assert stored["format"] == POLICY_FORMAT and stored["checkpoint"] == ckpt.name
    assert stored["checkpoint_sha256"] == hashlib.sha256(before).hexdigest() and stored["byot_version"] == __version__
    calibration, early_exit = stored["calibration"], stored["early_exit"]
    assert calibration["temperatures"] == calibrated["temperatures"] and calibration["weights"] == "raw"
    assert calibration["num_images"] == calibrated["num_val_images"] and calibration["split"] == "val"
    assert early_exit["thresholds"] == fitted["thresholds"] and early_exit["final"] == "deepest"
    assert early_exit["temperatures"] == calibrated["temperatures"]  # fitted on the calibrated confidences
    assert early_exit["criterion"] == {"max_drop": 1.0} and early_exit["fitted_on"] == "val"
    assert early_exit["val"] == fitted["val"] and early_exit["weights"] == "raw"
    # calibrating again keeps the fitted thresholds, as early-exit kept the temperatures
    _json(capsys, ["calibrate", ARCH, "--resume", ckpt, "--val-split", "0.3", "--json"])
    again = _stored(ckpt)
    assert again["early_exit"] == early_exit and again["calibration"]["val_split"] == 0.3
    assert ckpt.read_bytes() == before


def test_predict_and_export_use_the_policy_file(ckpt, scans, capsys):
    stored = _stored(ckpt)
    ee, temperatures = stored["early_exit"], stored["calibration"]["temperatures"]
    assert any(t <= 1 for t in ee["thresholds"]) and ee["temperatures"]  # a real, calibrated policy to follow
    rows = _json(capsys, ["predict", "--resume", ckpt, scans, "--json"])
    cfg, checkpoint = resolve_config({"resume": str(ckpt)})  # amp auto, as the command runs
    model, runtime = build_trained(cfg, checkpoint, torch.device("cpu"))
    images = load_digits(16)[1].images[:SCANS]
    policy = ExitPolicy(tuple(ee["thresholds"]), tuple(ee["temperatures"]), ee["final"])
    with runtime.autocast():
        answer = EarlyExitNet(model, policy)(runtime.inputs(images))
    assert [r["exit"] for r in rows] == answer.exit.tolist() and len(set(answer.exit.tolist())) > 1
    assert [r["class"] for r in rows] == [checkpoint["classes"][c] for c in answer.predicted.tolist()]
    assert [r["probability"] for r in rows] == pytest.approx(answer.probability.tolist(), abs=1e-6)
    for exits, wanted in (("all", temperatures), ("2", temperatures[1:2])):
        out = ckpt.parent.parent / f"exit_{exits}.safetensors"
        meta = _json(capsys, ["export", ARCH, "--resume", ckpt, "--exit", exits, "--format", "safetensors",
                              "--out", out, "--json"])["metadata"]
        assert meta["temperatures"] == wanted


def test_a_policy_file_of_another_checkpoint_is_never_applied(ckpt, scans, capsys):
    state = load_checkpoint(ckpt)
    state["epoch"] += 1
    save_checkpoint(state, ckpt)  # retrained in place: the policy file beside it is now another checkpoint's
    policy = policy_path(ckpt)
    for argv in (["predict", "--resume", ckpt, scans],
                 ["export", ARCH, "--resume", ckpt, "--out", ckpt.parent / "m.onnx"],
                 ["early-exit", ARCH, "--resume", ckpt, "--out", ckpt.parent / "curve"],
                 ["predict", "--resume", ckpt, scans, "--threshold", "0.9"]):  # its temperatures are not used either
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{policy} was fitted on another checkpoint than {ckpt}" in err[0], err
    # what uses nothing of the file runs
    assert main(["predict", "--resume", str(ckpt), str(scans), "--threshold", "0.9", "--no-calibration"]) == 0
    capsys.readouterr()
    # calibrate fits for the new checkpoint and replaces the file: the old thresholds are dropped, not kept
    assert main(["calibrate", ARCH, "--resume", str(ckpt)]) == 0
    assert f"replacing {policy}: it was fitted on another checkpoint" in capsys.readouterr().err
    stored = _stored(ckpt)
    assert stored["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest() and "early_exit" not in stored
    assert main(["predict", "--resume", str(ckpt), str(scans)]) == 0


def test_a_damaged_policy_file_is_refused_in_one_line(ckpt, scans, capsys):
    policy_path(ckpt).write_text('{"format": "byot-policy-v1", "checkpoint_sha256": ')
    assert main(["predict", "--resume", str(ckpt), str(scans)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not valid JSON" in err[0]
    stored = {"format": POLICY_FORMAT, "checkpoint_sha256": load_checkpoint(ckpt)[DIGEST],
              "early_exit": {"thresholds": "high"}}
    policy_path(ckpt).write_text(json.dumps(stored))
    assert main(["predict", "--resume", str(ckpt), str(scans)]) == 2
    assert "'early_exit' must be" in capsys.readouterr().err


def test_a_byot_050_checkpoint_with_the_values_inside_still_gives_them_to_predict(ckpt, scans, tmp_path, capsys):
    stored = _stored(ckpt)
    state = load_checkpoint(ckpt)
    # what byot 0.5.0 wrote into the checkpoint: the calibration entry as now, the fitted policy without the
    # validation numbers
    state["calibration"] = stored["calibration"]
    state["early_exit"] = {k: stored["early_exit"][k]
                           for k in ("thresholds", "temperatures", "final", "criterion", "fitted_on", "weights")}
    del state[DIGEST]
    old = tmp_path / "old" / "model_best.pth.tar"
    old.parent.mkdir()
    torch.save(state, old)
    before = old.read_bytes()
    assert not policy_path(old).exists()
    fitted = read_fitted(old, load_checkpoint(old))
    assert resolve_policy(fitted, 4, None, None).thresholds == tuple(stored["early_exit"]["thresholds"])
    # the same answers as the policy file gives the same weights
    from_file = _json(capsys, ["predict", "--resume", ckpt, scans, "--json"])
    assert _answers(_json(capsys, ["predict", "--resume", old, scans, "--json"])) == _answers(from_file)
    # fitting for it writes a policy file that keeps what the checkpoint held; the checkpoint stays as it was
    _json(capsys, ["calibrate", ARCH, "--resume", old, "--val-split", "0.3", "--json"])
    assert old.read_bytes() == before
    assert _stored(old)["early_exit"] == state["early_exit"]
