"""The early-exit policy on logits: decisions and costs against hand-worked cases, fitting, the sweep."""

from __future__ import annotations

import pytest
import torch

from byot.deploy.policy import NEVER, ExitPolicy, exit_flops, fit_thresholds, policy_stats, simulate, sweep
from byot.errors import ByotError

# 3 exits, 3 classes, 4 samples; logits = log(probabilities), so softmax gives these probabilities back
PROBS = torch.tensor([
    # exit 1                               exit 2                 exit 3 (deepest)
    [[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.5, 0.3, 0.2], [0.34, 0.33, 0.33]],
    [[0.2, 0.2, 0.6], [0.1, 0.3, 0.6], [0.45, 0.45, 0.1], [0.3, 0.3, 0.4]],
    [[0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]],
], dtype=torch.float64)  # (E, N, K)
LOGITS = PROBS.log()
COSTS = [{"exit": 1, "flops": 10, "head_flops": 4}, {"exit": 2, "flops": 20, "head_flops": 5},
         {"exit": 3, "flops": 30, "head_flops": 3}]


def test_simulate_golden_decisions():
    d = simulate(LOGITS, ExitPolicy((0.6, 0.5)))
    # sample 0: 0.7 >= 0.6 at exit 1; sample 1: 0.5 < 0.6, then 0.6 >= 0.5 at exit 2; samples 2, 3: the deepest
    assert d.exit_position.tolist() == [0, 1, 2, 2]
    assert d.predicted.tolist() == [0, 2, 2, 0]
    assert d.probability.tolist() == pytest.approx([0.7, 0.6, 0.5, 0.6])


def test_simulate_with_the_ensemble_answering_the_rest():
    d = simulate(LOGITS, ExitPolicy((0.6, 0.5), final="ensemble"))
    # sample 2: mean of (0.5, 0.3, 0.2), (0.45, 0.45, 0.1), (0.2, 0.3, 0.5) = (0.3833, 0.35, 0.2667)
    assert d.predicted.tolist() == [0, 2, 0, 0]
    assert d.probability[2].item() == pytest.approx((0.5 + 0.45 + 0.2) / 3)
    assert d.probability[3].item() == pytest.approx((0.34 + 0.3 + 0.6) / 3)


def test_temperatures_change_who_leaves():
    # T = 2 at exit 1 turns sample 0's (0.7, 0.2, 0.1) into sqrt-proportional: 0.8367 / 1.6001 = 0.5229 < 0.6
    d = simulate(LOGITS, ExitPolicy((0.6, 0.5), temperatures=(2.0, 1.0, 1.0)))
    assert d.exit_position.tolist() == [1, 1, 2, 2]
    assert d.predicted[0].item() == 2  # exit 2 answered (0.2, 0.2, 0.6)


def test_exit_flops_count_the_heads_passed():
    t = torch.tensor([[0.5, 0.5], [NEVER, 0.5], [NEVER, NEVER]], dtype=torch.float64)
    deepest = exit_flops(COSTS, t, "deepest")
    assert deepest.tolist() == [[10, 24, 39], [10, 20, 35], [10, 20, 30]]  # skipped heads are not paid
    assert exit_flops(COSTS, t, "ensemble").tolist() == [[10, 24, 39]] * 3  # the ensemble reads every head


def test_policy_stats_golden():
    stats = policy_stats(LOGITS, torch.tensor([0, 2, 1, 0]), COSTS, ExitPolicy((0.6, 0.5)))
    assert stats["top1"] == pytest.approx(75.0)  # sample 2 predicted 2, label 1
    assert stats["mean_flops"] == pytest.approx((10 + 24 + 39 + 39) / 4)
    assert stats["exit_shares"] == pytest.approx([0.25, 0.25, 0.5])


def _two_exit_case() -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Exit 1 is right on its two most confident samples (0.9, 0.8) and wrong on 0.7 and 0.6; the deepest
    exit is right on all four. Exit 1 costs 10, the deepest 40 (+4 for exit 1's head)."""
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    exit1 = torch.stack([conf, 1 - conf], dim=1)  # predicts class 0
    targets = torch.tensor([0, 0, 1, 1])
    deepest = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]], dtype=torch.float64)
    costs = [{"exit": 1, "flops": 10, "head_flops": 4}, {"exit": 2, "flops": 40, "head_flops": 0}]
    return torch.stack([exit1, deepest]).log(), targets, costs


def test_fit_max_drop_zero_keeps_accuracy_at_the_least_cost():
    logits, targets, costs = _two_exit_case()
    policy = fit_thresholds(logits, targets, costs, (), "deepest", max_drop=0.0)
    # the cheapest policy as accurate as the deepest exit: the two confident samples leave at exit 1
    assert simulate(logits, policy).exit_position.tolist() == [0, 0, 1, 1]
    assert policy_stats(logits, targets, costs, policy)["mean_flops"] == pytest.approx((10 + 10 + 44 + 44) / 4)


def test_fit_budget_picks_the_most_accurate_affordable_policy():
    logits, targets, costs = _two_exit_case()
    policy = fit_thresholds(logits, targets, costs, (), "deepest", budget_flops=20.0)
    # within 20 FLOPs at most one sample goes deep ((3 x 10 + 44) / 4 = 18.5): the least confident, the
    # one exit 1 gets wrong and the deepest gets right: 75% instead of 50% for "all at exit 1"
    assert simulate(logits, policy).exit_position.tolist() == [0, 0, 0, 1]
    assert policy_stats(logits, targets, costs, policy)["top1"] == pytest.approx(75.0)
    policy = fit_thresholds(logits, targets, costs, (), "deepest", budget_flops=30.0)
    assert policy_stats(logits, targets, costs, policy)["top1"] == pytest.approx(100.0)
    with pytest.raises(ByotError, match="below the cheapest"):
        fit_thresholds(logits, targets, costs, (), "deepest", budget_flops=5.0)


def test_sweep_runs_from_all_early_to_none_early():
    points = sweep(LOGITS, torch.tensor([0, 2, 1, 0]), COSTS, (), "deepest")
    assert points[0]["exit_shares"][0] == pytest.approx(1.0)  # the lowest threshold: everyone at exit 1
    assert points[-1]["thresholds"] == [NEVER, NEVER]
    assert points[-1]["exit_shares"] == pytest.approx([0, 0, 1])
    assert points[-1]["mean_flops"] == pytest.approx(30)  # no early exit: the plain network's cost
    flops = [p["mean_flops"] for p in points[:-1]]
    assert flops == sorted(flops)  # raising every threshold only sends samples deeper
    assert points[-1]["mean_flops"] < flops[-1]  # ... until NEVER, where the shallow heads are not even run


def test_policy_checks_its_shape():
    with pytest.raises(ByotError, match="2 thresholds"):
        simulate(LOGITS, ExitPolicy((0.5,)))
    with pytest.raises(ByotError, match="temperatures"):
        ExitPolicy((0.5, 0.5), temperatures=(1.0,))
    with pytest.raises(ByotError, match="final"):
        ExitPolicy((0.5, 0.5), final="middle")
