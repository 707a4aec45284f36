"""Deployment on a really trained model (digits scans): calibrate, early-exit, the real cascade, export, predict."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import between_samples
from PIL import Image

from byot.cli import main
from byot.data import NORMALIZATION
from byot.data.digits import load_digits
from byot.deploy import run as deploy_run
from byot.deploy.cascade import EarlyExitNet
from byot.deploy.policy import ExitPolicy, simulate
from byot.deploy.policy_file import policy_path, read_fitted
from byot.training.build import build_trained, load_data
from byot.training.checkpoint import load_checkpoint
from byot.training.evaluate import collect_logits
from byot.training.resolve import resolve_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"




def _trained(path: Path, amp: str = "off"):
    """The checkpoint's model and runtime, fp32 by default; ``amp="auto"`` is what the commands run."""
    cfg, checkpoint = resolve_config({"resume": str(path), "amp": amp})
    model, runtime = build_trained(cfg, checkpoint, torch.device("cpu"))
    return cfg, checkpoint, model, runtime


def _quantile_policy(logits: torch.Tensor, final: str) -> ExitPolicy:
    """Thresholds at the 40th-60th percentile of each shallow exit's confidence: every exit answers some."""
    conf = [torch.softmax(z, dim=1).max(dim=1).values for z in logits[:-1]]
    # (leave shares 0.4, 0.5, 0.6: thresholds between two images' confidences, see between_samples)
    return ExitPolicy(tuple(between_samples(c, 1 - q) for c, q in zip(conf, (0.6, 0.5, 0.4))), final=final)


@pytest.mark.parametrize("final", ["deepest", "ensemble"])
def test_real_cascade_equals_the_simulated_policy(ckpt, final):
    cfg, _, model, runtime = _trained(ckpt)
    data = load_data(cfg, torch.device("cpu"))
    logits, targets = collect_logits(model, data.test, runtime)
    policy = _quantile_policy(logits, final)
    simulated = simulate(logits, policy)
    assert set(simulated.exit_position.tolist()) == {0, 1, 2, 3}  # every exit answers someone
    sizes: dict[int, list[int]] = {}
    hooks = [stage.register_forward_hook(lambda m, i, o, k=k: sizes.setdefault(k, []).append(len(o)))
             for k, stage in enumerate(model.stages, start=1)]
    net = EarlyExitNet(model, policy)
    predicted, exits, probability = [], [], []
    for images, _ in data.test:
        answer = net(runtime.inputs(images))
        predicted.append(answer.predicted)
        exits.append(answer.exit)
        probability.append(answer.probability)
    for h in hooks:
        h.remove()
    assert torch.equal(torch.cat(predicted), simulated.predicted)
    assert torch.equal(torch.cat(exits), simulated.exit_position + 1)
    assert torch.allclose(torch.cat(probability), simulated.probability.float(), atol=1e-6)
    # the batch really shrinks: stage 4 runs on fewer images than stage 1
    assert sum(sizes[4]) < sum(sizes[3]) < sum(sizes[2]) < sum(sizes[1]) == len(targets)


def test_calibrate_fits_on_validation_and_lowers_test_nll(ckpt, capsys):
    assert main(["calibrate", "multi_resnet18_kd", "--resume", str(ckpt), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["temperatures"]) == 4 and all(t > 0 for t in result["temperatures"])
    train, _ = load_digits(16)
    per_class = torch.bincount(train.labels).tolist()
    assert result["num_val_images"] == sum(round(n * 0.25) for n in per_class)  # 25% of every class
    for row in result["val"]:  # fitted there: the NLL cannot rise
        assert row["nll_after"] <= row["nll_before"] + 1e-9
    test = result["test"]
    assert sum(r["nll_after"] for r in test) < sum(r["nll_before"] for r in test)  # held-out scans: it generalises
    stored = json.loads(policy_path(ckpt).read_text())["calibration"]
    assert stored["temperatures"] == result["temperatures"] and stored["split"] == "val"
    assert result["policy_file"] == str(policy_path(ckpt)) and "calibration" not in load_checkpoint(ckpt)


def test_early_exit_curve_files_and_fit_on_validation_only(ckpt, capsys, monkeypatch):
    collected: dict[str, torch.Tensor] = {}  # split -> the logits the network produced for it
    fitted_on: list[torch.Tensor] = []
    collect, load, fit = deploy_run.collect_logits, deploy_run.load_data, deploy_run.fit_thresholds
    splits: dict[int, str] = {}

    def load_spy(cfg, device):
        data = load(cfg, device)
        splits.update({id(data.val): "val", id(data.test): "test", id(data.train): "train"})
        return data

    def collect_spy(model, batches, runtime):
        logits, targets = collect(model, batches, runtime)
        collected[splits[id(batches)]] = logits
        return logits, targets

    def fit_spy(logits, *args, **kwargs):
        fitted_on.append(logits)
        return fit(logits, *args, **kwargs)

    monkeypatch.setattr(deploy_run, "load_data", load_spy)
    monkeypatch.setattr(deploy_run, "collect_logits", collect_spy)
    monkeypatch.setattr(deploy_run, "fit_thresholds", fit_spy)
    out = ckpt.parent / "curve"
    assert main(["early-exit", "multi_resnet18_kd", "--resume", str(ckpt), "--max-drop", "1", "--out", str(out),
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(collected) == {"val", "test"}  # the training split is never run
    assert len(fitted_on) == 1 and fitted_on[0] is collected["val"]  # thresholds saw validation logits only
    assert {"points", "exits", "full_flops"} <= set(r)
    assert [e["exit"] for e in r["exits"]] == [1, 2, 3, 4] and r["full_flops"] == r["exits"][-1]["flops"]
    assert all({"thresholds", "top1", "mean_flops", "exit_shares"} <= set(p) for p in r["points"])
    fitted = r["fitted"]
    assert fitted["val"]["top1"] >= fitted["val_reference_top1"] - 1 - 1e-9  # --max-drop 1 holds where fitted
    assert fitted["test"]["speedup"] == pytest.approx(r["full_flops"] / fitted["test"]["mean_flops"])
    stored = json.loads(policy_path(ckpt).read_text())["early_exit"]
    assert stored["thresholds"] == fitted["thresholds"] and stored["criterion"] == {"max_drop": 1.0}
    assert stored["val"] == fitted["val"] and "early_exit" not in load_checkpoint(ckpt)
    assert (out / "curve.png").read_bytes()[:8] == PNG_SIGNATURE
    rows = list(csv.reader((out / "curve.csv").open()))
    assert len(rows) == len(r["points"]) + 1 and rows[0][:3] == ["threshold_exit1", "threshold_exit2",
                                                                  "threshold_exit3"]
    assert json.loads((out / "curve.json").read_text())["points"] == r["points"]


def test_fitting_without_a_validation_split_is_refused(tmp_path, capsys):
    assert main(["train", "multi_resnet18_kd", "--dataset", "digits", "--image-size", "16", "--width", "4",
                 "--epochs", "1", "--save-folder", str(tmp_path), "--no-progress"]) == 0
    ckpt = tmp_path / "multi_resnet18_kd" / "model_best.pth.tar"
    capsys.readouterr()
    assert main(["calibrate", "multi_resnet18_kd", "--resume", str(ckpt)]) == 2
    assert "trained without --val-split" in capsys.readouterr().err
    assert main(["early-exit", "multi_resnet18_kd", "--resume", str(ckpt), "--budget-flops", "1e6"]) == 2
    assert "trained without --val-split" in capsys.readouterr().err
    # the curve alone reads only the test split: allowed
    assert main(["early-exit", "multi_resnet18_kd", "--resume", str(ckpt), "--json"]) == 0


def _real_images(n: int) -> torch.Tensor:
    """The first n digits test scans at 16 px, as uint8 (n, 3, 16, 16)."""
    _, test = load_digits(16)
    return test.images[:n]


def test_onnx_export_matches_pytorch_on_real_images_and_runs_without_byot(ckpt, tmp_path, capsys):
    out = tmp_path / "exit2.onnx"
    assert main(["export", "multi_resnet18_kd", "--resume", str(ckpt), "--exit", "2", "--out", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] < 1e-4 and report["exits"] == [2]
    import onnxruntime

    _, _, model, _ = _trained(ckpt)
    images = _real_images(64)
    x = images.float() / 255.0  # what the exported model takes: RGB in [0, 1]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.numpy()})
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["digits"])
    with torch.inference_mode():
        expected = model.forward_exit((x - mean) / std, 2)
    diff = float((expected - torch.from_numpy(got)).abs().max())
    assert diff < 1e-4, diff
    # the standalone example, with byot made unimportable: the file alone carries classes and preprocessing
    classes = load_checkpoint(ckpt)["classes"]
    wanted = {}  # image file -> the class PyTorch gives it
    for i, img in enumerate(images):
        path = tmp_path / (f"digit{i}.png" if i < 5 else f"folder/sub/d{i:02d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
        wanted[str(path)] = classes[int(expected[i].argmax())]
    code = ("import sys, runpy; sys.modules['byot'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")

    def example(*paths: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, str(EXAMPLE), str(out), *map(str, paths)],
                              capture_output=True, text=True, check=False)

    files = [tmp_path / f"digit{i}.png" for i in range(5)]
    proc = example(*files)
    assert proc.returncode == 0, proc.stderr
    assert [r["class"] for r in json.loads(proc.stdout)] == [wanted[str(f)] for f in files]
    # a folder (59 images in a subfolder: more than one onnxruntime batch), a broken file, a hidden one
    (tmp_path / "folder" / "broken.png").write_bytes(PNG_SIGNATURE + b"cut short")
    (tmp_path / "folder" / ".hidden.png").write_bytes(b"not looked at")
    proc = example(files[0], tmp_path / "folder")
    assert proc.returncode == 1  # one unreadable file
    assert "broken.png: cannot read image" in proc.stderr and "hidden" not in proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 60 and {r["path"]: r["class"] for r in rows} == {
        p: c for p, c in wanted.items() if p == str(files[0]) or "folder" in p}


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors"])
def test_other_export_formats_round_trip(ckpt, tmp_path, fmt, capsys):
    out = tmp_path / f"all.{fmt}"
    assert main(["export", "multi_resnet18_kd", "--resume", str(ckpt), "--exit", "all", "--format", fmt,
                 "--out", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)["metadata"]
    assert meta["exits"] == [1, 2, 3, 4] and len(meta["classes"]) == 10 and meta["image_size"] == 16
    _, _, model, _ = _trained(ckpt)
    images = _real_images(8)
    x = images.float() / 255.0
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["digits"])
    with torch.inference_mode():
        expected = model((x - mean) / std).logits
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch >= 2.9
            loaded = torch.jit.load(str(out))
        with torch.no_grad():
            got = loaded(x)
    else:
        from safetensors.torch import load_file

        from byot.deploy.export import ExitNetwork

        net = ExitNetwork(model, [1, 2, 3, 4], (0.0,) * 3, (1.0,) * 3)
        net.load_state_dict(load_file(str(out)))  # the file's mean/std replace the placeholders
        with torch.inference_mode():
            got = net(x)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-5)


def test_export_errors_are_one_line(ckpt, tmp_path, capsys):
    assert main(["export", "multi_resnet18_kd", "--resume", str(ckpt), "--exit", "7", "--out",
                 str(tmp_path / "x.onnx")]) == 2
    assert "exits are 1, 2, 3, 4" in capsys.readouterr().err


def test_predict_json_on_image_files(ckpt, tmp_path, capsys):
    images = _real_images(6)
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    code = main(["predict", "--resume", str(ckpt), str(folder), "--threshold", "0.9", "--json"])
    captured = capsys.readouterr()
    assert code == 1 and "broken.png" in captured.err  # one unreadable file: listed, the rest answered
    rows = json.loads(captured.out)
    assert [Path(r["path"]).name for r in rows] == [f"{i}.png" for i in range(6)]
    classes = load_checkpoint(ckpt)["classes"]
    assert all(r["class"] in classes and 0 < r["probability"] <= 1 and r["exit"] in (1, 2, 3, 4) for r in rows)
    # the same answers as the cascade run on the same pixels (the files are exactly 16 px: no resize)
    _cfg, _checkpoint, model, runtime = _trained(ckpt, amp="auto")
    with runtime.autocast():
        answer = EarlyExitNet(model, ExitPolicy((0.9, 0.9, 0.9)))(runtime.inputs(images))
    assert [r["exit"] for r in rows] == answer.exit.tolist()
    assert [r["class"] for r in rows] == [classes[c] for c in answer.predicted.tolist()]
    assert np.allclose([r["probability"] for r in rows], answer.probability.tolist(), atol=1e-6)


def test_predict_on_real_jpegs_uses_the_fitted_policy(ckpt, cifar10_jpg, capsys):
    assert main(["early-exit", "multi_resnet18_kd", "--resume", str(ckpt), "--max-drop", "2", "--json"]) == 0
    capsys.readouterr()
    paths = sorted((cifar10_jpg / "test" / "cat").iterdir())
    assert main(["predict", "--resume", str(ckpt), *map(str, paths)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["image", "class", "prob", "exit"] and len(out) == len(paths) + 1


def test_fitted_thresholds_keep_the_temperatures_they_were_fitted_with(ckpt, capsys):
    assert main(["early-exit", "multi_resnet18_kd", "--resume", str(ckpt), "--max-drop", "1", "--json"]) == 0
    capsys.readouterr()
    assert main(["calibrate", "multi_resnet18_kd", "--resume", str(ckpt), "--json"]) == 0  # calibrated afterwards
    capsys.readouterr()
    fitted = read_fitted(ckpt, load_checkpoint(ckpt))
    policy = deploy_run.resolve_policy(fitted, 4, None, None)
    assert policy.thresholds == tuple(fitted.get("early_exit")["thresholds"])  # calibrate kept them
    assert policy.temperatures == ()  # the fit saw uncalibrated confidences; the new calibration is not mixed in
    given = deploy_run.resolve_policy(fitted, 4, [0.5], None)
    assert given.temperatures == tuple(fitted.get("calibration")["temperatures"])  # your own thresholds: calibrated


def test_fitting_on_validation_alone_matches_early_exit_and_leaves_test_and_checkpoint_alone(ckpt, capsys, monkeypatch):
    before = ckpt.read_bytes()
    cfg, checkpoint = resolve_config({"resume": str(ckpt)})
    seen: list[int] = []
    collect = deploy_run.collect_logits
    monkeypatch.setattr(deploy_run, "collect_logits", lambda model, batches, runtime: (
        seen.append(batches.num_samples), collect(model, batches, runtime))[1])
    fitted = deploy_run.fit_on_validation(cfg, checkpoint, "deepest", max_drop=1.0)  # byot tune's early-exit score
    assert seen == [fitted["num_images"]] and ckpt.read_bytes() == before  # validation only, nothing written
    monkeypatch.setattr(deploy_run, "collect_logits", collect)
    assert main(["early-exit", "multi_resnet18_kd", "--resume", str(ckpt), "--max-drop", "1", "--json",
                 "--out", str(ckpt.parent / "curve")]) == 0
    reference = json.loads(capsys.readouterr().out)["fitted"]
    assert fitted["thresholds"] == reference["thresholds"] and fitted["val"] == reference["val"]
    assert fitted["val_reference_top1"] == reference["val_reference_top1"]
