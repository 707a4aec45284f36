"""The self-distillation loss of "Be Your Own Teacher" as pure functions plus one thin module.

    total = (1 - alpha) * sum_{i=1..4} CE(y, z_i)
          + alpha * T^2 * sum_{i=1..3} softCE(softmax(z_4 / T), z_i / T)
          + beta * sum_{i=1..3} sum((f_i - f_4)^2 where f_i > 0 or f_4 > 0)

z_i are exit i's logits, f_i its pooled features; exit 4 (the deepest) is the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from byot.models.base import MultiExitOutput


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of (B, K) logits against (B,) integer labels; with (K,) class ``weight``
    the weighted mean sum_i w_{y_i} l_i / sum_i w_{y_i}."""
    return F.cross_entropy(logits.float(), targets, weight=weight)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -sum_k p_k log softmax(z / T)_k, p the (B, K) softened teacher.

    This is the reference's KD term: a cross-entropy, not a KL divergence, so its value includes the
    teacher's entropy (a constant for the student's gradient).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)  # (B, K)
    return -(teacher_probs * log_q).sum(dim=1).mean()


def feature_hint(feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Sum (over batch and channels) of squared differences where either feature is positive.

    A sum, not a mean, as in the reference: that is why its weight beta is ~1e-6.
    """
    feature, teacher_feature = feature.float(), teacher_feature.float()
    mask = (feature > 0) | (teacher_feature > 0)
    return ((feature - teacher_feature) ** 2 * mask).sum()


class SelfDistillLoss:
    """Applies the weights and returns every named term; ``out["loss"]`` is the total.

    ``alpha``: share of the KD term (0 gives deep supervision: every exit learns from labels only).
    ``beta``: weight of the feature hint. ``temperature``: softens the teacher; KD scaled by T**2.
    """

    def __init__(self, alpha: float = 0.1, beta: float = 1e-6, temperature: float = 3.0,
                 class_weights: torch.Tensor | None = None) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if beta < 0 or temperature <= 0:
            raise ValueError(f"beta must be >= 0 and temperature > 0, got {beta}, {temperature}")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.class_weights = class_weights  # (K,) weights of the label terms, or None

    def __call__(
        self, output: MultiExitOutput, targets: torch.Tensor, exit_ids: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """output: logits/features lists (deepest last); targets (B,) -> {"loss", "ce/exitK", ...}.

        ``exit_ids`` names the exits in the returned keys (default 1..n).
        """
        ids = list(exit_ids) if exit_ids is not None else list(range(1, len(output.logits) + 1))
        terms: dict[str, torch.Tensor] = {}
        for k, z in zip(ids, output.logits):
            terms[f"ce/exit{k}"] = cross_entropy(z, targets, self.class_weights)
        # The teacher is detached: the shallow exits learn from it, it does not learn from them.
        teacher_probs = F.softmax(output.logits[-1].detach().float() / self.temperature, dim=1)
        teacher_feature = output.features[-1].detach()
        for k, z, f in zip(ids[:-1], output.logits[:-1], output.features[:-1]):
            terms[f"kd/exit{k}"] = soft_cross_entropy(z, teacher_probs, self.temperature)
            terms[f"hint/exit{k}"] = feature_hint(f, teacher_feature)
        return {"loss": self.objective(terms), **terms}

    def objective(self, terms: dict[str, torch.Tensor], batch_share: float | torch.Tensor = 1.0,
                  hint_scale: float = 1.0, ce_share: float | torch.Tensor | None = None) -> torch.Tensor:
        """The weighted total of named ``terms``; ``batch_share`` is this batch's share of an
        accumulated optimizer batch. The label and KD terms are batch means, so they are scaled by
        it; the hint is a sum over the batch already, so it is not: accumulated gradients then
        equal those of the whole batch at once. ``hint_scale`` multiplies the hint (by the number of
        processes under DistributedDataParallel, whose gradient averaging would otherwise divide it).
        ``ce_share`` replaces ``batch_share`` for the label terms when they are class-weighted means,
        whose share is this batch's part of the whole batch's summed class weights."""
        ce = sum(v for name, v in terms.items() if name.startswith("ce/"))
        kd = sum((v for name, v in terms.items() if name.startswith("kd/")), torch.zeros(()))
        hint = sum((v for name, v in terms.items() if name.startswith("hint/")), torch.zeros(()))
        ce_share = batch_share if ce_share is None else ce_share
        return (ce_share * (1.0 - self.alpha) * ce + batch_share * self.alpha * self.temperature**2 * kd
                + self.beta * hint_scale * hint)
