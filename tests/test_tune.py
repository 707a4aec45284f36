"""byot tune: the search space and its checks, the bookkeeping that survives crashes, and pruning and scoring
through the real workers (with a stand-in trainer). Whole studies of real processes: test_tune_studies.py."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna", reason="byot tune needs the tune extra (pip install 'byot[tune]')")

from byot.cli import main
from byot.errors import ByotError
from byot.jobs.tune import runner
from byot.jobs.tune.space import check_space, parse_param, parse_space, with_params
from byot.jobs.tune.spec import load_tune
from byot.jobs.tune.study import STATE, counted, open_storage, open_study, recover, surplus

DIGITS = {"arch": "multi_resnet18_kd", "dataset": "digits", "image_size": 16, "width": 4, "epochs": 2,
          "batch_size": 64, "val_split": 0.2, "workers": 0}


def write_tune(tmp_path: Path, space: dict, name: str = "digits", **keys) -> Path:
    base = {**DIGITS, **keys.pop("base", {})}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "space": space, **keys}))
    return path


# --- the space -------------------------------------------------------------------------------------------

def test_parameters_take_their_kind_from_the_config_field():
    lr = parse_param("lr", {"low": 0.01, "high": 0.3, "log": True})
    epochs = parse_param("epochs", {"low": 2, "high": 8, "step": 2})
    head = parse_param("head", ["bottleneck", "attention"])
    depth = parse_param("model_options.depth", {"low": 10, "high": 28})
    assert (lr.kind, lr.log, epochs.kind, epochs.step, head.kind, depth.kind) == (
        "float", True, "int", 2, "categorical", "int")
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    values = {p.name: p.suggest(trial) for p in (lr, epochs, head)}
    assert 0.01 <= values["lr"] <= 0.3 and values["epochs"] in (2, 4, 6, 8) and values["head"] in head.choices
    assert with_params({"width": 8, "model_options": {"widen": 2}}, {"model_options.depth": 16, "lr": 0.1}) == {
        "width": 8, "model_options": {"widen": 2, "depth": 16}, "lr": 0.1}


@pytest.mark.parametrize("name, spec, says", [
    ("learning_rate", {"low": 0.1, "high": 1}, "no such option"),
    ("val_split", {"low": 0.1, "high": 0.2}, "same hold-out"),
    ("seed", [0, 1], "selects noise"),
    ("lr", {"low": 0.3, "high": 0.1}, "must be below high"),
    ("lr", {"low": 0.0, "high": 0.1, "log": True}, "low > 0"),
    ("lr", {"low": 0.01}, "needs high"),
    ("lr", {"low": 0.01, "high": 0.1, "scale": "log"}, "unknown key(s) scale"),
    ("epochs", {"low": 2.5, "high": 8}, "whole numbers"),
    ("head", [], "non-empty list"),
    ("head", {"choices": [[1], [2]]}, "each choice"),
    ("lr", {"type": "real", "low": 0.1, "high": 1}, "type must be"),
    ("model_options", [1, 2], "one family option at a time"),
])
def test_a_bad_parameter_is_one_line_naming_it(name, spec, says):
    with pytest.raises(ByotError) as e:
        parse_param(name, spec)
    assert says in str(e.value) and name in str(e.value) and "\n" not in str(e.value)


def test_the_space_is_checked_against_the_base_config():
    params = parse_space({"lr": {"low": 0.01, "high": 0.2}, "exits": ["1,2", "2,3"]})
    check_space(params, dict(DIGITS), {})  # every extreme value is a valid config
    with pytest.raises(ByotError, match=r"lr is searched and also fixed by the command line \(lr 0\.1\)"):
        check_space(params, {**DIGITS, "lr": 0.1}, {"lr": "the command line"})
    with pytest.raises(ByotError, match=r"exits = '1,2' does not make a valid training config.*--no-distill"):
        check_space(params, {**DIGITS, "distill": False}, {})
    with pytest.raises(ByotError, match=r"alpha = 1\.5 .*--alpha must lie in \[0, 1\]"):
        check_space(parse_space({"alpha": {"low": 0.5, "high": 1.5}}), dict(DIGITS), {})


def test_the_tune_file_needs_a_val_split_and_an_objective_the_model_has(tmp_path):
    space = {"lr": {"low": 0.01, "high": 0.2}}
    with pytest.raises(ByotError, match="never on test: give --val-split"):
        load_tune(write_tune(tmp_path, space, base={"val_split": 0.0}), {}, {})
    with pytest.raises(ByotError, match="exit:5: multi_resnet18_kd here has exits 1, 2, 3, 4"):
        load_tune(write_tune(tmp_path, space), {}, {"objective": "exit:5"})
    with pytest.raises(ByotError, match="prunes single-objective studies only"):
        load_tune(write_tune(tmp_path, space), {}, {"objective": "early-exit", "pruner": "median"})
    with pytest.raises(ByotError, match="early-exit needs shallow exits"):
        load_tune(write_tune(tmp_path, space, base={"distill": False}), {}, {"objective": "early-exit"})
    tune = load_tune(write_tune(tmp_path, space), {"epochs": 3}, {"objective": "exit:2", "trials": 7})
    assert (tune.base["epochs"], str(tune.objective), tune.trials, tune.pruner["type"]) == (3, "exit:2", 7, "median")
    early = load_tune(write_tune(tmp_path, space), {}, {"objective": "early-exit"})
    assert (early.objective.directions, early.objective.max_drop, early.pruner["type"]) == (
        ["maximize", "minimize"], 1.0, "none")


@pytest.mark.parametrize("case", ["text as sqlite", "foreign sqlite", "foreign journal", "no val split",
                                  "bad objective", "summary of nothing", "resume given"])
def test_bad_input_is_one_line_and_exit_2_before_training(tmp_path, capsys, case):
    import sqlite3

    tune = write_tune(tmp_path, {"lr": {"low": 0.01, "high": 0.2}}, base={"val_split": 0.0} if case == "no val split"
                      else {})
    args = ["tune", str(tune), "--storage", str(tmp_path / "study.db")]
    if case == "text as sqlite":
        (tmp_path / "study.db").write_text("notes\n")
    elif case == "foreign sqlite":
        with sqlite3.connect(tmp_path / "study.db") as db:
            db.execute("create table invoices (id integer)")
    elif case == "foreign journal":
        (tmp_path / "study.log").write_text("hello\n")
        args[-1] = str(tmp_path / "study.log")
    elif case == "bad objective":
        args += ["--objective", "exit:5"]
    elif case == "summary of nothing":
        args = ["tune", "--summary", "--storage", str(tmp_path / "empty.db")]
    elif case == "resume given":
        args += ["--resume", "auto"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    says = {"text as sqlite": "is not an SQLite database", "foreign sqlite": "tables invoices",
            "foreign journal": "not an Optuna journal file", "no val split": "--val-split",
            "bad objective": "exit:5", "summary of nothing": "empty.db: no such file", "resume given": "--resume"}[case]
    assert err.startswith("byot: error:") and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "digits").exists() and not (tmp_path / "empty.db").exists()  # no folder, no trial


def test_without_optuna_the_error_names_the_extra(monkeypatch):
    import importlib

    import byot.jobs.tune as tune_package

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "optuna" else real(name, *a))
    with pytest.raises(ByotError, match=r"byot tune needs Optuna: pip install 'byot\[tune\]'"):
        tune_package.optuna_module()


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("tune_*.yaml"))


@pytest.mark.parametrize("path", [p for p in SHIPPED if "space" in yaml.safe_load(p.read_text())],
                         ids=lambda p: p.name)
def test_shipped_tune_files_load(path, tmp_path):
    tune = load_tune(path, {"data_dir": str(tmp_path)}, {})
    assert tune.params and tune.base_config.val_split > 0 and tune.base["data_dir"] == str(tmp_path)


# --- bookkeeping: what counts, what is retried ---------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_trial_whose_tuner_died_is_failed_and_queued_once_to_resume_its_run_directory(tmp_path):
    tune = load_tune(write_tune(tmp_path, {"lr": {"low": 0.01, "high": 0.2}}, trials=3), {}, {})
    study = open_study(tune, open_storage(str(tmp_path / "s.log")))
    done = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.2)})
    done.set_user_attr(STATE, "done")
    study.tell(done, 50.0)
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.2)})
    for k, v in {"run_dir": "trials/trial-0001", STATE: "running",
                 "worker": {"host": socket.gethostname(), "pid": _dead_pid(), "started": None}}.items():
        orphan.set_user_attr(k, v)
    alive = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.2)})
    alive.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "started": None})
    notes = recover(study)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "RUNNING", "WAITING"] and len(notes) == 2
    retry = trials[3]
    assert retry.system_attrs["fixed_params"] == trials[1].params and retry.user_attrs["retry_of"] == 1
    assert retry.user_attrs["run_dir"] == "trials/trial-0001" and retry.user_attrs["kills"] == 1
    assert [counted(t) for t in trials] == [True, False, True, True]  # the retry counts in the orphan's place
    assert recover(study) == [] and len(study.trials) == 4  # queued once
    assert not surplus(3, {"retry_of": 1}, trials, 3)  # the retry itself, when a worker takes it
    assert surplus(4, {"retry_of": 1}, trials, 3)  # a copy another worker queued at the same moment
    assert surplus(4, {}, trials, 3) and not surplus(4, {}, trials, 4)  # the study has its 3 trials


def test_another_machines_trial_whose_heartbeat_stopped_is_failed_and_queued_to_resume(tmp_path, monkeypatch):
    # an RDB storage: a trial whose worker ran on another host is judged by its heartbeat alone (short here:
    # stale after 1 s, 90 s in use). SQLite's clock has whole seconds: a heartbeat 2.5 s old reads as 2 or 3
    # s old, one just recorded as 0 or 1
    from byot.jobs.tune import study as study_module

    monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(study_module, "GRACE_SECONDS", 1)
    tune = load_tune(write_tune(tmp_path, {"lr": {"low": 0.01, "high": 0.2}}, trials=3), {}, {})
    storage = open_storage(str(tmp_path / "s.db"))
    study = open_study(tune, storage)
    lr = {"lr": optuna.distributions.FloatDistribution(0.01, 0.2)}
    beating, silent = study.ask(lr), study.ask(lr)
    for trial, folder in ((beating, "trials/trial-0000"), (silent, "trials/trial-0001")):
        for k, v in {"run_dir": folder, STATE: "running",
                     "worker": {"host": "another-machine", "pid": os.getpid(), "started": None}}.items():
            trial.set_user_attr(k, v)  # a live PID here: the host decides, not this machine's process table
        storage.record_heartbeat(trial._trial_id)
    assert recover(study) == [] and [t.state.name for t in study.get_trials()] == ["RUNNING", "RUNNING"]
    time.sleep(2.5)
    storage.record_heartbeat(beating._trial_id)  # its machine still trains it
    notes = recover(study)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["RUNNING", "FAIL", "WAITING"] and len(notes) == 1
    retry = trials[2]
    assert retry.user_attrs["retry_of"] == 1 and retry.user_attrs["run_dir"] == "trials/trial-0001"
    assert retry.system_attrs["fixed_params"] == trials[1].params and sum(counted(t) for t in trials) == 2


# --- the workers, with a stand-in trainer: pruning, values, signals ------------------------------------

FAKE_TRAINER = """
import json, pathlib, sys, time, yaml
root = pathlib.Path(sys.argv[1])
options = yaml.safe_load((root / "sweep_options.yaml").read_text())
run = root / "multi_resnet18_kd"
run.mkdir(parents=True, exist_ok=True)
(run / "config.yaml").write_text(yaml.safe_dump(options))
for epoch in range(1, options["epochs"] + 1):
    top1 = 100 * options["lr"] * epoch  # the accuracy a trial reaches: its lr times the epoch
    record = {"epoch": epoch, "exits": [{"exit": 1, "top1": top1 / 2}, {"exit": 4, "top1": top1}],
              "ensemble": {"top1": top1 - 1}, "epoch_seconds": 2.0}
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\\n")
    time.sleep(0.6)
"""


def test_workers_prune_on_the_validation_accuracy_and_score_model_best(tmp_path, monkeypatch):
    script = tmp_path / "trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(runner, "trial_command", lambda arch, root, redo=False: [sys.executable, str(script), str(root)])
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.1)
    tune = load_tune(write_tune(tmp_path, {"lr": [0.3, 0.2, 0.01, 0.25]}, base={"epochs": 4},
                                pruner={"type": "median", "startup_trials": 2, "warmup_epochs": 0}), {}, {})
    storage = open_storage(str(tmp_path / "study.db"))
    study = open_study(tune, storage)
    for lr in (0.3, 0.2, 0.01, 0.25):  # in this order: two to compare with, then one to prune, then a good one
        study.enqueue_trial({"lr": lr})
    study = runner.run_study(dataclasses.replace(tune, trials=4), storage, tmp_path / "out", jobs=1)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert [t.values[0] if t.values else None for t in trials] == pytest.approx([120.0, 80.0, 1.0, 100.0])
    pruned = trials[2].user_attrs
    assert pruned["pruned_at"] == 1 and pruned["epochs_done"] < 4
    assert pruned["saved_seconds"] == pytest.approx(2.0 * (4 - pruned["epochs_done"]))  # its own epoch time
    assert trials[0].intermediate_values == pytest.approx({1: 30.0, 2: 60.0, 3: 90.0, 4: 120.0})
    assert trials[0].user_attrs["val_exits"] == {"1": pytest.approx(60.0), "4": pytest.approx(120.0)}


def test_objectives_read_their_exit_and_pruners_are_optunas(tmp_path):
    from byot.jobs.tune.spec import parse_objective
    from byot.jobs.tune.study import make_pruner

    record = {"exits": [{"exit": 1, "top1": 11.0}, {"exit": 2, "top1": 22.0}, {"exit": 4, "top1": 44.0}],
              "ensemble": {"top1": 40.0}}
    assert [parse_objective(o, None, None).epoch_value(record) for o in ("deepest", "exit:2", "ensemble")] == [
        44.0, 22.0, 40.0]
    with pytest.raises(ByotError, match="belong to the early-exit objective"):
        parse_objective("deepest", None, 1.0)
    kinds = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "successive-halving": "SuccessiveHalvingPruner",
             "none": "NopPruner"}
    for name, cls in kinds.items():
        tune = load_tune(write_tune(tmp_path, {"lr": {"low": 0.01, "high": 0.2}}, pruner=name), {}, {})
        assert type(make_pruner(tune)).__name__ == cls


EARLY_EXIT_TRAINER = """
import json, pathlib, shutil, sys, yaml
root, checkpoint = pathlib.Path(sys.argv[1]), sys.argv[2]
options = yaml.safe_load((root / "sweep_options.yaml").read_text())
run = root / "multi_resnet18_kd"
run.mkdir(parents=True, exist_ok=True)
for epoch in range(1, options["epochs"] + 1):
    record = {"epoch": epoch, "exits": [{"exit": k, "top1": 10.0 * k} for k in (1, 2, 3, 4)],
              "ensemble": {"top1": 30.0}, "epoch_seconds": 1.0}
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\\n")
shutil.copy(checkpoint, run / "model_best.pth.tar")  # a real trained model stands for what it trained
"""


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """model_best of a real two-epoch digits run with a validation split (a few seconds)."""
    from byot.config import build_config
    from byot.training.fit import fit

    root = tmp_path_factory.mktemp("small_run")
    fit(build_config({}, {**DIGITS, "width": 8, "val_split": 0.25, "save_folder": str(root), "progress": False}))
    return root / "multi_resnet18_kd" / "model_best.pth.tar"


def test_the_early_exit_objective_scores_the_policy_fitted_on_validation(tmp_path, monkeypatch, small_checkpoint):
    from byot.deploy.run import fit_on_validation
    from byot.training.resolve import resolve_config

    script = tmp_path / "trainer.py"
    script.write_text(EARLY_EXIT_TRAINER)
    monkeypatch.setattr(runner, "trial_command", lambda arch, root, redo=False: [sys.executable, str(script), str(root),
                                                                     str(small_checkpoint)])
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.1)
    tune = load_tune(write_tune(tmp_path, {"alpha": [0.1, 0.3]}, base={"width": 8, "val_split": 0.25}, trials=1),
                     {}, {"objective": "early-exit", "max_drop": 2.0})
    study = runner.run_study(tune, open_storage(str(tmp_path / "study.db")), tmp_path / "out", jobs=1)
    (trial,) = study.get_trials()
    cfg, checkpoint = resolve_config({"resume": str(small_checkpoint)})
    expected = fit_on_validation(cfg, checkpoint, "deepest", max_drop=2.0)
    assert trial.state.name == "COMPLETE" and study.directions[1].name == "MINIMIZE"
    assert trial.values == pytest.approx([expected["val"]["top1"], expected["val"]["mean_flops"]])
    assert trial.user_attrs["thresholds"] == expected["thresholds"] and trial.intermediate_values == {}
