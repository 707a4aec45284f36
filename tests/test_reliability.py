"""Fault injection with real processes: kill -9 anywhere, SIGINT/SIGTERM, NaN losses, full disks, bad files.

Every run is a real ``byot train`` process on the digits (deterministic on the CPU), 3 epochs of a width-4
network at 16 px with a validation hold-out: about 4 s. A crash is either a real SIGKILL from outside or
one the process sends itself at a named point (``BYOT_FAULT``, byot.runs.faults), so the place of death
is exact. The reference is the same run, uninterrupted.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import metrics, without_timing

from byot.cli import main
from byot.training.checkpoint import FORMAT, load_checkpoint

ARCH = "multi_resnet18_kd"
RUN = ["--dataset", "digits", "--image-size", "16", "--width", "4", "--epochs", "3", "--batch-size", "64",
       "--val-split", "0.2", "--no-progress", "--print-freq", "5"]
STEPS_PER_EPOCH = 18  # ceil(1150 training digits left after the 20% hold-out / 64)


def byot_train(folder: Path, *extra: str, fault: str | None = None, wait: bool = True, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # identical numerics in every run of this file
    env.pop("BYOT_FAULT", None)
    if fault:
        env["BYOT_FAULT"] = fault
    command = [sys.executable, "-m", "byot", "train", ARCH, *RUN, "--save-folder", str(folder), *extra]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False, **kwargs)


def results(folder: Path) -> tuple[list[dict], dict]:
    """metrics.jsonl without timing, and the final test evaluation without its checkpoint path."""
    run = folder / ARCH
    final = json.loads((run / "test_result.json").read_text())
    final.pop("checkpoint")
    return without_timing(metrics(run)), final


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[dict], dict]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    proc = byot_train(folder)
    assert proc.returncode == 0, proc.stderr
    return results(folder)


def resume_and_compare(folder: Path, reference: tuple[list[dict], dict]) -> subprocess.CompletedProcess:
    latest = folder / ARCH / "checkpoint_latest.pth.tar"
    proc = byot_train(folder, "--resume", str(latest))
    assert proc.returncode == 0, proc.stderr
    assert results(folder) == reference  # every epoch's metrics and the final test: exactly the same
    return proc


@pytest.mark.parametrize("fault,epochs_saved", [
    (f"train_step:{STEPS_PER_EPOCH + 7}", 1),  # mid epoch 2
    ("evaluate:9", 1),  # during epoch 2's evaluation (5 validation batches per epoch)
    ("checkpoint_write:3", 1),  # writing epoch 2's checkpoint (epoch 1 wrote model_best and latest)
    ("after_metrics:2", 1),  # epoch 2's metrics line written, its checkpoints not yet
])
def test_kill_9_anywhere_loses_at_most_the_current_epoch(tmp_path, reference, fault, epochs_saved):
    proc = byot_train(tmp_path, fault=fault)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / ARCH
    assert load_checkpoint(run / "checkpoint_latest.pth.tar")["epoch"] == epochs_saved
    leftovers = list(run.glob(".*.tmp-*"))
    if fault.startswith("checkpoint_write"):
        assert leftovers  # the write that was cut short ...
    resumed = resume_and_compare(tmp_path, reference)
    assert not list(run.glob(".*.tmp-*"))  # ... is cleaned up, and said so
    if leftovers:
        assert "cut short" in resumed.stderr


def test_kill_9_from_outside_mid_epoch(tmp_path, reference):
    proc = byot_train(tmp_path, wait=False)
    log = tmp_path / ARCH / "log_train.txt"
    deadline = time.monotonic() + 120
    while not (log.exists() and "epoch 2 step 10/" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before epoch 2"
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    resume_and_compare(tmp_path, reference)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_within_seconds_with_a_resumable_checkpoint(tmp_path, reference, sig, code):
    proc = byot_train(tmp_path, wait=False)
    log = tmp_path / ARCH / "log_train.txt"
    deadline = time.monotonic() + 120
    while not (log.exists() and "epoch 2 step 5/" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and time.monotonic() - sent < 10
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path / ARCH / "checkpoint_latest.pth.tar")["epoch"] == 1
    resume_and_compare(tmp_path, reference)


def test_a_signal_during_a_checkpoint_write_waits_for_the_write(tmp_path):
    # SIGINT arrives while epoch 1's model_best is being written: the write, and latest's, complete first
    proc = byot_train(tmp_path, fault="checkpoint_write:1:INT")
    assert proc.returncode == 130, proc.stderr
    run = tmp_path / ARCH
    assert load_checkpoint(run / "checkpoint_latest.pth.tar")["epoch"] == 1
    assert load_checkpoint(run / "model_best.pth.tar")["epoch"] == 1
    assert not list(run.glob(".*.tmp-*"))


def test_a_second_ctrl_c_exits_at_once(monkeypatch):
    # two SIGINTs sent back to back may reach a process as one, so the handler is driven directly: the
    # first signal during a checkpoint write is held; the second ends the process at once, write or not
    from byot.runs import signals

    exits = []
    monkeypatch.setattr(signals.os, "_exit", lambda code: exits.append(code))
    with signals.handle_signals(), pytest.raises(signals.Interrupted) as stopped, signals.critical_section():
        signals._handler(signal.SIGINT, None)  # held until the write is complete
        assert exits == []
        signals._handler(signal.SIGINT, None)  # the second: os._exit(130) at once
        assert exits == [130]
    assert stopped.value.exit_code == 130  # the held first one, raised once the write completed


def test_a_parents_death_announced_once_per_thread_is_one_stop(monkeypatch):
    # a sweep's or a tuner's child asks for SIGHUP when its parent ends (PR_SET_PDEATHSIG); the kernel sends
    # it again each time the orphan passes to another thread of the dying parent (a killed parent with 8
    # idle threads besides its main one and the child's starter: up to 7 times, measured). Counted as second signals, they ended the child in the middle of saving its
    # epoch; they are one stop, and a SIGTERM after it still ends the process at once
    from byot.runs import signals

    exits = []
    monkeypatch.setattr(signals.os, "_exit", lambda code: exits.append(code))
    with signals.handle_signals(), pytest.raises(signals.Interrupted) as stopped, signals.critical_section():
        for _ in range(7):
            signals._handler(signal.SIGHUP, None)
        assert exits == []  # the write in progress goes on
    assert stopped.value.exit_code == 129 and exits == []  # one stop, once the write was complete
    assert signals.signal_name(signal.SIGHUP) == "SIGHUP: its parent process or terminal ended"
    with signals.handle_signals(), pytest.raises(signals.Interrupted), signals.critical_section():
        signals._handler(signal.SIGHUP, None)
        signals._handler(signal.SIGTERM, None)  # a real second signal
        assert exits == [143]


def test_after_a_stop_a_helper_threads_lost_connection_is_not_printed(capsys):
    # multiprocessing.resource_sharer's thread (which hands DataLoader workers' tensors over) reports its own
    # errors through sys.excepthook: a worker stopped by the same Ctrl-C mid-handshake is no traceback
    import threading

    from byot.runs import signals

    def report(error: Exception) -> None:
        sys.excepthook(type(error), error, None)  # as resource_sharer's _serve reports what it caught

    with signals.handle_signals():
        helper = threading.Thread(target=report, args=(ConnectionResetError("peer gone"),), name="Thread-9 (_serve)")
        helper.start(), helper.join()
        assert capsys.readouterr().err != ""  # before any stop signal: printed as ever
        signals._state["received"] = 1  # a stop signal has arrived
        helper = threading.Thread(target=report, args=(ConnectionResetError("peer gone"),), name="Thread-9 (_serve)")
        helper.start(), helper.join()
        assert capsys.readouterr().err == ""
        report(ValueError("in the main thread"))  # the main thread's errors are never hidden
        assert "ValueError" in capsys.readouterr().err
        signals._state["received"] = 0


def test_nonfinite_loss_stops_naming_step_epoch_and_term(tmp_path):
    proc = byot_train(tmp_path, fault=f"nonfinite_loss:{STEPS_PER_EPOCH + 7}")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert "loss term kd/exit2 became non-finite at epoch 2, step 7" in err and "lower --lr" in err
    assert load_checkpoint(tmp_path / ARCH / "checkpoint_latest.pth.tar")["epoch"] == 1  # the good one, kept


def test_skip_nonfinite_skips_the_update_and_goes_on(tmp_path):
    proc = byot_train(tmp_path, "--skip-nonfinite", "2", fault=f"nonfinite_loss:{STEPS_PER_EPOCH + 7}")
    assert proc.returncode == 0, proc.stderr
    assert "skipped the update of 1 non-finite step(s) in epoch 2 (first: step 7, kd/exit2)" in proc.stderr
    records = metrics(tmp_path / ARCH)
    assert [m["nonfinite_steps"] for m in records] == [0, 1, 1]
    state = load_checkpoint(tmp_path / ARCH / "checkpoint_latest.pth.tar")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(0 <= m["losses"]["loss"] < 100 for m in records)  # the NaN step is left out of the means


def test_a_diverging_run_stops_with_advice(tmp_path):
    proc = byot_train(tmp_path, "--lr", "1e6")
    assert proc.returncode == 2
    assert "became non-finite at epoch 1" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_save_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    started = time.monotonic()
    proc = byot_train(blocker / "runs")
    assert proc.returncode == 2 and "byot: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "epoch 1" not in proc.stderr and time.monotonic() - started < 60


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path):
    assert byot_train(tmp_path, "--epochs", "1").returncode == 0  # a 1-epoch run: its checkpoint is the previous
    latest = tmp_path / ARCH / "checkpoint_latest.pth.tar"
    size = latest.stat().st_size
    proc = byot_train(tmp_path, "--resume", str(latest), preexec_fn=_limit_file_size(size // 2))
    assert proc.returncode == 2
    assert "could not write checkpoint" in proc.stderr and "previous file is intact" in proc.stderr
    assert load_checkpoint(latest)["epoch"] == 1 and latest.stat().st_size == size
    assert not list((tmp_path / ARCH).glob(".*.tmp-*"))


def _trained(tmp_path: Path, *extra: str) -> Path:
    assert byot_train(tmp_path, "--epochs", "1", *extra).returncode == 0
    return tmp_path / ARCH / "checkpoint_latest.pth.tar"


def test_checkpoints_of_another_kind_are_refused_saying_what_differs(tmp_path, capsys):
    ckpt = _trained(tmp_path, "--head", "attention")
    assert main(["test", ARCH, "--resume", str(ckpt), "--head", "bottleneck"]) == 2
    assert "--head 'bottleneck' (checkpoint: 'attention')" in capsys.readouterr().err
    assert main(["test", "multi_resnet50_kd", "--resume", str(ckpt)]) == 2
    assert "--arch 'multi_resnet50_kd' (checkpoint: 'multi_resnet18_kd')" in capsys.readouterr().err
    state = torch.load(ckpt, weights_only=True)
    newer = tmp_path / "newer.pth.tar"
    torch.save({**state, "format": "byot-checkpoint-v2", "version": "9.0"}, newer)
    assert main(["test", ARCH, "--resume", str(newer)]) == 2
    assert "written by byot 9.0 in checkpoint format byot-checkpoint-v2; this byot" in capsys.readouterr().err
    edited = tmp_path / "edited.pth.tar"
    model = dict(state["model"])
    model.pop("heads.0.fc.weight")
    torch.save({**state, "model": model}, edited)
    assert main(["test", ARCH, "--resume", str(edited)]) == 2
    assert "does not fit the model" in capsys.readouterr().err and state["format"] == FORMAT


class _Payload:
    """Unpickling this runs ``touch marker``: what a loader that executes pickles would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth.tar"
    evil.write_bytes(pickle.dumps({"format": FORMAT, "model": _Payload(marker)}, protocol=2))
    torch.save({"format": FORMAT, "payload": _Payload(marker)}, tmp_path / "evil2.pth.tar")
    for path in (evil, tmp_path / "evil2.pth.tar"):
        assert main(["test", ARCH, "--resume", str(path), "--dataset", "digits"]) == 2
        assert "cannot read checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the payload is real: a plain unpickler runs it
    assert marker.exists()


def test_a_yaml_config_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", ARCH, "--dataset", "digits", "--config", str(config)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not marker.exists()
    yaml.unsafe_load(config.read_text())  # the payload is real: an unsafe loader runs it
    assert marker.exists()


def test_the_folder_reader_does_not_follow_links_out_of_the_data(tmp_path, cifar10_jpg, caplog):
    from byot.data.folder import index_folder

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(next((cifar10_jpg / "train" / "cat").iterdir()).read_bytes())
    root = tmp_path / "data" / "train"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for f in sorted((cifar10_jpg / "train" / name).iterdir())[:2]:
            (root / name / f.name).write_bytes(f.read_bytes())
    (root / "cat" / "link.jpg").symlink_to(secret)  # a file link leaving the data
    (root / "stolen").symlink_to(outside, target_is_directory=True)  # a class folder leaving it
    (root / "dog" / "inside.jpg").symlink_to(root / "cat" / min(os.listdir(root / "cat")))  # stays inside
    index = index_folder(root)
    assert index.classes == ["cat", "dog"]
    # 2 + 2 copies, the link out refused, the link inside a second name of a cat image (listed once)
    assert secret not in [p.resolve() for p in index.paths] and len(index.paths) == 4
    assert "outside" in caplog.text


def test_a_cut_test_result_is_redone_on_resume(tmp_path, reference):
    assert byot_train(tmp_path).returncode == 0
    result = tmp_path / ARCH / "test_result.json"
    result.write_text(result.read_text()[:40])  # a crash while it was written
    from byot.runs.trainchild import finished, stored_config

    assert finished(tmp_path / ARCH, stored_config(tmp_path / ARCH)) is None  # a sweep would redo this run, not crash on it
    proc = byot_train(tmp_path, "--resume", str(tmp_path / ARCH / "checkpoint_latest.pth.tar"))
    assert proc.returncode == 0, proc.stderr
    assert results(tmp_path) == reference


def test_a_child_whose_parent_dies_hears_of_it_even_without_the_kernels_signal(tmp_path):
    """The watcher thread alone (the kernel's parent-death signal switched off) sends the SIGHUP."""
    heard = tmp_path / "heard"
    child = (
        "import os, signal, sys, time\n"
        "import byot.runs.signals as s\n"
        "s.die_with_parent = lambda *a: None  # no PR_SET_PDEATHSIG: the watcher must do it\n"
        "s.PARENT_POLL_SECONDS = 0.05\n"
        f"signal.signal(signal.SIGHUP, lambda *a: (open({str(heard)!r}, 'w').write('hup'), sys.exit(0)))\n"
        "s.stop_with_parent_if_asked()\n"
        "time.sleep(30)\n")
    middle = (  # starts the child, then ends at once: the child is orphaned
        "import os, subprocess, sys\n"
        "env = {**os.environ, 'BYOT_STOP_WITH_PARENT': str(os.getpid())}\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}], env=env, start_new_session=True)\n"
        "import time; time.sleep(1.5)\n")
    subprocess.run([sys.executable, "-c", middle], check=True, timeout=60)
    deadline = time.monotonic() + 20
    while not heard.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert heard.read_text() == "hup"
