"""--val-split: a stratified hold-out selects checkpoints; the test split is seen once, at the end."""

from __future__ import annotations

import json
from collections import Counter

from byot.data import stratified_holdout
from byot.training import fit as run_fit
from byot.training.resolve import resolve_config


def test_holdout_is_stratified_disjoint_and_seeded():
    labels = [0] * 10 + [1] * 5 + [2] * 2 + [3]  # class 3 has one image: it stays in training
    keep, held = stratified_holdout(labels, 0.2, seed=0)
    assert sorted(keep + held) == list(range(len(labels))) and not set(keep) & set(held)
    assert Counter(labels[i] for i in held) == {0: 2, 1: 1, 2: 1}
    assert stratified_holdout(labels, 0.2, seed=0) == (keep, held)
    assert any(stratified_holdout(labels, 0.2, seed=s)[1] != held for s in range(1, 5))


def test_training_never_looks_at_the_test_split_until_the_end(tmp_path, cifar100_small, monkeypatch):
    seen = []
    real_evaluate = run_fit.evaluate

    def spying_evaluate(model, batches, *args, **kwargs):
        seen.append(batches)
        return real_evaluate(model, batches, *args, **kwargs)

    monkeypatch.setattr(run_fit, "evaluate", spying_evaluate)
    cfg, _ = resolve_config({"data_dir": str(cifar100_small), "width": 4, "epochs": 2, "batch_size": 64,
                                 "val_split": 0.25, "progress": False, "save_folder": str(tmp_path)})
    records = run_fit.fit(cfg)
    data_test_calls = [b for b in seen if b.num_samples == 101]  # the test split has 101 images
    assert len(seen) == 3 and len(data_test_calls) == 1 and seen[-1] is data_test_calls[0]
    assert [r["eval_split"] for r in records] == ["val", "val"]
    final = json.loads((tmp_path / "multi_resnet18_kd" / "test_result.json").read_text())
    assert final["num_images"] == 101 and final == records[-1]["final_test"]
    assert seen[0].num_samples == seen[1].num_samples < 101  # the hold-out, not the test split


def test_no_final_test_holds_for_its_command_alone_and_a_resume_tests_at_the_end(tmp_path):
    # byot tune's trials train with --no-final-test; training a trial on by hand tests it, as any run
    from byot.cli import main

    base = ["train", "multi_resnet18_kd", "--dataset", "digits", "--image-size", "16", "--width", "4",
            "--val-split", "0.2", "--save-folder", str(tmp_path), "--no-progress"]
    run = tmp_path / "multi_resnet18_kd"
    assert main([*base, "--epochs", "1", "--no-final-test"]) == 0
    assert not (run / "test_result.json").exists()
    latest = str(run / "checkpoint_latest.pth.tar")
    assert main([*base, "--epochs", "2", "--resume", latest, "--no-final-test"]) == 0  # said again: still none
    assert not (run / "test_result.json").exists()
    assert main([*base, "--epochs", "3", "--resume", latest]) == 0
    assert json.loads((run / "test_result.json").read_text())["epoch"] in (1, 2, 3)  # model_best's, tested once
