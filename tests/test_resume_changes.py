"""A resume never changes what a run learns in silence: a learning option that differs from the checkpoint's
is refused, naming each; --allow-changes goes on and records the change where the run's record lives
(config.yaml's history, the checkpoint, the first metrics line trained with it)."""

from __future__ import annotations

import json

import pytest
import yaml

from byot.cli import main
from byot.training.checkpoint import load_checkpoint

ARCH = "multi_resnet18_kd"
RUN = ["--dataset", "digits", "--image-size", "16", "--width", "4", "--batch-size", "64", "--workers", "0",
       "--no-progress"]


@pytest.fixture
def one_epoch(tmp_path):
    assert main(["train", ARCH, *RUN, "--save-folder", str(tmp_path), "--epochs", "1"]) == 0
    return tmp_path


def _resume(folder, *flags: str) -> int:
    return main(["train", ARCH, *RUN, "--save-folder", str(folder), "--resume", "auto", *flags])


@pytest.mark.parametrize("flags,named", [
    (["--alpha", "0.9", "--temperature", "10"], ["--alpha 0.9 (checkpoint: 0.1)", "--temperature 10.0 (checkpoint: 3.0)"]),
    (["--augment", "trivialaugment"], ["--augment 'trivialaugment' (checkpoint: 'none')"]),
    (["--ema", "0.99"], ["--ema 0.99 (checkpoint: 0.0)"]),
    (["--mixup", "0.2"], ["--mixup 0.2 (checkpoint: 0.0)"]),
    (["--lr", "0.5", "--schedule", "cosine"], ["--lr 0.5", "--schedule 'cosine'"]),
])
def test_a_resume_that_changes_what_is_learned_is_refused_naming_each_change(one_epoch, capsys, flags, named):
    before = (one_epoch / ARCH / "checkpoint_latest.pth.tar").read_bytes()
    capsys.readouterr()
    assert _resume(one_epoch, "--epochs", "2", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("byot: error:") and "--allow-changes" in err
    assert all(n in err for n in named), err
    assert (one_epoch / ARCH / "checkpoint_latest.pth.tar").read_bytes() == before  # nothing trained


def test_allow_changes_goes_on_and_records_the_change_and_its_epoch(one_epoch, capsys):
    assert _resume(one_epoch, "--epochs", "2", "--alpha", "0.9", "--temperature", "10", "--allow-changes") == 0
    assert "options changed from epoch 2 on" in capsys.readouterr().err
    run = one_epoch / ARCH
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["alpha"], config["temperature"]) == (0.9, 10.0)  # the options it trains with now ...
    change = {"epoch": 2, "changes": {"epochs": [1, 2], "temperature": [3.0, 10.0], "alpha": [0.1, 0.9]}}
    assert config["history"] == [change]  # ... and since when: epoch 1 was trained at 0.1 / 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "config_changes" not in records[0] and records[1]["config_changes"] == change["changes"]
    assert load_checkpoint(run / "checkpoint_latest.pth.tar")["config_history"] == [change]
    # a later resume with the same options keeps the history and adds nothing but its own epochs
    assert _resume(one_epoch, "--epochs", "3") == 0
    history = yaml.safe_load((run / "config.yaml").read_text())["history"]
    assert history == [change, {"epoch": 3, "changes": {"epochs": [2, 3]}}]


def test_more_epochs_and_run_options_need_no_flag_and_evaluation_takes_any_batch_size(one_epoch, capsys):
    assert _resume(one_epoch, "--epochs", "2", "--print-freq", "3", "--amp", "off", "--no-channels-last") == 0
    history = yaml.safe_load((one_epoch / ARCH / "config.yaml").read_text())["history"]
    assert history == [{"epoch": 2, "changes": {"epochs": [1, 2]}}]  # recorded, not refused
    ckpt = str(one_epoch / ARCH / "checkpoint_latest.pth.tar")
    assert main(["test", ARCH, "--dataset", "digits", "--resume", ckpt, "--batch-size", "32", "--json"]) == 0
