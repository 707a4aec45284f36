"""Whole byot tune studies of real byot train processes on the digits: killed with kill -9 and Ctrl-C and
continued, two tuners sharing one storage, and a best.yaml that byot train takes. (Apart from test_tune.py,
so that the suite's two workers share the slow files evenly.)"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna", reason="byot tune needs the tune extra (pip install 'byot[tune]')")

from test_tune import write_tune

from byot.cli import main
from byot.jobs.tune.study import STATE, counted, open_storage
from byot.runs.runfiles import read_metrics

# --- whole studies of real byot train processes --------------------------------------------------------

def _tuner(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "byot", "tune", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _epochs(path: Path) -> list[int]:
    """The epochs of a metrics file's complete lines (a line being written is not one yet)."""
    return [r["epoch"] for r in read_metrics(path.parent)]


def _wait_until(done, proc: subprocess.Popen | None, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        assert proc is None or proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def _no_byot_train_left(folder: Path) -> bool:
    out = subprocess.run(["pgrep", "-f", f"byot train.*{folder}"], check=False, capture_output=True, text=True).stdout
    return not out.strip()


def test_a_study_killed_and_interrupted_continues_and_gives_a_best_yaml_that_trains(tmp_path, capsys):
    tune = write_tune(tmp_path, {"lr": {"low": 0.02, "high": 0.2, "log": True}}, trials=2, base={"epochs": 4},
                      pruner="none")  # 4 epochs: the Ctrl-C after epoch 2 reaches the trial well before its end
    args = [str(tune), "--storage", "study.db"]
    first = tmp_path / "digits" / "trials" / "trial-0000" / "multi_resnet18_kd" / "metrics.jsonl"
    log = first.parent.parent / "tune.log"
    proc = _tuner(args, tmp_path)
    _wait_until(lambda: _epochs(first), proc, "trial 0's first epoch")
    proc.kill()  # kill -9: the tuner leaves its trial RUNNING; the trial's child saves its epoch and stops
    proc.wait()  # (SIGHUP, maybe once per thread the orphan passes to: one stop, not a second signal's exit)
    _wait_until(lambda: "interrupted (SIGHUP" in log.read_text() and _no_byot_train_left(tmp_path), None,
                "trial 0's byot train to stop (no orphan training on)", timeout=60)
    killed_after = len(_epochs(first))  # epochs trial 0 had saved (1, unless the kill came late)
    storage = open_storage(str(tmp_path / "study.db"))
    assert [t.state.name for t in optuna.load_study(study_name="digits", storage=storage).trials] == ["RUNNING"]

    proc = _tuner(args, tmp_path)  # continues: trial 0 is retried as trial 1, resuming its run directory
    _wait_until(lambda: log.read_text().count("resumed from") == 1 and len(_epochs(first)) > killed_after, proc,
                "trial 1 to resume trial 0's run and finish an epoch")
    proc.send_signal(signal.SIGINT)  # Ctrl-C: stops like byot train, the trial is resumed next time
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert output.strip().splitlines()[-1].startswith("byot: interrupted (Ctrl-C)")
    interrupted_after = len(_epochs(first))
    assert interrupted_after < 4  # the Ctrl-C came before the trial's end

    proc = _tuner(args, tmp_path)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    trials = optuna.load_study(study_name="digits", storage=storage).get_trials()
    states = [(t.state.name, t.user_attrs.get(STATE), t.user_attrs.get("retry_of")) for t in trials]
    assert states[:3] == [("FAIL", "running", None), ("FAIL", "interrupted", 0), ("COMPLETE", "done", 1)]
    assert [s[0] for s in states[3:]] == ["COMPLETE"] and sum(counted(t) for t in trials) == 2  # none counted twice
    assert {t.user_attrs["run_dir"] for t in trials[:3]} == {"trials/trial-0000"}  # one run, resumed twice
    assert _epochs(first) == [1, 2, 3, 4]
    text = log.read_text()
    assert text.count("resumed from") == 2, text
    assert f"after epoch {killed_after} " in text and f"after epoch {interrupted_after} " in text, text
    assert not (first.parent / "test_result.json").exists()  # trials never see the test split...
    study_dir = tmp_path / "digits"
    tested = json.loads((study_dir / "test_results.json").read_text())
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.values[0])
    assert list(tested) == [str(best.number)]  # ... the best one does, once
    assert "test split, evaluated once" in output and "2 counted of 2 wanted" in output
    rows = list(csv.DictReader((study_dir / "trials.csv").open()))
    assert [r["state"] for r in rows] == [t.state.name.lower() for t in trials]
    for png in ("history.png", "intermediate.png"):
        assert (study_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert saved["lr"] == pytest.approx(best.params["lr"]) and saved["arch"] == "multi_resnet18_kd"
    assert main(["train", "--config", str(study_dir / "best.yaml"), "--epochs", "1", "--save-folder",
                 str(tmp_path / "again"), "--no-progress"]) == 0  # the file byot train takes as it is
    assert (tmp_path / "again" / "multi_resnet18_kd" / "test_result.json").exists()
    capsys.readouterr()
    assert main(["tune", "--summary", "--storage", str(tmp_path / "study.db"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["complete"] == 2 and summary["counts"]["cut_short"] == 2
    assert json.loads((study_dir / "test_results.json").read_text()) == tested  # not evaluated again


def test_two_tuners_share_one_journal_storage_without_counting_a_trial_twice(tmp_path):
    tune = write_tune(tmp_path, {"lr": {"low": 0.02, "high": 0.2}}, trials=3, base={"epochs": 1}, pruner="none")
    args = [str(tune), "--storage", "study.log"]  # Optuna's journal file: several processes, one file
    procs = [_tuner(args, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = optuna.load_study(study_name="digits", storage=open_storage(str(tmp_path / "study.log"))).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and all(t.user_attrs.get(STATE) in ("done", "surplus") for t in trials)
    assert len({t.user_attrs["run_dir"] for t in complete}) == 3
    workers = {t.user_attrs["worker"]["pid"] for t in complete}
    assert len(workers) == 2  # both tuners trained trials of the one study
