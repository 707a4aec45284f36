"""byot sweep: real runs in their own processes, resumed where they stopped, one table of mean and spread."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import metrics

import byot.jobs.sweep as sweep_module
import byot.runs.children as children_module
from byot.cli import main
from byot.config import TrainConfig, build_config, save_yaml
from byot.errors import ByotError
from byot.jobs.sweep import (
    _mean_std,
    _run_child,
    _train,
    format_results,
    load_sweep,
    write_results,
)
from byot.runs.trainchild import config_changes, finished, slug

BASE = {"arch": "multi_resnet18_kd", "dataset": "digits", "image_size": 16, "width": 4, "epochs": 1,
        "batch_size": 128, "val_split": 0.2}


def write_sweep(tmp: Path, rows: list[dict], seeds=(0,), **base) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp / "out"), "runs_dir": str(tmp / "runs"),
                                    "seeds": list(seeds), "base": {**BASE, **base}, "rows": rows}))
    return path


@pytest.fixture
def children_in_process(monkeypatch):
    """The sweep's ``byot train`` children run in this process: the same command line through
    ``byot.cli.main``, its output appended to the same log. The tests of what a sweep plans, keeps, redoes
    and reports then skip each child's seconds of start-up; the child processes themselves are tested by
    test_a_failing_run_is_reported_and_the_rest_go_on and the signal tests below."""
    def run(command: list[str], log_path: Path) -> int:
        assert command[:4] == [sys.executable, "-m", "byot", "train"]
        logger = logging.getLogger("byot")
        handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                return main(command[3:])
            finally:  # the sweep's own lines go where they went before
                logger.handlers[:], logger.propagate = handlers, propagate
                logger.setLevel(level)
    monkeypatch.setattr(sweep_module, "_run_child", run)


@pytest.mark.usefixtures("children_in_process")
def test_sweep_runs_every_row_and_seed_then_resumes_only_what_is_missing(tmp_path, capsys):
    path = write_sweep(tmp_path, [{"name": "plain", "options": {"distill": False}}, {"name": "byot"}], seeds=(0, 1))
    assert main(["sweep", str(path)]) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    plain, byot = summary["rows"]
    assert plain["seeds"] == [0, 1] and list(plain["exits"]) == ["4"]  # the backbone has only its own head
    assert list(byot["exits"]) == ["1", "2", "3", "4"]
    # each value is the run's own test_result.json, evaluated once with model_best
    result = json.loads((tmp_path / "runs" / "byot" / "seed1" / "multi_resnet18_kd" / "test_result.json").read_text())
    assert byot["exits"]["2"]["values"][1] == result["exits"][1]["top1"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| plain | – | – | – |" in table and "| byot |" in table
    # a run that lost its result is redone; the others are kept as they are
    (tmp_path / "runs" / "byot" / "seed0" / "multi_resnet18_kd" / "test_result.json").unlink()
    kept = (tmp_path / "runs" / "plain" / "seed0" / "multi_resnet18_kd" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["sweep", str(path), "--dry-run"]) == 0
    planned = capsys.readouterr().out.splitlines()
    assert sum("finished" in line for line in planned) == 3 and "byot, seed 0: " in planned[2]
    assert main(["sweep", str(path)]) == 0
    assert (tmp_path / "runs" / "byot" / "seed0" / "multi_resnet18_kd" / "test_result.json").exists()
    assert (tmp_path / "runs" / "plain" / "seed0" / "multi_resnet18_kd" / "metrics.jsonl").read_text() == kept


def test_a_failing_run_is_reported_and_the_rest_go_on(tmp_path, capsys):
    path = write_sweep(tmp_path, [{"name": "broken", "options": {"dataset": "cifar100", "data_dir": "/nonexistent",
                                                                  "image_size": None}},
                                  {"name": "fine"}])
    assert main(["sweep", str(path)]) == 1
    err = capsys.readouterr().err
    assert "broken, seed 0 failed" in err and "sweep.log" in err
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["rows"][0]["failed_seeds"] == [0] and summary["rows"][1]["seeds"] == [0]


def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ByotError, match="unknown option"):
        load_sweep(write_sweep(tmp_path, [{"name": "a", "options": {"widht": 8}}]))
    with pytest.raises(ByotError, match="must differ"):
        load_sweep(write_sweep(tmp_path, [{"name": "A b"}, {"name": "a-b"}]))
    # a bad second row stops the sweep before its valid first row trains
    bad_later = write_sweep(tmp_path, [{"name": "good"}, {"name": "a", "options": {"alpha": 2}}])
    assert main(["sweep", str(bad_later)]) == 2
    assert "alpha" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_mean_and_sample_spread():
    stat = _mean_std([70.0, 72.0, 74.0])
    assert stat["mean"] == pytest.approx(72.0) and stat["std"] == pytest.approx(2.0)  # sqrt((4 + 0 + 4) / 2)
    assert _mean_std([5.0])["std"] == 0.0
    assert slug("full BYOT, attention heads (--head attention)") == "full-byot-attention-heads-head-attention"
    row = {"name": "x", "exits": {"4": _mean_std([1.0, 3.0])}, "ensemble": _mean_std([1.0, 3.0]), "seeds": [0, 1],
           "train_minutes": _mean_std([2.0, 2.0])}
    assert "| x | 2.00 ± 1.41 | – | 2 | 2.0 |" in format_results({"name": "n", "rows": [row]})
    # one column per exit any row has: a 5-block VGG's five, with "–" where the plain backbone has none
    vgg = {**row, "exits": {str(k): _mean_std([float(k)]) for k in range(1, 6)}}
    table = format_results({"name": "n", "rows": [row, vgg]})
    assert "| configuration | exit 1 | exit 2 | exit 3 | exit 4 | exit 5 | ensemble |" in table
    assert "| x | – | – | – | 2.00 ± 1.41 | – | – | 2 | 2.0 |" in table


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid_training_configs(path):
    from byot.config import build_config, load_yaml

    cfg = build_config({}, load_yaml(path))
    assert cfg.batch_size == 128 and cfg.lr == 0.1 and cfg.dataset == "cifar100" and cfg.width == 64
    if cfg.recipe == "journal":  # the journal code's 250 epochs and loss weights
        assert (cfg.epochs, cfg.alpha, cfg.beta, cfg.temperature, cfg.kd_t2) == (250, 0.3, 0.03, 3.0, False)
    else:  # the ICCV paper's
        assert cfg.epochs == 200 and (cfg.alpha, cfg.beta, cfg.temperature) == (0.1, 1e-6, 3.0)


SHIPPED = sorted((REPO / "experiments").glob("*.yaml"))  # sweep files (rows) and byot tune files (space)


@pytest.mark.parametrize("path", [p for p in SHIPPED if "rows" in yaml.safe_load(p.read_text())], ids=lambda p: p.name)
def test_shipped_sweeps_load(path):
    sweep = load_sweep(path)
    assert sweep.rows and sweep.seeds


# --- the shape of a sweep file ---------------------------------------------------------------------------

DELETE = object()
SHAPES = {  # case -> (top-level keys replaced, or DELETE, and what the one error line must say)
    "seeds a word": ({"seeds": "abc"}, "seeds must be a non-empty list of distinct integers"),
    "seeds a number": ({"seeds": 5}, "seeds must be a non-empty list"),
    "seeds empty": ({"seeds": []}, "seeds must be a non-empty list"),
    "seeds not integers": ({"seeds": [0, "x"]}, "seeds must be"),
    "seeds a boolean": ({"seeds": [True]}, "seeds must be"),
    "seeds repeated": ({"seeds": [1, 1]}, "seeds must be a non-empty list of distinct"),
    "seeds negative": ({"seeds": [-1]}, "seeds must be"),
    "rows a number": ({"rows": 5}, "rows must be a non-empty list of rows"),
    "rows empty": ({"rows": []}, "rows must be a non-empty list of rows"),
    "rows blank": ({"rows": None}, "rows must be a non-empty list of rows"),
    "rows missing": ({"rows": DELETE}, "needs rows"),
    "base a list": ({"base": [1, 2]}, "base must be a mapping of byot train options"),
    "name not a string": ({"name": ["x"]}, "name must be a non-empty string"),
    "name missing": ({"name": DELETE}, "needs name"),
    "out a list": ({"out": ["a"]}, "out must be a folder path"),
    "unknown key": ({"seed": [0]}, "unknown key(s) seed; known: name, out, runs_dir, seeds, base, rows"),
    "options a list": ({"rows": [{"name": "a", "options": [1]}]}, "row 1: options must be a mapping"),
    "options a number": ({"rows": [{"name": "a", "options": 5}]}, "row 1: options must be a mapping"),
    "row without name": ({"rows": [{"name": "a"}, {"options": {}}]}, "row 2 needs name"),
    "row name a number": ({"rows": [{"name": 5}]}, "row 1: name must be a non-empty string"),
    "row not a mapping": ({"rows": ["a"]}, "row 1 must be a mapping of name, options, not str"),
    "unknown row key": ({"rows": [{"name": "a", "option": {}}]}, "row 1: unknown key(s) option"),
    "row option unknown": ({"rows": [{"name": "a", "options": {"widht": 8}}]}, "row 'a': unknown option(s) widht"),
    "row option out of range": ({"rows": [{"name": "a", "options": {"momentum": -5}}]},
                                "row 'a': --momentum must lie in [0, 1)"),
}


@pytest.mark.parametrize("case", SHAPES)
def test_a_sweep_file_of_the_wrong_shape_is_one_line_naming_the_key(tmp_path, capsys, case):
    changes, message = SHAPES[case]
    data = {"name": "t", "out": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs"), "seeds": [0],
            "base": BASE, "rows": [{"name": "a"}]}
    data.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not DELETE}, sort_keys=False))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"byot: error: sweep {path}") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err and out == ""


def test_a_sweep_file_that_is_not_a_mapping_is_one_line(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text("- name: a\n")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"byot: error: sweep {path} must hold a mapping of options, not list\n"


# --- a dry run writes nothing ----------------------------------------------------------------------------

def test_a_dry_run_writes_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, [{"name": "a"}, {"name": "b", "options": {"lr": 0.05}}], seeds=(0, 1))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    planned = capsys.readouterr().out.splitlines()
    assert len(planned) == 4 and all(" train multi_resnet18_kd --config " in line for line in planned)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


# --- a run is kept only when it was trained with the options the sweep asks for ------------------------

def fake_finished_run(run_dir: Path, cfg: TrainConfig) -> dict:
    """What a finished run without a validation split leaves: its config and one epoch's metrics."""
    run_dir.mkdir(parents=True)
    save_yaml(cfg, run_dir / "config.yaml", {"num_classes": 10, "byot_version": "0", "world_size": 1})
    record = {"epoch": cfg.epochs, "lr": cfg.lr, "exits": [{"exit": 4, "top1": 50.0, "top5": 90.0}],
              "ensemble": {"top1": 50.0, "top5": 90.0}, "epoch_seconds": 1.0}
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (run_dir / "checkpoint_latest.pth.tar").write_bytes(b"not read here")
    return record


def test_finished_requires_the_options_the_run_was_trained_with(tmp_path):
    cfg = build_config({}, {**BASE, "val_split": 0.0, "save_folder": str(tmp_path)})
    fake_finished_run(cfg.run_dir, cfg)
    assert finished(cfg.run_dir, cfg)["exits"][0]["top1"] == 50.0
    # options that change neither what is learned nor what is measured do not matter
    same = dataclasses.replace(cfg, workers=0, print_freq=1, device="cpu", progress=False, resume="x",
                               save_folder=str(tmp_path / "moved"))
    assert finished(cfg.run_dir, same) is not None and config_changes(same, cfg.run_dir) == []
    assert config_changes(dataclasses.replace(cfg, lr=0.05, alpha=0.2), cfg.run_dir) == ["lr 0.1 -> 0.05",
                                                                                          "alpha 0.1 -> 0.2"]
    assert finished(cfg.run_dir, dataclasses.replace(cfg, lr=0.05)) is None
    (cfg.run_dir / "config.yaml").write_text("lr: [unreadable\n")
    assert finished(cfg.run_dir, cfg) is None and config_changes(cfg, cfg.run_dir) is None


def test_data_dir_is_compared_as_the_folder_it_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = build_config({}, {**BASE, "data_dir": "data", "save_folder": str(tmp_path / "runs")})
    fake_finished_run(cfg.run_dir, cfg)
    assert config_changes(dataclasses.replace(cfg, data_dir=str(tmp_path / "data")), cfg.run_dir) == []
    assert config_changes(dataclasses.replace(cfg, data_dir=str(tmp_path / "other")), cfg.run_dir) == [
        f"data_dir {tmp_path / 'data'} -> {tmp_path / 'other'}"]


def test_a_run_without_a_readable_config_or_with_other_options_would_be_redone(tmp_path, capsys):
    path = write_sweep(tmp_path, [{"name": "no config"}, {"name": "other lr"}, {"name": "same"}], val_split=0.0)
    sweep = load_sweep(path)
    for row in sweep.rows:
        root = sweep.run_root(row, 0)
        cfg = build_config({}, {**sweep.options(row, 0), "save_folder": str(root)})
        fake_finished_run(cfg.run_dir, dataclasses.replace(cfg, lr=0.05) if row.name == "other lr" else cfg)
        if row.name == "no config":
            (cfg.run_dir / "config.yaml").unlink()
    assert main(["sweep", str(path), "--dry-run"]) == 0
    no_config, other_lr, same = capsys.readouterr().out.splitlines()
    assert no_config.startswith("no config, seed 0: no readable config.yaml: would redo: ")
    assert other_lr.startswith("other lr, seed 0: options changed (lr 0.05 -> 0.1): would redo: ")
    assert no_config.endswith(" --overwrite --no-progress") and other_lr.endswith(" --overwrite --no-progress")
    assert same == "same, seed 0: finished"


def test_a_run_that_did_not_produce_a_new_result_is_failed_not_its_old_numbers(tmp_path):
    cfg = build_config({}, {**BASE, "val_split": 0.0, "save_folder": str(tmp_path)})
    fake_finished_run(cfg.run_dir, dataclasses.replace(cfg, lr=0.05))  # an old run with other options
    status = _train("row", 0, cfg, [sys.executable, "-c", "pass"], tmp_path)  # a child that trained nothing
    assert status.state == "failed" and status.result == {}


@pytest.mark.usefixtures("children_in_process")
def test_a_finished_run_whose_options_changed_is_retrained_and_an_unchanged_one_kept(tmp_path, capsys):
    rows = [{"name": "same"}, {"name": "changed", "options": {"lr": 0.1}}]
    path = write_sweep(tmp_path, rows)
    assert main(["sweep", str(path)]) == 0
    same, changed = (tmp_path / "runs" / name / "seed0" / "multi_resnet18_kd" for name in ("same", "changed"))
    kept = (same / "metrics.jsonl").read_text()
    assert [r["lr"] for r in metrics(changed)] == [0.1]
    path = write_sweep(tmp_path, [rows[0], {"name": "changed", "options": {"lr": 0.05}}])
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0
    err = capsys.readouterr().err
    assert "changed, seed 0: options changed (lr 0.1 -> 0.05): redoing from scratch" in err
    assert "same, seed 0: finished before with the same options, kept" in err
    assert [r["lr"] for r in metrics(changed)] == [0.05] and (same / "metrics.jsonl").read_text() == kept
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    result = json.loads((changed / "test_result.json").read_text())
    assert summary["rows"][1]["exits"]["4"]["values"] == [result["exits"][-1]["top1"]]
    assert yaml.safe_load((changed / "config.yaml").read_text())["lr"] == 0.05


# --- signals reach the run in progress, and the sweep waits for it ---------------------------------------

def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _signal_when(path: Path, signum: int, then: Path | None = None) -> threading.Thread:
    """Send ``signum`` to this process once ``path`` exists (and again once ``then`` exists)."""
    def send() -> None:
        for marker in (path, then):
            if marker is None:
                return
            deadline = time.monotonic() + 30
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(os.getpid(), signum)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def stubborn_child(tmp_path: Path) -> list[str]:
    """A child that notes its PID and session and every SIGINT or SIGTERM it gets, and stops for none."""
    code = (f"import os, signal, time, pathlib\n"
            f"d = pathlib.Path({str(tmp_path)!r})\n"
            f"for s in (signal.SIGINT, signal.SIGTERM):\n"
            f"    signal.signal(s, lambda n, f: (d / 'got').write_text(str(n)))\n"
            f"(d / 'session').write_text(str(os.getsid(0)))\n"
            f"(d / 'pid').write_text(str(os.getpid()))\n"
            f"time.sleep(120)\n")
    return [sys.executable, "-c", code]


def test_a_child_that_does_not_stop_is_killed_after_the_grace_time(tmp_path, monkeypatch):
    monkeypatch.setattr(children_module, "CHILD_STOP_SECONDS", 1.0)
    _signal_when(tmp_path / "pid", signal.SIGTERM)
    start = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        _run_child(stubborn_child(tmp_path), tmp_path / "sweep.log")
    assert stopped.value.code == 143 and (tmp_path / "got").read_text() == str(int(signal.SIGTERM))  # forwarded
    assert 1.0 <= time.monotonic() - start < 10  # waited for, then killed
    pid = int((tmp_path / "pid").read_text())
    assert not _alive(pid) and int((tmp_path / "session").read_text()) == pid  # its own session


def test_a_second_signal_kills_the_child_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(children_module, "CHILD_STOP_SECONDS", 60.0)
    _signal_when(tmp_path / "pid", signal.SIGINT, then=tmp_path / "got")  # the second after the first arrived
    start = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        _run_child(stubborn_child(tmp_path), tmp_path / "sweep.log")
    assert stopped.value.code == 130 and (tmp_path / "got").read_text() == str(int(signal.SIGINT))
    assert time.monotonic() - start < 10 and not _alive(int((tmp_path / "pid").read_text()))  # not 60 s


def test_a_hang_up_after_a_first_signal_is_not_a_second_one(tmp_path):
    # SIGHUP (a closed terminal; the kernel may repeat it, see byot.runs.signals) never kills the children
    # the way a second SIGINT or SIGTERM does
    with open(tmp_path / "sweep.log", "a") as log, children_module.ChildStopper() as stopper:
        proc = children_module.start_child(stubborn_child(tmp_path), log)
        stopper.watch(proc)
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        stopper._on_signal(signal.SIGINT, None)  # forwarded once: the stubborn child notes it and goes on
        stopper._on_signal(signal.SIGHUP, None)
        time.sleep(0.5)
        assert proc.poll() is None and stopper.received == [signal.SIGINT]
        stopper._on_signal(signal.SIGTERM, None)  # a second signal: the child's process group is killed
        assert stopper.wait(proc) == -signal.SIGKILL


def test_sigterm_stops_the_sweep_and_its_training_child_together(tmp_path):
    path = write_sweep(tmp_path, [{"name": "long"}], epochs=1000, val_split=0.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "byot", "sweep", str(path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_file = tmp_path / "runs" / "long" / "seed0" / "multi_resnet18_kd" / "log_train.txt"
    train: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not log_file.exists() and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.1)
        children = [int(p) for p in Path(f"/proc/{sweep.pid}/task/{sweep.pid}/children").read_text().split()]
        train += [pid for pid in children if b"train" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert log_file.exists() and len(train) == 1
        sweep.send_signal(signal.SIGTERM)  # to the sweep alone, as `kill` or a scheduler would
        _, err = sweep.communicate(timeout=30)
    finally:  # never leave a training process behind, whatever went wrong
        for pid in (sweep.pid, *train):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert sweep.returncode == 143 and not _alive(train[0])
    assert "rerun" in err.splitlines()[-1] and "Traceback" not in err
    assert "interrupted (SIGTERM)" in (tmp_path / "runs" / "long" / "seed0" / "sweep.log").read_text()


def test_a_sweep_killed_outright_takes_its_training_child_with_it(tmp_path):
    # kill -9 gives the sweep no chance to forward anything: the child, in its own session, learns of it
    # from the kernel (PR_SET_PDEATHSIG: SIGHUP) and stops as on SIGTERM, saying why
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signals are Linux's")
    path = write_sweep(tmp_path, [{"name": "long"}], epochs=1000, val_split=0.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "byot", "sweep", str(path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "runs" / "long" / "seed0" / "multi_resnet18_kd"
    train: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (run / "log_train.txt").exists() and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.1)
        children = [int(p) for p in Path(f"/proc/{sweep.pid}/task/{sweep.pid}/children").read_text().split()]
        train += [pid for pid in children if b"train" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(train) == 1
        sweep.kill()
        sweep.wait()
        deadline = time.monotonic() + 30
        while _alive(train[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(train[0])
    finally:
        for pid in train:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "interrupted (SIGHUP: its parent process or terminal ended)" in \
        (tmp_path / "runs" / "long" / "seed0" / "sweep.log").read_text()


def test_results_that_cannot_be_written_are_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ByotError, match="cannot write the sweep's results"):
        write_results({"name": "s", "rows": []}, blocker / "out")
