"""Temperature scaling: NLL and ECE against hand-computed values, the fitted T at the NLL minimum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from byot.deploy.calibration import at_search_edge, expected_calibration_error, fit_temperature, nll


def test_nll_golden_value():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    by_hand = (-math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(2 + math.e)) / 2
    assert nll(logits, targets) == pytest.approx(by_hand, rel=1e-12)
    # T = 2 halves every logit
    by_hand_t2 = (-math.log(math.exp(1) / (math.exp(1) + 2)) + math.log(2 + math.exp(0.5))) / 2
    assert nll(logits, targets, temperature=2.0) == pytest.approx(by_hand_t2, rel=1e-12)


def test_ece_golden_value():
    # two classes, logits (a, 0): confidence sigmoid(a). Two samples at 0.9 (one right, one wrong) and two
    # at 0.6 (both right): ECE = 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.6| = 0.4
    a9, a6 = math.log(0.9 / 0.1), math.log(0.6 / 0.4)
    logits = torch.tensor([[a9, 0.0], [a9, 0.0], [a6, 0.0], [a6, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(logits, targets, bins=10) == pytest.approx(0.4, abs=1e-6)
    # a perfectly calibrated bin contributes nothing: 0.6 confidence, 3 of 5 right
    logits = torch.full((5, 2), 0.0, dtype=torch.float64)
    logits[:, 0] = a6
    assert expected_calibration_error(logits, torch.tensor([0, 0, 0, 1, 1]), bins=10) == pytest.approx(0.0, abs=1e-6)


def test_fitted_temperature_recovers_the_generating_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=g) * 4.0  # (N, K)
    true_t = 3.0
    targets = torch.multinomial(torch.softmax(logits / true_t, dim=1), 1, generator=g).squeeze(1)
    t = fit_temperature(logits, targets)
    assert t == pytest.approx(true_t, rel=0.05)
    # the NLL's derivative in T vanishes there: a central difference in float64 numpy, independently of torch
    z, y = logits.double().numpy(), targets.numpy()

    def np_nll(temp: float) -> float:
        s = z / temp
        s = s - s.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]))

    h = 1e-4
    assert abs((np_nll(t + h) - np_nll(t - h)) / (2 * h)) < 1e-5
    assert np_nll(t) <= min(np_nll(t * 0.98), np_nll(t * 1.02))


def test_temperature_one_is_kept_for_calibrated_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20_000, 5, generator=g) * 2.0
    targets = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, targets) == pytest.approx(1.0, rel=0.05)


def test_an_exit_at_chance_or_never_wrong_fits_a_temperature_at_the_search_edge():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5_000, 10, generator=g) * 3.0
    at_chance = torch.randint(0, 10, (5_000,), generator=g)  # labels unrelated to the logits
    t = fit_temperature(logits, at_chance)
    assert t > 10 and at_search_edge(t)  # softmax flattened as far as the search allows
    never_wrong = logits.argmax(dim=1)
    t = fit_temperature(logits, never_wrong)
    assert t < 0.1 and at_search_edge(t)
    calibrated = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=g).squeeze(1)
    assert not at_search_edge(fit_temperature(logits, calibrated))
