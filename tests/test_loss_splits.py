"""SelfDistillLoss gives a batch's value however the batch is split (over processes, accumulation steps): the
parts' values weighted by their shares are the whole batch's; the references' summed feature term stays an
option whose weight converts by the batch's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from byot import SelfDistillLoss
from byot.config import build_config
from byot.data import DataBundle
from byot.data.augment import Mixed
from byot.losses import mean_feature_weight
from byot.models import MultiExitOutput
from byot.training.build import build_loss

B, K, C, EXITS = 12, 6, 8, 4
TOL = 1e-5  # the loss computes in float32


def recipe_loss(recipe: str, class_weights: bool, label_smoothing: float = 0.0) -> SelfDistillLoss:
    """The loss byot train builds for ``recipe``; balanced class weights of uneven counts weigh 0.58 to 3.5."""
    cfg = build_config({}, {"recipe": recipe, "dataset": "digits", "label_smoothing": label_smoothing,
                            "class_weights": "balanced" if class_weights else "none"})
    data = DataBundle(None, None, [str(i) for i in range(K)], 32, (0, 0, 0), (1, 1, 1), [1, 2, 3, 4, 5, 6])
    return build_loss(cfg, data, torch.device("cpu"), list(range(1, EXITS + 1)))


def random_batch(seed: int, mixed: bool) -> tuple[MultiExitOutput, torch.Tensor | Mixed]:
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(B, K, generator=g) * 3 for _ in range(EXITS)]
    features = [torch.randn(B, C, generator=g) for _ in range(EXITS)]
    labels = torch.randint(0, K, (B,), generator=g)
    if mixed:
        return MultiExitOutput(logits, features), Mixed(labels, torch.randint(0, K, (B,), generator=g),
                                                        torch.rand(B, generator=g))
    return MultiExitOutput(logits, features), labels


def part(output: MultiExitOutput, targets: torch.Tensor | Mixed, index: torch.Tensor):
    out = MultiExitOutput([z[index] for z in output.logits], [f[index] for f in output.features])
    if isinstance(targets, Mixed):
        return out, Mixed(targets.labels[index], targets.partner_labels[index], targets.lam[index])
    return out, targets[index]


def label_weight(targets: torch.Tensor | Mixed, class_weights: torch.Tensor | None) -> float:
    """What the label terms average over, written out: images, or the labels' class weights (mixed: by ratio)."""
    if class_weights is None:
        return float(len(targets))
    if isinstance(targets, Mixed):
        lam = targets.lam
        return float((lam * class_weights[targets.labels] + (1 - lam) * class_weights[targets.partner_labels]).sum())
    return float(class_weights[targets].sum())


def random_split(seed: int) -> list[torch.Tensor]:
    """A random partition of the batch's images into 2 to 5 parts of random sizes, in shuffled order."""
    rng = np.random.default_rng(seed)
    order = torch.tensor(rng.permutation(B))
    cuts = sorted(rng.choice(np.arange(1, B), size=rng.integers(1, 5), replace=False).tolist())
    return [order[a:b] for a, b in zip([0, *cuts], [*cuts, B])]


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("class_weights", [False, True])
@pytest.mark.parametrize("recipe", ["iccv", "journal"])
def test_a_split_batch_has_the_whole_batch_value(recipe, class_weights, mixed):
    loss = recipe_loss(recipe, class_weights, label_smoothing=0.1 if mixed else 0.0)
    weights = loss.class_weights
    for seed in range(5):
        output, targets = random_batch(seed, mixed)
        whole = loss(output, targets)
        parts = [part(output, targets, index) for index in random_split(seed)]
        values = [loss(out, t) for out, t in parts]
        # a part's share: of the images, or for the label terms of the labels' class weights
        image_shares = [len(t) / B for _, t in parts]
        label_shares = [label_weight(t, weights) / label_weight(targets, weights) for _, t in parts]
        names = [n for n in whole if n != "loss" and not n.startswith("feature/")]  # the journal's: next test
        for name in names:
            shares = label_shares if name.startswith("ce/") else image_shares
            split = sum(s * float(v[name]) for s, v in zip(shares, values))
            assert split == pytest.approx(float(whole[name]), rel=TOL), (name, seed)
        if recipe == "iccv":  # every term splits: so does the total
            split = sum(loss.total({n: (ls if n.startswith("ce/") else s) * v[n] for n in names})
                        for s, ls, v in zip(image_shares, label_shares, values))
            assert float(split) == pytest.approx(float(whole["loss"]), rel=TOL)
            if weights is None:  # one share for every term: the parts' totals are the whole's
                split = sum(s * float(v["loss"]) for s, v in zip(image_shares, values))
                assert split == pytest.approx(float(whole["loss"]), rel=TOL)


def test_the_journal_distance_splits_where_the_parts_are_alike_and_is_below_otherwise():
    # a root mean square over images: a part's value is the whole's where the parts' mean squared distances
    # are equal (a batch of two identical halves), and the parts' weighted mean is below it otherwise
    loss = recipe_loss("journal", False)
    output, targets = random_batch(0, False)
    half = torch.arange(B // 2)
    doubled = MultiExitOutput([torch.cat([z[half]] * 2) for z in output.logits],
                              [torch.cat([f[half]] * 2) for f in output.features])
    twice = torch.cat([targets[half]] * 2)
    whole, first = loss(doubled, twice), loss(*part(doubled, twice, half))
    assert {n for n in whole if n.startswith("feature/")} == {"feature/exit1", "feature/exit2"}
    for name in ("feature/exit1", "feature/exit2", "loss"):
        assert float(first[name]) == pytest.approx(float(whole[name]), rel=TOL)
    whole = loss(output, targets)
    for seed in range(5):
        split = sum(len(i) / B * float(loss(*part(output, targets, i))["feature/exit1"]) for i in random_split(seed))
        assert split < float(whole["feature/exit1"])


@pytest.mark.parametrize("feature_loss", ["hint", "adapted"])
def test_the_summed_feature_term_is_the_references_and_its_weight_converts_by_the_batch_size(feature_loss):
    output, targets = random_batch(2, False)
    f, ft = output.features[0], output.features[-1]
    if feature_loss == "hint":  # the reference script's hint: a sum over images and channels
        reference = float((((f - ft) ** 2) * ((f > 0) | (ft > 0))).sum())
        name = "hint/exit1"
    else:  # the journal code's torch.dist: the norm of the whole (B, C) difference
        reference = float(np.sqrt(((f - ft).numpy() ** 2).sum()))
        name = "feature/exit1"
    summed = SelfDistillLoss(beta=0.03, feature_loss=feature_loss, feature_reduction="sum")(output, targets)
    assert float(summed[name]) == pytest.approx(reference, rel=TOL)
    # beta_mean = beta_sum * B for the hint, beta_sum * sqrt(B) for the distance: the same total
    beta = mean_feature_weight(0.03, feature_loss, B)
    assert beta == pytest.approx(0.03 * (B if feature_loss == "hint" else np.sqrt(B)))
    mean = SelfDistillLoss(beta=beta, feature_loss=feature_loss)(output, targets)
    assert float(mean["loss"]) == pytest.approx(float(summed["loss"]), rel=TOL)
    assert float(mean[name]) == pytest.approx(reference / (B if feature_loss == "hint" else np.sqrt(B)), rel=TOL)


def test_the_default_beta_is_the_references_at_its_batch_of_128():
    assert SelfDistillLoss().beta == pytest.approx(1e-6 * 128)
    with pytest.raises(ValueError, match="feature_reduction"):
        SelfDistillLoss(feature_reduction="max")
