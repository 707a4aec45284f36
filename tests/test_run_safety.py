"""Runs never mix: one writer per run directory, --overwrite leaves nothing of the old run, a resume writes
only where the command line says, fitted numbers are stored only with the weights they were fitted on,
outputs never replace inputs. Real ``byot train`` processes where the bug needs them (the digits, a width-4
network at 16 px: seconds per epoch)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reliability import ARCH, RUN, byot_train

from byot.cli import main
from byot.deploy.policy_file import policy_path
from byot.errors import ENVIRONMENT_EXIT, ByotError
from byot.runs.rundir import LOCK_NAME, run_lock
from byot.training.checkpoint import FORMAT, load_checkpoint, remove_stale_temporaries, save_checkpoint


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=False, capture_output=True, text=True, **kwargs)


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert proc.poll() is None, f"the run ended early: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.05)


def test_a_second_trainer_on_the_same_run_directory_is_refused_naming_the_first(tmp_path):
    first = byot_train(tmp_path, "--epochs", "1000", wait=False)  # killed long before its end
    run = tmp_path / ARCH
    _wait_for(run / "log_train.txt", "epoch 1/1000", first)  # the first has written checkpoints: resume auto finds them
    try:
        for extra in (("--resume", "auto"), ("--overwrite",)):
            second = byot_train(tmp_path, "--epochs", "1000", *extra)
            assert second.returncode == 2, second.stderr
            assert f"is in use by another byot process (PID {first.pid})" in second.stderr.strip().splitlines()[-1]
            assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first goes on: nothing of its was deleted or replaced
        time.sleep(0.5)
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    # kill -9 released the lock with the process: a new process takes the run over at once
    proc = byot_train(tmp_path, "--epochs", "1000", "--resume", "auto", "--print-freq", "1", wait=False)
    try:
        _wait_for(run / "log_train.txt", "resumed from", proc)
    finally:
        proc.kill()
        proc.wait()


def test_the_run_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path):
    with run_lock(tmp_path), run_lock(tmp_path):  # a caller of fit may hold it already
        code = ("import sys; from pathlib import Path; from byot.runs.rundir import run_lock\n"
                "try:\n    run_lock(Path(sys.argv[1])).__enter__()\nexcept Exception as e:\n    print(e)\n")
        out = _run([sys.executable, "-c", code, str(tmp_path)]).stdout
        assert f"PID {os.getpid()}" in out
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    out = _run([sys.executable, "-c", code, str(tmp_path)]).stdout
    assert out == ""  # released


def test_clean_up_leaves_the_temporary_files_of_live_writers_alone(tmp_path):
    dead = _run([sys.executable, "-c", "import os; print(os.getpid())"]).stdout.strip()
    mine = tmp_path / f".checkpoint_latest.pth.tar.tmp-{os.getpid()}"
    gone = tmp_path / f".checkpoint_latest.pth.tar.tmp-{dead}"
    for p in (mine, gone):
        p.write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path) == [gone]
    assert mine.exists() and not gone.exists()


def test_overwrite_removes_every_file_of_the_old_run_and_nothing_else(tmp_path, capsys):
    def train(*extra: str) -> int:  # in this process: the subject is the files, not the process
        return main(["train", ARCH, *RUN, "--save-folder", str(tmp_path), *extra])

    assert train("--epochs", "2") == 0  # val split: test_result, previous
    before = sorted(p.name for p in (tmp_path / ARCH).iterdir())
    assert train("--epochs", "1", "--overwrite", "--device", "cuda:7") == 2  # a mistyped flag ...
    assert sorted(p.name for p in (tmp_path / ARCH).iterdir()) == before  # ... costs the old run nothing
    run = tmp_path / ARCH
    (run / "early_exit").mkdir()
    (run / "early_exit" / "curve.json").write_text("{}")
    (run / "confusion_exit1.csv").write_text("x")
    (run / "model_best.pth.tar.policy.json").write_text("{}")  # byot calibrate's fit of the old weights
    (run / "notes.txt").write_text("mine")  # the user's own file
    old = {p.name for p in run.iterdir()}
    assert {"checkpoint_previous.pth.tar", "test_result.json"} <= old and any("tfevents" in n for n in old)
    assert train("--epochs", "1", "--width", "6", "--val-split", "0", "--overwrite") == 0
    left = {p.name for p in run.iterdir()}
    assert "checkpoint_previous.pth.tar" not in left and "test_result.json" not in left
    assert "confusion_exit1.csv" not in left and "early_exit" not in left and (run / "notes.txt").exists()
    assert "model_best.pth.tar.policy.json" not in left
    assert len([n for n in left if "tfevents" in n]) == 1 and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert "epoch 2" not in (run / "log_train.txt").read_text()  # the old run's log went too
    # the new latest damaged: --resume auto finds nothing of the old width-4 run to fall back on
    (run / "checkpoint_latest.pth.tar").write_bytes(b"damaged")
    assert train("--epochs", "1", "--width", "6", "--val-split", "0", "--resume", "auto", "--overwrite") == 0
    assert "starting a new run" in capsys.readouterr().err and load_checkpoint(run / "checkpoint_latest.pth.tar")["config"][
        "width"] == 6


def test_demo_follows_the_overwrite_rule_of_train(tmp_path, capsys):
    latest = tmp_path / ARCH / "checkpoint_latest.pth.tar"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"a CIFAR run's checkpoint")
    assert main(["demo", "--save-folder", str(tmp_path), "--epochs", "1", "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err and latest.read_bytes() == b"a CIFAR run's checkpoint"


def test_a_resume_writes_where_the_command_line_says_never_where_the_checkpoint_says(tmp_path, digits_checkpoint,
                                                                                    monkeypatch, capsys):
    ckpt = tmp_path / "trained" / ARCH / "checkpoint_latest.pth.tar"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(digits_checkpoint.read_bytes())  # 12 epochs: resuming with --epochs 13 trains one
    state = torch.load(ckpt, weights_only=True)
    evil = tmp_path / "somewhere_else"
    state["config"]["save_folder"] = str(evil)
    received = tmp_path / "downloads" / "received.pth.tar"
    received.parent.mkdir()
    torch.save(state, received)
    monkeypatch.chdir(tmp_path)
    resume = ["train", ARCH, "--epochs", "13", "--no-progress", "--resume"]
    assert main([*resume, str(received), "--save-folder", str(tmp_path / "trained")]) == 2
    assert "holds another run" in capsys.readouterr().err  # it would mix with the run there
    assert main([*resume, str(received)]) == 0
    assert not evil.exists() and load_checkpoint(tmp_path / "save_checkpoints" / ARCH / "checkpoint_latest.pth.tar")[
        "epoch"] == 13
    # a checkpoint inside a run directory continues that run by default
    assert main([*resume, str(ckpt)]) == 0 and load_checkpoint(ckpt)["epoch"] == 13


def _edited(ckpt: Path, tmp_path: Path, change) -> Path:
    state = torch.load(ckpt, weights_only=True)
    change(state)
    out = tmp_path / "edited.pth.tar"
    torch.save(state, out)
    return out


EDITS = {
    "no num_classes": (lambda s: s.pop("num_classes"), "no 'num_classes' field"),
    "optimizer not a state": (lambda s: s.update(optimizer="sgd"), "'optimizer' must be"),
    "classes not a list": (lambda s: s.update(classes=5), "'classes' must be a list"),
    "classes of another length": (lambda s: s.update(classes=s["classes"][:3]), "lists 3 names"),
    "config a list": (lambda s: s.update(config=[1, 2]), "'config' must be a mapping"),
    "no rng": (lambda s: s.pop("rng"), "no 'rng' field"),
    "rng of the wrong type": (lambda s: s.update(rng={"torch": [1, 2]}), "'rng' must be"),
    "early_exit mistyped": (lambda s: s.update(early_exit={"thresholds": "abc"}), "'early_exit' must be"),
    "temperature <= 0": (lambda s: s.update(calibration={"temperatures": [1.0, 0.0, 1.0, -2.0]}),
                         "positive numbers"),
    "epoch negative": (lambda s: s.update(epoch=-1), "'epoch' must be"),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_hand_edited_checkpoints_are_refused_on_load(tmp_path, digits_checkpoint, capsys, edit):
    change, words = EDITS[edit]
    path = _edited(digits_checkpoint, tmp_path, change)
    with pytest.raises(ByotError, match="edited by hand"):
        load_checkpoint(path)
    assert main(["predict", "--resume", str(path), str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_calibration_is_stored_only_into_the_weights_it_was_fitted_on(tmp_path, digits_checkpoint, monkeypatch,
                                                                      capsys):
    import byot.deploy.run as deploy

    ckpt = tmp_path / "model_best.pth.tar"
    ckpt.write_bytes(digits_checkpoint.read_bytes())
    rewritten = {}
    real = deploy.collect_logits

    def training_saves_meanwhile(*args, **kwargs):
        if not rewritten:  # the training run that owns this file writes its next epoch meanwhile
            state = load_checkpoint(ckpt)
            state["epoch"] += 1
            save_checkpoint(state, ckpt)
            rewritten["bytes"] = ckpt.read_bytes()
        return real(*args, **kwargs)

    monkeypatch.setattr(deploy, "collect_logits", training_saves_meanwhile)
    assert main(["calibrate", ARCH, "--resume", str(ckpt), "--val-split", "0.25"]) == 2
    assert "changed while this command ran" in capsys.readouterr().err
    assert ckpt.read_bytes() == rewritten["bytes"] and not policy_path(ckpt).exists()
    monkeypatch.setattr(deploy, "collect_logits", real)
    assert main(["calibrate", ARCH, "--resume", str(ckpt), "--val-split", "0.25", "--json"]) == 0
    stored = json.loads(policy_path(ckpt).read_text())
    assert "calibration" in stored and stored["checkpoint_sha256"] == hashlib.sha256(rewritten["bytes"]).hexdigest()
    assert ckpt.read_bytes() == rewritten["bytes"]  # the checkpoint itself is only read


def test_export_never_replaces_its_input_or_an_existing_file_without_force(tmp_path, digits_checkpoint, capsys):
    ckpt = tmp_path / "model_best.pth.tar"
    ckpt.write_bytes(digits_checkpoint.read_bytes())
    original = ckpt.read_bytes()
    base = ["export", ARCH, "--resume", str(ckpt), "--exit", "1", "--format", "safetensors"]
    existing = tmp_path / "exit1.safetensors"
    existing.write_bytes(b"earlier export")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {str(ckpt): "is the checkpoint being exported", str(existing): "exists; add --force",
             str(tmp_path): "is a folder", str(a_file / "sub" / "x.safetensors"): "is a file, not a folder",
             "/proc/byot/x.safetensors": "cannot"}
    for out, words in cases.items():
        assert main([*base, "--out", out]) == 2, out
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, (out, err)
    assert main([*base, "--out", str(ckpt), "--force"]) == 2  # never onto the input, even with --force
    assert "is the checkpoint being exported" in capsys.readouterr().err
    assert ckpt.read_bytes() == original and existing.read_bytes() == b"earlier export"
    assert main([*base, "--out", str(existing), "--force"]) == 0
    assert existing.read_bytes() != b"earlier export" and not list(tmp_path.glob(".*.tmp-*"))
    assert main([*base, "--out", str(tmp_path / "new" / "deep" / "x.safetensors")]) == 0  # folders are made


def _two_class_folder(root: Path, names: tuple[str, str], source: Path) -> Path:
    for split, n in (("train", 6), ("test", 3)):
        for name, cls in zip(names, ("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for f in sorted((source / split / cls).iterdir())[:n]:
                (folder / f.name).write_bytes(f.read_bytes())
    return root


def test_checkpoints_of_other_class_names_are_refused_naming_them(tmp_path, cifar10_jpg, capsys):
    data = _two_class_folder(tmp_path / "a", ("cat", "dog"), cifar10_jpg)
    other = _two_class_folder(tmp_path / "b", ("cat", "fox"), cifar10_jpg)
    run = ["--dataset", "imagefolder", "--image-size", "16", "--width", "4", "--epochs", "1", "--batch-size", "4",
           "--workers", "0", "--no-progress", "--save-folder", str(tmp_path / "runs")]
    assert main(["train", ARCH, "--data-dir", str(data), *run]) == 0
    ckpt = tmp_path / "runs" / ARCH / "checkpoint_latest.pth.tar"
    capsys.readouterr()
    given = ["--resume", str(ckpt), "--data-dir", str(other), "--dataset", "imagefolder"]
    for command in (["test", ARCH, *given], ["calibrate", ARCH, *given, "--val-split", "0.3"],
                    ["early-exit", ARCH, *given, "--val-split", "0.3", "--max-drop", "1"],
                    ["train", ARCH, "--data-dir", str(other), *run, "--epochs", "2", "--resume", str(ckpt)]):
        assert main(command) == 2
        assert "1: 'dog' (checkpoint) vs 'fox' (data)" in capsys.readouterr().err
    assert load_checkpoint(ckpt)["classes"] == ["cat", "dog"]


def test_class_folder_names_that_are_not_utf8_are_printed_escaped(tmp_path, cifar10_jpg):
    data = _two_class_folder(tmp_path / "d", ("cat", "dog"), cifar10_jpg)
    for split in ("train", "test"):
        os.rename(data / split / "dog", os.path.join(os.fsencode(data / split), b"caf\xe9"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    common = ["--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "16", "--workers", "0"]
    train = _run([sys.executable, "-m", "byot", "train", ARCH, *common, "--width", "4", "--epochs", "1",
                            "--batch-size", "4", "--no-progress", "--save-folder", str(tmp_path / "runs")],
                           env=env)
    assert train.returncode == 0 and "Logging error" not in train.stderr, train.stderr
    assert "caf\\udce9" in train.stderr or "caf\\xe9" in train.stderr
    ckpt = tmp_path / "runs" / ARCH / "checkpoint_latest.pth.tar"
    test = _run([sys.executable, "-m", "byot", "test", ARCH, *common, "--resume", str(ckpt),
                           "--per-class"], env=env)
    assert test.returncode == 0 and "Traceback" not in test.stderr, test.stderr
    assert "caf\\udce9" in test.stdout or "caf\\xe9" in test.stdout


def test_reported_accuracies_are_fp32_unless_a_half_precision_is_named(digits_checkpoint, capsys):
    import json

    from byot.training.runtime import Runtime, evaluation_runtime

    bf16 = Runtime(torch.device("cpu"), torch.zeros(3), torch.ones(3), amp="bf16")
    assert evaluation_runtime(bf16, "auto").amp == "off" and evaluation_runtime(bf16, "bf16").amp == "bf16"
    for amp, named in ((None, "fp32"), ("bf16", "bf16")):
        extra = ["--amp", amp] if amp else []
        assert main(["test", ARCH, "--resume", str(digits_checkpoint), "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["precision"] == named


def test_ctrl_c_outside_training_says_interrupted_without_the_training_hint(monkeypatch, capsys):
    from byot import cli

    def interrupted(args):
        raise KeyboardInterrupt

    for command, argv in (("split", ["src", "--out", "dst"]), ("test", [ARCH]), ("calibrate", [ARCH])):
        monkeypatch.setitem(cli.COMMANDS, command, interrupted)
        assert main([command, *argv]) == 130
        assert capsys.readouterr().err.strip() == "byot: interrupted (Ctrl-C)"


def test_importing_the_command_line_does_not_import_torch_and_ctrl_c_at_start_up_is_one_line():
    code = "import sys, byot.cli; print('torch' in sys.modules)"
    assert _run([sys.executable, "-c", code]).stdout.strip() == "False"
    # a Ctrl-C while main() imports torch (the parser is built inside main's handler)
    code = ("import builtins, byot.cli\n"
            "real = builtins.__import__\n"
            "def slow(name, *a, **k):\n"
            "    if name == 'torch':\n        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = slow\n"
            "raise SystemExit(byot.cli.main(['test', 'multi_resnet18_kd']))\n")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 130 and proc.stderr.strip() == "byot: interrupted (Ctrl-C)", proc.stderr


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    proc = _run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)])
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    yield disk
    _run(["umount", str(disk)])


def test_a_full_disk_is_named_and_loses_nothing(tmp_path, small_disk):
    _mount_tmpfs(small_disk, "1200k")  # room for epoch 1's two checkpoints (~0.45 MB each), not more
    proc = byot_train(small_disk, "--epochs", "3")
    assert proc.returncode == ENVIRONMENT_EXIT, proc.stderr  # the machine's failure: byot tune retries it
    last = proc.stderr.strip().splitlines()[-1]
    assert "no space left on the device" in last and "Traceback" not in proc.stderr
    run = small_disk / ARCH
    assert load_checkpoint(run / "checkpoint_latest.pth.tar")["epoch"] >= 1  # the last good one is intact
    assert not list(run.glob(".*.tmp-*"))
    # a disk with no room at all: refused before training, and the probe leaves no empty file behind
    with open(small_disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    fresh = byot_train(small_disk / "other")
    assert fresh.returncode == ENVIRONMENT_EXIT and "no space left on the device" in fresh.stderr and "Traceback" not in fresh.stderr
    assert not (small_disk / "other" / ARCH / ".write-probe").exists()


def test_a_full_disk_during_a_checkpoint_write_is_named_at_a_fault_point(tmp_path):
    assert main(["train", ARCH, *RUN, "--save-folder", str(tmp_path), "--epochs", "1"]) == 0
    latest = tmp_path / ARCH / "checkpoint_latest.pth.tar"
    before = latest.read_bytes()
    proc = byot_train(tmp_path, "--resume", str(latest), fault="disk_full:1")
    assert proc.returncode == ENVIRONMENT_EXIT and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "could not write checkpoint" in last and "no space left on the device" in last
    assert latest.read_bytes() == before


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_process_group_stops_image_folder_training_cleanly(tmp_path, cifar10_jpg, sig, code):
    command = [sys.executable, "-m", "byot", "train", ARCH, "--dataset", "imagefolder", "--data-dir", str(cifar10_jpg),
               "--image-size", "16", "--width", "4", "--epochs", "50", "--batch-size", "8", "--workers", "2",
               "--no-progress", "--print-freq", "1", "--save-folder", str(tmp_path)]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(tmp_path / ARCH / "log_train.txt", "epoch 2 step 3/", proc)
    os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C, `timeout` or a batch scheduler does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "exited unexpectedly" not in err and "--resume" in err
    assert load_checkpoint(tmp_path / ARCH / "checkpoint_latest.pth.tar")["format"] == FORMAT


@pytest.mark.parametrize("command", [
    ["train", ARCH, "--dataset", "digits", "--epochs", "1"], ["bench", ARCH, "--steps", "1"],
])
@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "cpu:x", "cuda:7"])
def test_devices_byot_cannot_run_on_are_one_line(tmp_path, capsys, command, device):
    folder = ["--save-folder", str(tmp_path)] if command[0] == "train" else []
    assert main([*command, "--device", device, *folder]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith((f"byot: error: --device {device}", f"byot: error: --device '{device}'"))
    assert len(err.splitlines()) == 1


def test_bench_flags_use_the_ranges_train_uses(capsys):
    assert main(["bench", ARCH, "--width", "100000"]) == 2
    assert "--width must lie in [1, 1024]" in capsys.readouterr().err


@pytest.mark.parametrize("edit,words", [
    (lambda s: s.update(optimizer={"state": {}, "param_groups": []}), "optimizer, scaler or RNG state does not fit"),
    (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "optimizer, scaler or RNG state does not fit"),
], ids=["optimizer without groups", "rng of the wrong length"])
def test_training_state_that_does_not_fit_is_one_line_on_resume(tmp_path, digits_checkpoint, capsys, edit, words):
    path = _edited(digits_checkpoint, tmp_path, edit)
    assert main(["train", ARCH, "--resume", str(path), "--epochs", "13", "--save-folder", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err.splitlines()[-1] and "Traceback" not in err


def test_a_stored_policy_of_the_wrong_length_is_one_line(tmp_path, digits_checkpoint, capsys):
    path = _edited(digits_checkpoint, tmp_path, lambda s: s.update(early_exit={"thresholds": [0.5], "final": "deepest"}))
    assert main(["predict", "--resume", str(path), str(path)]) == 2
    assert "has 1 thresholds" in capsys.readouterr().err


def test_extending_a_finished_run_drops_its_old_test_result(tmp_path, digits_checkpoint):
    from byot.training.fit import fit
    from byot.training.resolve import resolve_config

    run = tmp_path / ARCH
    run.mkdir()
    (run / "checkpoint_latest.pth.tar").write_bytes(digits_checkpoint.read_bytes())
    (run / "test_result.json").write_text('{"exits": [], "epoch": 12}')  # the 12-epoch run's one test
    cfg, checkpoint = resolve_config({"arch": ARCH, "resume": str(run / "checkpoint_latest.pth.tar"), "epochs": 14,
                                      "progress": False})
    fit(cfg, checkpoint, stop_after=1)  # cut after epoch 13 of 14: no test result may stand for this run
    assert not (run / "test_result.json").exists()
