"""byot sweep: real runs in their own processes, resumed where they stopped, one table of mean and spread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from byot.cli import main
from byot.errors import ByotError
from byot.sweep import _mean_std, format_results, load_sweep, slug

BASE = {"arch": "multi_resnet18_kd", "dataset": "digits", "image_size": 16, "width": 4, "epochs": 1,
        "batch_size": 128, "val_split": 0.2}


def write_sweep(tmp: Path, rows: list[dict], seeds=(0,), **base) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp / "out"), "runs_dir": str(tmp / "runs"),
                                    "seeds": list(seeds), "base": {**BASE, **base}, "rows": rows}))
    return path


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
    assert "| x | – | – | – | 2.00 ± 1.41 | – | 2 | 2.0 |" in format_results({"name": "n", "rows": [row]})


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid_training_configs(path):
    from byot.config import build_config, load_yaml

    cfg = build_config({}, load_yaml(path))
    assert cfg.epochs == 200 and cfg.batch_size == 128 and cfg.lr == 0.1 and cfg.dataset == "cifar100"
    assert (cfg.alpha, cfg.beta, cfg.temperature) == (0.1, 1e-6, 3.0)  # the paper's loss weights


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_load(path):
    sweep = load_sweep(path)
    assert sweep.rows and sweep.seeds
