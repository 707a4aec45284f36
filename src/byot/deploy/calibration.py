"""Temperature scaling per exit (Guo et al., 2017): one scalar T_k per exit, fitted on held-out data.

softmax(z / T) keeps every prediction (argmax is unchanged) and only makes the confidences honest, which
is what an early-exit threshold reads. Everything here works on logits the network produced once
(``byot.training.evaluate.collect_logits``); nothing runs the network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al.
T_MIN, T_MAX = 0.05, 20.0  # search range of the temperature
GOLDEN_STEPS = 80  # golden-section steps: the bracket shrinks by 0.618 each, far below float32 noise


def calibrated_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., K) logits -> (..., K) probabilities softmax(z / T), in float32."""
    return F.softmax(logits.float() / temperature, dim=-1)


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of (N,) labels under softmax((N, K) logits / T), in nats."""
    return F.cross_entropy(logits.double() / temperature, targets).item()


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                               bins: int = ECE_BINS) -> float:
    """ECE as a fraction: sum over equal-width confidence bins of (share of samples) x |accuracy - confidence|.

    logits (N, K), targets (N,). Confidence is the max softmax(z / T); bin b holds confidences in
    ((b-1)/bins, b/bins] (the first bin also holds 0).
    """
    probs = calibrated_softmax(logits, temperature).double()
    confidence, predicted = probs.max(dim=1)  # (N,), (N,)
    correct = (predicted == targets).double()
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1  # (N,) bin index
    n = len(targets)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        count = int(in_bin.sum())
        if count:
            ece += count / n * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T in [T_MIN, T_MAX] that minimises the NLL of softmax(logits / T) on (N,) ``targets``.

    The NLL is convex in 1/T (a log-sum-exp of functions linear in 1/T minus a linear one), so a
    golden-section search over 1/T finds the global minimum without a learning rate to tune.
    """
    z = logits.double()

    def loss(inverse_t: float) -> float:
        return F.cross_entropy(z * inverse_t, targets).item()

    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(GOLDEN_STEPS):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return 1.0 / ((lo + hi) / 2.0)


def at_search_edge(temperature: float) -> bool:
    """True when a fitted temperature sits at the edge of [T_MIN, T_MAX]: the NLL kept falling past it, as
    for an exit that is at chance (T to infinity) or never wrong (T to zero) on the fitting split."""
    return not T_MIN * 1.01 < temperature < T_MAX * 0.99


def calibration_report(logits: torch.Tensor, targets: torch.Tensor, temperatures: list[float],
                       exit_ids: list[int]) -> list[dict[str, float]]:
    """Per exit: NLL and ECE (percent) before (T = 1) and after scaling; logits (E, N, K), targets (N,)."""
    rows = []
    for k, z, t in zip(exit_ids, logits, temperatures):
        rows.append({"exit": k, "temperature": t,
                     "nll_before": nll(z, targets), "nll_after": nll(z, targets, t),
                     "ece_before": 100.0 * expected_calibration_error(z, targets),
                     "ece_after": 100.0 * expected_calibration_error(z, targets, t)})
    return rows
