"""byot tune, third reliability pass: a study never reports another study's runs or data, failures of the
machine are retried from the checkpoint, a retry counts its own epochs, and every value the sampler can draw
is checked before any trial starts. Trials run through the real workers with a stand-in trainer (a script
that writes what byot train writes), so each test takes seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="byot tune needs the tune extra (pip install 'byot[tune]')")

from test_tune import write_tune

from byot.cli import main
from byot.errors import ByotError
from byot.jobs.tune import runner
from byot.jobs.tune.report import _same_run, counts
from byot.jobs.tune.spec import load_tune
from byot.jobs.tune.study import STATE, STUDY_ID, check_data, open_storage, open_study

# A stand-in for byot train: continues the run's metrics.jsonl from its last epoch (as a resume does), two
# seconds of training per epoch. MODE "env" exits 75 after epoch 2 the first time a run directory trains,
# "kill" SIGKILLs itself there, "disk" exits 75 there (and at once on a resume) while the file FLAG exists,
# "error" exits 1 at once. REDO (--overwrite) clears the run first.
TRAINER = """
import json, os, pathlib, signal, sys, yaml
root, mode, flag, redo = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4] == "redo"
options = yaml.safe_load((root / "sweep_options.yaml").read_text())
if mode == "error":
    print("byot: error: a bad option"); sys.exit(1)
run = root / "multi_resnet18_kd"
run.mkdir(parents=True, exist_ok=True)
(run / "config.yaml").write_text(yaml.safe_dump({**options, "final_test": False}))  # --no-final-test
metrics = run / "metrics.jsonl"
if redo:  # --overwrite: the old run goes
    metrics.unlink(missing_ok=True)
done = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
if mode == "disk" and flag.exists() and len(done) >= 2:  # still full: the resume fails at its first write
    print("byot: error: could not write config.yaml: no space left on the device"); sys.exit(75)
for epoch in range(max(done, default=0) + 1, options["epochs"] + 1):
    record = {"epoch": epoch, "exits": [{"exit": 1, "top1": 10.0 * epoch}, {"exit": 4, "top1": 100 * options["lr"]}],
              "ensemble": {"top1": 15.0}, "epoch_seconds": 2.0}
    with open(metrics, "a") as f:
        f.write(json.dumps(record) + "\\n")
    first = not (root / "failed-once").exists()
    if epoch == 2 and (flag.exists() if mode == "disk" else first and mode in ("env", "kill")):
        (root / "failed-once").write_text("")
        print("byot: error: could not append to metrics.jsonl: no space left on the device", flush=True)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(75)
"""


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    """Point the workers at the stand-in trainer in ``mode``; returns the set-up function and the redo flags
    the workers passed (one per trial started)."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    redo: list[bool] = []
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.05)

    def use(mode: str) -> list[bool]:
        def command(arch, root, again=False):
            redo.append(again)
            return [sys.executable, str(script), str(root), mode, str(tmp_path / "disk-full"),
                    "redo" if again else "resume"]

        monkeypatch.setattr(runner, "trial_command", command)
        return redo

    return use


def _tune(tmp_path: Path, trials: int = 2, epochs: int = 4, name: str = "digits", lrs=(0.1, 0.2)):
    return load_tune(write_tune(tmp_path, {"lr": list(lrs)}, name=name, base={"epochs": epochs}, trials=trials,
                                pruner="none"), {}, {})


# --- failures of the machine: retried from the checkpoint, counted once ----------------------------------

@pytest.mark.parametrize("mode,reason", [("env", "exit code 75"), ("kill", "killed by signal 9")])
def test_a_trial_the_machine_failed_resumes_and_its_epochs_count_once(tmp_path, trainer, mode, reason):
    trainer(mode)
    study = runner.run_study(_tune(tmp_path), open_storage(str(tmp_path / "s.db")), tmp_path / "out", jobs=1)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    cut, retry = trials[0].user_attrs, trials[1].user_attrs
    assert cut[STATE] == "environment" and reason in cut["error"]
    assert retry["retry_of"] == 0 and retry["run_dir"] == cut["run_dir"]  # the same run directory, resumed
    assert (cut["epochs_trained"], cut["train_seconds"]) == (2, 4.0)
    assert (retry["epochs_done"], retry["epochs_trained"], retry["train_seconds"]) == (4, 2, 4.0)
    # two trials of 4 epochs at 2 s each: 16 s, not the 24 s of counting the resumed epochs twice
    assert counts(study)["train_seconds"] == 16.0 and counts(study)["complete"] == 2


def test_a_full_disk_stops_the_study_and_a_rerun_after_freeing_it_resumes_every_trial(tmp_path, trainer):
    trainer("disk")
    (tmp_path / "disk-full").write_text("")
    tune, storage = _tune(tmp_path), open_storage(str(tmp_path / "s.db"))
    with pytest.raises(ByotError, match="3 trials in a row failed through the machine.*rerun the same command"):
        runner.run_study(tune, storage, tmp_path / "out", jobs=1)
    (tmp_path / "disk-full").unlink()  # space freed
    study = runner.run_study(tune, storage, tmp_path / "out", jobs=1)
    c = counts(study)
    assert (c["complete"], c["failed"]) == (2, 0)  # nothing counted as a failed trial
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert done[0].user_attrs["run_dir"] == "trials/trial-0000"  # the first trial's run, resumed
    assert done[0].user_attrs["epochs_trained"] == 2  # from its saved epoch 2, not from scratch


def test_a_study_that_ends_with_no_complete_trial_exits_non_zero(tmp_path, trainer, capsys):
    trainer("error")
    path = write_tune(tmp_path, {"lr": [0.1, 0.2]}, trials=1, pruner="none")
    assert main(["tune", str(path), "--storage", str(tmp_path / "s.db")]) == 1
    err = capsys.readouterr().err
    assert "no trial of study 'digits' completed" in err and "a bad option" in err


# --- a study never takes another study's runs -----------------------------------------------------------

def test_a_copied_study_folder_is_refused_to_a_new_study(tmp_path, trainer):
    trainer("ok")
    runner.run_study(_tune(tmp_path, trials=1), open_storage(str(tmp_path / "st1" / "study.db")),
                     tmp_path / "st1" / "digits", jobs=1)
    assert json.loads((tmp_path / "st1" / "digits" / "study.json").read_text())["study"] == "digits"
    shutil.copytree(tmp_path / "st1" / "digits", tmp_path / "st2" / "digits")
    other = _tune(tmp_path, trials=1, lrs=(0.3, 0.4))
    storage = open_storage(str(tmp_path / "st2" / "fresh.db"))
    with pytest.raises(ByotError, match="holds another study's runs.*is new"):
        runner.run_study(other, storage, tmp_path / "st2" / "digits", jobs=1)
    assert optuna.get_all_study_summaries(storage) == []  # refused before the study was created
    # a study that exists, pointed at a folder tied to another study (--out), is refused too
    elsewhere = open_study(other, storage)
    with pytest.raises(ByotError, match="belongs to study 'digits'"):
        runner.run_study(other, storage, tmp_path / "st1" / "digits", jobs=1)
    assert elsewhere.user_attrs[STUDY_ID] != json.loads((tmp_path / "st1" / "digits" / "study.json").read_text())["id"]


def test_a_trials_run_directory_of_other_options_is_redone_not_resumed(tmp_path, trainer):
    redo = trainer("ok")
    tune, storage = _tune(tmp_path, trials=1), open_storage(str(tmp_path / "s.db"))
    runner.run_study(tune, storage, tmp_path / "out", jobs=1)
    study = open_study(tune, storage)
    first = study.get_trials()[0]
    other = 0.2 if first.params["lr"] == 0.1 else 0.1  # a retry whose run directory holds the other lr's run
    study.enqueue_trial({"lr": other}, user_attrs={"run_dir": first.user_attrs["run_dir"], "retry_of": 0})
    study = runner.run_study(dataclasses.replace(tune, trials=2), storage, tmp_path / "out", jobs=1)
    assert redo == [False, True]  # the second started with --overwrite
    metrics = tmp_path / "out" / first.user_attrs["run_dir"] / "multi_resnet18_kd" / "metrics.jsonl"
    assert study.get_trials()[1].values == [pytest.approx(100 * other)]  # scored on its own run
    assert len(metrics.read_text().splitlines()) == 4  # trained afresh: the old run's epochs are gone


def test_a_stored_test_result_counts_only_for_its_study_and_checkpoint(tmp_path):
    tune = _tune(tmp_path, trials=1)
    study = open_study(tune, open_storage(str(tmp_path / "s.db")))
    study.set_user_attr(STUDY_ID, "abc")
    checkpoint = tmp_path / "model_best.pth.tar"
    checkpoint.write_bytes(b"weights")
    import hashlib

    digest = hashlib.sha256(b"weights").hexdigest()
    assert _same_run({"study_id": "abc", "checkpoint_sha256": digest}, study, checkpoint)
    assert not _same_run({"study_id": "other", "checkpoint_sha256": digest}, study, checkpoint)
    checkpoint.write_bytes(b"retrained")
    assert not _same_run({"study_id": "abc", "checkpoint_sha256": digest}, study, checkpoint)


# --- one study, one data set ----------------------------------------------------------------------------

def _image_folder(root: Path, per_class: int) -> Path:
    from PIL import Image

    for split, n in (("train", per_class), ("test", 2)):
        for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (colour[0], colour[1] + i, colour[2])).save(root / split / c / f"{i}.png")
    return root


def test_a_study_refuses_other_data_and_takes_the_same_data_at_another_path(tmp_path):
    from byot.data.fingerprint import data_fingerprint

    tiny = _image_folder(tmp_path / "tiny", 6)
    moved = tmp_path / "elsewhere" / "tiny-copy"
    shutil.copytree(tiny, moved)
    micro = _image_folder(tmp_path / "micro", 3)
    first = data_fingerprint("imagefolder", str(tiny))
    assert first["counts"] == {"train": 12, "test": 4} and first["classes"] == ["cat", "dog"]
    assert data_fingerprint("imagefolder", str(moved)) == first
    tune = _tune(tmp_path, trials=1)
    study = open_study(tune, open_storage(str(tmp_path / "s.db")))
    check_data(study, first)
    check_data(study, data_fingerprint("imagefolder", str(moved)))  # another machine's copy: accepted
    with pytest.raises(ByotError, match="other data.*train images 12 -> 6"):
        check_data(study, data_fingerprint("imagefolder", str(micro)))
    (moved / "train" / "cat" / "0.png").write_bytes((tiny / "train" / "cat" / "0.png").read_bytes() + b"\0")
    with pytest.raises(ByotError, match="the files differ"):
        check_data(study, data_fingerprint("imagefolder", str(moved)))


def test_the_digits_fingerprint_is_stable():
    from byot.data.fingerprint import data_fingerprint

    a, b = data_fingerprint("digits", None), data_fingerprint("digits", None)
    assert a == b and len(a["classes"]) == 10 and a["counts"]["train"] + a["counts"]["test"] == 1797


# --- every value the sampler can draw is checked before a trial starts -----------------------------------

SPACES = {
    "depth 6n+4": ({"model_options.depth": {"low": 10, "high": 22}}, {"arch": "multi_wrn16_4_kd"},
                   "model_options.depth = 11"),
    "float on an int": ({"epochs": {"type": "float", "low": 1, "high": 3}}, {}, "epochs is a whole number"),
    "range on a choice": ({"head": {"type": "float", "low": 1, "high": 2}}, {}, "head takes a list of choices"),
    "fp16 on a CPU": ({"amp": ["bf16", "fp16"]}, {"device": "cpu"}, "amp = 'fp16'"),
    "missing weights": ({"pretrained": ["/nonexistent.pth", None]}, {}, "/nonexistent.pth: no such file"),
    "an exits choice without the objective's exit": ({"exits": ["1,2,3", "2,3"]}, {"objective": "exit:1"},
                                                     "exit:1"),
    "cutout larger than the image": ({"cutout": [8, 1000]}, {}, "--cutout 1000 is larger than the 16 px"),
}


@pytest.mark.parametrize("case", list(SPACES))
def test_every_value_the_sampler_can_draw_is_checked_before_training(tmp_path, capsys, case):
    space, extra, says = SPACES[case]
    extra = dict(extra)
    objective = extra.pop("objective", None)
    path = write_tune(tmp_path, space, base=extra)
    args = ["tune", str(path), "--storage", str(tmp_path / "s.db")] + (["--objective", objective] if objective else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("byot: error:") and says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "digits").exists()


def test_an_even_int_grid_passes_and_a_long_int_range_is_sampled_not_skipped():
    from byot.jobs.tune.space import MAX_CHECKED_INTS, parse_param

    assert parse_param("model_options.depth", {"low": 10, "high": 22, "step": 6}).values() == [10, 16, 22]
    long = parse_param("epochs", {"low": 1, "high": 100_000}).values()
    assert long[0] == 1 and long[-1] == 100_000 and len(long) == MAX_CHECKED_INTS


def test_an_exit_objective_on_a_missing_exit_is_one_line_not_stopiteration():
    from byot.jobs.tune.spec import Objective

    with pytest.raises(ByotError, match="no exit 1"):
        Objective("exit", 1).epoch_value({"exits": [{"exit": 2, "top1": 3.0}], "ensemble": {"top1": 1.0}})


# --- bad settings: one line, nothing created ------------------------------------------------------------

@pytest.mark.parametrize("case", ["seed -5", "seed 2**32", "seed in the file", "storage /dev/null",
                                  "storage in memory", "storage a fifo", "tune file a fifo", "out a file",
                                  "out the storage", "summary with a training flag"])
def test_bad_study_settings_are_one_line_before_anything_is_created(tmp_path, capsys, case):
    path = write_tune(tmp_path, {"lr": [0.1, 0.2]}, **({"sampler_seed": 2**40} if case == "seed in the file" else {}))
    storage = str(tmp_path / "s.db")
    extra = {"seed -5": ["--sampler-seed", "-5"], "seed 2**32": ["--sampler-seed", str(2**32)],
             "storage /dev/null": ["--storage", "/dev/null"], "storage in memory": ["--storage", "sqlite://"],
             "out a file": ["--out", str(path)], "out the storage": ["--out", storage],
             "summary with a training flag": ["--summary", "--epochs", "3"]}.get(case, [])
    if case == "storage a fifo":
        os.mkfifo(tmp_path / "fifo.db")
        extra = ["--storage", str(tmp_path / "fifo.db")]
    if case == "tune file a fifo":
        os.mkfifo(tmp_path / "tune.yaml")
        path = tmp_path / "tune.yaml"
    assert main(["tune", str(path), "--storage", storage, *extra]) == 2
    err = capsys.readouterr().err.strip()
    says = {"seed -5": "--sampler-seed must be an integer in [0, 4294967295], not -5",
            "seed 2**32": "not 4294967296", "seed in the file": "sampler_seed must be an integer in [0, 4294967295]",
            "storage /dev/null": "not a regular file", "storage in memory": "in-memory database",
            "storage a fifo": "not a regular file", "tune file a fifo": "not a regular file",
            "out a file": "is a file, not a folder", "out the storage": "is the storage file itself",
            "summary with a training flag": "--summary trains nothing: leave out --epochs"}[case]
    assert err.startswith("byot: error:") and says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "digits").exists()


def test_a_sampler_seed_near_two_to_the_32_does_not_overflow_when_a_study_continues(tmp_path):
    tune = dataclasses.replace(_tune(tmp_path, trials=1), sampler_seed=2**32 - 1)
    storage = open_storage(str(tmp_path / "s.db"))
    study = open_study(tune, storage)
    study.enqueue_trial({"lr": 0.1})
    trial = study.ask()
    study.tell(trial, 1.0)
    assert open_study(tune, storage).sampler is not None  # seed (2**32 - 1 + 7919) % 2**32: no ValueError


def test_a_config_file_that_is_a_fifo_is_refused_not_read_forever(tmp_path, capsys):
    os.mkfifo(tmp_path / "cfg.yaml")
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_cutout_is_checked_against_the_image_size(tmp_path, capsys):
    base = ["train", "multi_resnet18_kd", "--dataset", "digits", "--save-folder", str(tmp_path)]
    assert main([*base, "--cutout", "1000"]) == 2
    assert "--cutout 1000 is larger than the 32 px images" in capsys.readouterr().err
    assert main([*base, "--image-size", "16", "--cutout", "17"]) == 2
    assert "give at most 16" in capsys.readouterr().err
    assert not (tmp_path / "multi_resnet18_kd").exists()

