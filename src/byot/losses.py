"""The self-distillation loss of "Be Your Own Teacher" as pure functions plus one thin module.

    total = (1 - alpha) * sum_{i=1..n} CE(y, z_i)
          + alpha * T^2 * sum_{i=1..n-1} softCE(softmax(z_n / T), z_i / T)
          + beta * sum_{i=1..n-1} sum((f_i - f_n)^2 where f_i > 0 or f_n > 0)

z_i are exit i's logits, f_i its pooled features, shallow to deep; exit n (the deepest) is the teacher. The
terms are named by the exits' numbers (``exit_ids``: a model's ``exit_stages``, e.g. ``kd/exit2``).
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


def term_kind(name: str) -> str:
    """"ce", "kd" or "hint": the kind of a named term ("kd/exit2" -> "kd")."""
    return name.split("/", 1)[0]


class SelfDistillLoss:
    """Applies the weights and returns every named term; ``out["loss"]`` is the total.

    ``alpha``: share of the KD term (0 gives deep supervision: every exit learns from labels only).
    ``beta``: weight of the feature hint. ``temperature``: softens the teacher; KD scaled by T**2.
    The values are checked once, in the run configuration (``byot.config.RANGES``).
    """

    def __init__(self, alpha: float = 0.1, beta: float = 1e-6, temperature: float = 3.0,
                 class_weights: torch.Tensor | None = None) -> None:
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
        return {"loss": self.total(terms), **terms}

    @property
    def weights(self) -> dict[str, float]:
        """Each kind of term's weight in the total."""
        return {"ce": 1.0 - self.alpha, "kd": self.alpha * self.temperature**2, "hint": self.beta}

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of named ``terms`` (any "loss" entry left out)."""
        weights = self.weights
        parts = [weights[term_kind(name)] * v for name, v in terms.items() if name != "loss"]
        return sum(parts[1:], parts[0]) if parts else torch.zeros(())
