"""The self-distillation loss against golden values computed independently in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from byot import SelfDistillLoss
from byot.losses import cross_entropy, feature_distance, feature_hint, soft_cross_entropy
from byot.models import MultiExitOutput


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_reference_loss(logits, features, y, alpha, beta, T, hint="mean") -> dict[str, float]:
    """The reference's formula written out in float64 numpy; its hint is a sum over the batch ("sum"), byot's
    by default the mean over images of each image's sum over channels ("mean")."""
    out = {}
    n = len(y)
    for i, z in enumerate(logits, start=1):
        out[f"ce/exit{i}"] = -np_log_softmax(z)[np.arange(n), y].mean()
    p = np.exp(np_log_softmax(logits[-1] / T))
    for i in range(1, len(logits)):
        out[f"kd/exit{i}"] = -(p * np_log_softmax(logits[i - 1] / T)).sum(axis=1).mean()
        f, ft = features[i - 1], features[-1]
        per_image = (((f - ft) ** 2) * ((f > 0) | (ft > 0))).sum(axis=1)
        out[f"hint/exit{i}"] = per_image.sum() if hint == "sum" else per_image.mean()
    k = len(logits)
    total = (1 - alpha) * sum(out[f"ce/exit{i}"] for i in range(1, k + 1))
    total += alpha * T**2 * sum(out[f"kd/exit{i}"] for i in range(1, k))
    total += beta * sum(out[f"hint/exit{i}"] for i in range(1, k))
    out["loss"] = total
    return out


def test_hand_computed_two_class_case():
    # exit 1 logits (0, 0), teacher (exit 2) logits (ln 3, 0), label 0, T = 1:
    # CE1 = ln 2; CE2 = -ln(3/4); KD1 = -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2
    # features f1 = (1, -1), f2 = (0, -2): mask (T, F) -> hint = 1
    out = MultiExitOutput(
        logits=[torch.tensor([[0.0, 0.0]]), torch.tensor([[np.log(3.0), 0.0]])],
        features=[torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, -2.0]])],
    )
    terms = SelfDistillLoss(alpha=0.5, beta=0.25, temperature=1.0)(out, torch.tensor([0]))
    ln2, ce2 = np.log(2.0), -np.log(0.75)
    assert terms["ce/exit1"].item() == pytest.approx(ln2, abs=1e-6)
    assert terms["ce/exit2"].item() == pytest.approx(ce2, abs=1e-6)
    assert terms["kd/exit1"].item() == pytest.approx(ln2, abs=1e-6)
    assert terms["hint/exit1"].item() == pytest.approx(1.0, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * (ln2 + ce2) + 0.5 * ln2 + 0.25, abs=1e-6)


@pytest.mark.parametrize("hint", ["mean", "sum"])
@pytest.mark.parametrize("alpha,beta,T", [(0.1, 1e-6, 3.0), (0.5, 0.01, 1.0), (0.0, 0.0, 4.0), (1.0, 0.1, 2.0)])
def test_matches_numpy_reference(alpha, beta, T, hint):
    # "sum" is the reference script's hint, the golden values of byot before its terms became means
    rng = np.random.default_rng(0)
    B, K, C = 7, 5, 6
    logits = [rng.normal(size=(B, K)) * 3 for _ in range(4)]
    features = [rng.normal(size=(B, C)) for _ in range(4)]
    y = rng.integers(0, K, size=B)
    expected = np_reference_loss(logits, features, y, alpha, beta, T, hint)
    out = MultiExitOutput([torch.tensor(z, dtype=torch.float32) for z in logits],
                          [torch.tensor(f, dtype=torch.float32) for f in features])
    terms = SelfDistillLoss(alpha, beta, T, feature_reduction=hint)(out, torch.tensor(y))
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-5), name


def test_alpha_zero_beta_zero_is_deep_supervision():
    torch.manual_seed(0)
    logits = [torch.randn(4, 3) for _ in range(4)]
    y = torch.tensor([0, 1, 2, 1])
    out = MultiExitOutput(logits, [torch.randn(4, 8) for _ in range(4)])
    terms = SelfDistillLoss(alpha=0.0, beta=0.0)(out, y)
    expected = sum(torch.nn.functional.cross_entropy(z, y) for z in logits)
    assert torch.allclose(terms["loss"], expected)


def test_teacher_gets_no_gradient_from_kd_or_hint():
    torch.manual_seed(0)
    logits = [torch.randn(4, 3, requires_grad=True) for _ in range(4)]
    feats = [torch.randn(4, 8, requires_grad=True) for _ in range(4)]
    # alpha = 1: the labels' weight is 0, so the teacher could only learn through KD / hint
    SelfDistillLoss(alpha=1.0, beta=1.0)(MultiExitOutput(logits, feats), torch.tensor([0, 1, 2, 1]))["loss"].backward()
    assert logits[-1].grad is None or torch.count_nonzero(logits[-1].grad) == 0
    assert feats[-1].grad is None or torch.count_nonzero(feats[-1].grad) == 0
    assert all(torch.count_nonzero(z.grad) > 0 for z in logits[:-1])
    assert all(torch.count_nonzero(f.grad) > 0 for f in feats[:-1])


def test_pure_functions_and_exit_names():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    assert cross_entropy(z, torch.tensor([0])).item() == pytest.approx(-np_log_softmax(z.numpy())[0, 0], rel=1e-6)
    p = torch.tensor([[1.0, 0.0, 0.0]])
    assert soft_cross_entropy(z, p, 2.0).item() == pytest.approx(-np_log_softmax(z.numpy() / 2)[0, 0], rel=1e-6)
    # both negative -> masked out entirely
    assert feature_hint(torch.tensor([[-1.0, 2.0]]), torch.tensor([[-3.0, 0.0]])).item() == pytest.approx(4.0)
    # two images of hints 4 and 1 (its -3 is masked: both features below 0): the mean, or the reference's sum
    f, ft = torch.tensor([[-1.0, 2.0], [1.0, -3.0]]), torch.tensor([[-3.0, 0.0], [0.0, 0.0]])
    assert feature_hint(f, ft).item() == pytest.approx(2.5)
    assert feature_hint(f, ft, "sum").item() == pytest.approx(5.0)
    # distances 3 and 4: the journal's norm 5, or its root mean square 5 / sqrt(2)
    f, ft = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.zeros(2, 2)
    assert feature_distance(f, ft, "sum").item() == pytest.approx(5.0)
    assert feature_distance(f, ft).item() == pytest.approx(5.0 / np.sqrt(2.0))
    single = MultiExitOutput([torch.randn(2, 3)], [torch.randn(2, 4)])
    terms = SelfDistillLoss(alpha=0.0, beta=0.0)(single, torch.tensor([0, 2]), exit_ids=[4])
    assert set(terms) == {"loss", "ce/exit4"}


def test_bad_weights_are_refused_once_by_the_config():
    from byot.config import build_config
    from byot.errors import ByotError

    with pytest.raises(ByotError, match="--alpha must lie in"):
        build_config({}, {"alpha": 1.5})
    with pytest.raises(ByotError, match="--temperature must be positive"):
        build_config({}, {"temperature": 0.0})


def np_journal_loss(logits, features, y, T, skip_index_deepest_first=1) -> float:
    """The journal code's loss (train.py of pytorch-self-distillation-final) written out in numpy, in its own
    deepest-first order: CE of the deepest + for every shallow one 0.3 softCE(T) + 0.7 CE, and 0.03 times the
    (unsquared) L2 distance of its feature to the deepest's, except for list index 1."""
    outs, feats = logits[::-1], features[::-1]
    n = len(y)
    total = -np_log_softmax(outs[0])[np.arange(n), y].mean()
    p = np.exp(np_log_softmax(outs[0] / T))
    for index in range(1, len(outs)):
        total += 0.3 * -(p * np_log_softmax(outs[index] / T)).sum(axis=1).mean()
        total += 0.7 * -np_log_softmax(outs[index])[np.arange(n), y].mean()
        if index != skip_index_deepest_first:
            total += 0.03 * np.sqrt(((feats[index] - feats[0]) ** 2).sum())
    return total


@pytest.mark.parametrize("step", [{"batch_size": 6}, {"batch_size": 3, "accum_steps": 2}])
def test_the_journal_recipe_loss_matches_its_code_written_out(step):
    from byot.config import build_config
    from byot.data import DataBundle
    from byot.training.build import build_loss

    # the 6 images are a full step: byot's per-image distance, weighted for a step of 6, is that code's norm
    cfg = build_config({}, {"recipe": "journal", "dataset": "digits", **step})
    rng = np.random.default_rng(3)
    logits = [rng.normal(size=(6, 10)) * 2 for _ in range(4)]
    features = [rng.normal(size=(6, 16)) for _ in range(4)]
    y = rng.integers(0, 10, 6)
    data = DataBundle(None, None, [str(i) for i in range(10)], 32, (0, 0, 0), (1, 1, 1), [1] * 10)
    loss = build_loss(cfg, data, torch.device("cpu"), [1, 2, 3, 4])
    out = loss(MultiExitOutput([torch.tensor(z) for z in logits], [torch.tensor(f) for f in features]),
               torch.tensor(y))
    assert "feature/exit3" not in out and {"feature/exit1", "feature/exit2"} <= set(out)
    assert float(out["loss"]) == pytest.approx(np_journal_loss(logits, features, y, 3.0), rel=1e-5)
    # the epoch's logged total is rebuilt from the terms' means by the same weights
    means = {k: v.mean() for k, v in out.items() if k != "loss"}
    assert float(loss.total(means)) == pytest.approx(np_journal_loss(logits, features, y, 3.0), rel=1e-5)


def test_mixed_targets_weigh_both_labels_and_reduce_to_plain_labels():
    from byot.data.augment import Mixed

    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(size=(5, 4)))
    a, b = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 0, 2, 3])
    lam = torch.tensor([1.0, 0.25, 0.5, 0.9, 0.0])
    logp = np_log_softmax(z.numpy())
    want = np.mean([lam[i] * -logp[i, a[i]] + (1 - lam[i]) * -logp[i, b[i]] for i in range(5)])
    assert float(cross_entropy(z, Mixed(a, b, lam))) == pytest.approx(want, rel=1e-6)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    ones = torch.ones(5)
    assert float(cross_entropy(z, Mixed(a, b, ones), w)) == pytest.approx(float(cross_entropy(z, a, w)), rel=1e-6)
    smooth = float(cross_entropy(z, Mixed(a, b, ones), label_smoothing=0.1))
    assert smooth == pytest.approx(float(torch.nn.functional.cross_entropy(z, a, label_smoothing=0.1)), rel=1e-6)
