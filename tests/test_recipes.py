"""The recipes as a user picks them: --recipe journal's values and what overrides them, the adapted
feature layers a checkpoint carries, the weight average, and the journal recipe end to end on image files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import metrics

from byot.cli import main
from byot.config import JOURNAL_RECIPE, build_config
from byot.errors import ByotError
from byot.models.base import AdaptedHead
from byot.training.build import build_model
from byot.training.ema import WeightAverage


def test_the_journal_recipe_sets_its_values_and_given_options_win():
    cfg = build_config({}, {"recipe": "journal"})
    assert {k: getattr(cfg, k) for k in JOURNAL_RECIPE} == JOURNAL_RECIPE
    assert cfg.epochs == 250 and cfg.schedule == "journal" and cfg.head == "attention" and not cfg.kd_t2
    mine = build_config({"epochs": 30}, {"recipe": "journal", "beta": 0.0, "head": "bottleneck"})
    assert (mine.epochs, mine.beta, mine.head, mine.augment) == (30, 0.0, "bottleneck", "autoaugment")
    assert build_config({}, {}).augment == "none" and build_config({}, {}).recipe == "iccv"


@pytest.mark.parametrize("options,words", [({"recipe": "tpami"}, "--recipe must be iccv or journal"),
                                           ({"augment": "autoaug"}, "--augment must be"),
                                           ({"label_smoothing": 1.0}, "--label-smoothing must lie in [0, 1)"),
                                           ({"pad_fill": 256}, "--pad-fill must lie in [0, 255]"),
                                           ({"ema": 1.0}, "--ema must lie in [0, 1)")])
def test_bad_recipe_options_are_one_line(options, words):
    with pytest.raises(ByotError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build_config({}, options)


def test_adapted_features_are_layers_of_the_model_except_for_the_skipped_exit():
    cfg = build_config({}, {"recipe": "journal", "dataset": "digits", "width": 4})
    model = build_model(cfg, 10, 32)
    kinds = [isinstance(h, AdaptedHead) for h in model.heads]
    assert kinds == [True, True, False, False]  # exits 1 and 2 adapted; exit 3 (second-deepest) skipped
    out = model(torch.zeros(2, 3, 32, 32))
    assert [f.shape[1] for f in out.features] == [32, 32, 32, 32]
    every = build_model(build_config({}, {"recipe": "journal", "dataset": "digits", "width": 4,
                                          "feature_skip": "none"}), 10, 32)
    assert [isinstance(h, AdaptedHead) for h in every.heads] == [True, True, True, False]


def test_the_weight_average_is_the_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = [p.detach().clone() for p in model.parameters()]
    ema = WeightAverage(model, 0.5)
    steps = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # BatchNorm's running statistics and step count move
        steps.append([p.detach().clone() for p in model.parameters()])
        ema.update()
    for i, p in enumerate(ema.module.parameters()):  # 0.125 w0 + 0.125 w1 + 0.25 w2 + 0.5 w3
        want = 0.125 * start[i] + 0.125 * steps[0][i] + 0.25 * steps[1][i] + 0.5 * steps[2][i]
        assert torch.allclose(p, want, atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == 3


def test_the_journal_recipe_end_to_end_on_an_image_folder(cifar10_jpg, tmp_path, capsys):
    run = tmp_path / "runs"
    args = ["train", "multi_resnet18_kd", "--dataset", "imagefolder", "--data-dir", str(cifar10_jpg), "--image-size", "32", "--width", "4",
            "--recipe", "journal", "--epochs", "2", "--batch-size", "32", "--workers", "0", "--ema", "0.9",
            "--cutmix", "1.0", "--val-split", "0.2", "--save-folder", str(run), "--no-progress"]
    assert main(args) == 0
    run_dir = run / "multi_resnet18_kd"
    log = (run_dir / "log_train.txt").read_text()
    assert "recipe journal: augmentation autoaugment (imagenet policy), cutout 16 px, cutmix 1 per image" in log
    assert "KD 0.3 (no T^2)" in log and "none for exit 3" in log
    records = metrics(run_dir)
    assert [r["lr"] for r in records] == [0.1, pytest.approx(0.01)]  # the journal schedule over 2 epochs
    assert {"feature/exit1", "feature/exit2", "kd/exit3"} <= set(records[-1]["losses"])
    assert "feature/exit3" not in records[-1]["losses"] and "ema" in records[-1]
    final = json.loads((run_dir / "test_result.json").read_text())
    assert len(final["ema"]["exits"]) == 4
    checkpoint = torch.load(run_dir / "model_best.pth.tar", weights_only=True)
    assert set(checkpoint["ema"]) == set(checkpoint["model"])
    capsys.readouterr()
    best = str(run_dir / "model_best.pth.tar")
    assert main(["test", "multi_resnet18_kd", "--dataset", "imagefolder", "--data-dir", str(cifar10_jpg), "--resume", best,
                 "--json"]) == 0
    assert [e["exit"] for e in json.loads(capsys.readouterr().out)["exits"]] == [1, 2, 3, 4]
    # the adaptation layers are part of the model: a flag that drops them is refused, naming it
    assert main(["test", "multi_resnet18_kd", "--dataset", "imagefolder", "--data-dir", str(cifar10_jpg), "--resume", best,
                 "--feature-loss", "hint"]) == 2
    assert "--feature-loss 'hint'" in capsys.readouterr().err


def test_the_shipped_journal_config_is_the_journal_recipe():
    from pathlib import Path

    from byot.config import load_yaml

    written = load_yaml(Path(__file__).parents[1] / "configs" / "multi_resnet18_kd_journal_cifar100.yaml")
    assert {k: written[k] for k in JOURNAL_RECIPE if k in written} == JOURNAL_RECIPE  # every value written out
    assert build_config({}, written) == build_config({}, {"recipe": "journal", "width": 64})


def test_a_skipped_exit_keeps_no_adaptation_a_loss_term_would_not_train():
    # timm's MobileNetV3 widens 288 -> 1024 in its own head: its shallow heads adapt their features; with the
    # journal's skip, exit 3's head has none (under torchrun a parameter without a gradient stalls DDP)
    cfg = build_config({}, {"arch": "timm/mobilenetv3_small_050", "dataset": "digits", "feature_skip": "second-deepest"})
    model = build_model(cfg, 10, 32)
    assert [isinstance(h, AdaptedHead) for h in model.heads] == [True, True, False, False]
    out = model(torch.zeros(2, 3, 32, 32))
    assert [f.shape[1] for f in out.features] == [1024, 1024, 288, 1024]


def test_a_resume_keeps_the_recipe_it_was_trained_with(digits_checkpoint, capsys):
    assert main(["train", "multi_resnet18_kd", "--resume", str(digits_checkpoint), "--recipe", "journal",
                 "--epochs", "3", "--no-progress"]) == 2
    assert "trained with --recipe iccv; a resume continues its recipe" in capsys.readouterr().err


def test_a_sweep_redoes_a_run_whose_feature_skip_differs(tmp_path):
    from byot.config import save_yaml
    from byot.runs.trainchild import config_changes

    stored = build_config({}, {"dataset": "digits"})
    save_yaml(stored, tmp_path / "config.yaml")
    assert config_changes(stored, tmp_path) == []
    changes = config_changes(build_config({}, {"dataset": "digits", "feature_skip": "second-deepest"}), tmp_path)
    assert changes and "feature_skip" in changes[0]


def test_bench_times_training_with_and_without_the_augmentation(capsys):
    args = ["bench", "multi_resnet18_kd", "--width", "8", "--batch-size", "8", "--steps", "1", "--warmup", "1",
            "--augment", "autoaugment", "--cutout", "16"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["augment"] == "autoaugment" and result["cutout"] == 16
    assert result["train_augmented_images_per_s"] > 0
    assert result["augment_cost"] == pytest.approx(result["train_images_per_s"] / result["train_augmented_images_per_s"] - 1)
    assert main(args) == 0
    assert "training with --augment autoaugment --cutout 16:" in capsys.readouterr().out
