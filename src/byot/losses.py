"""The self-distillation loss of "Be Your Own Teacher" as pure functions plus one thin module.

The ICCV 2019 objective (byot's defaults), every term a mean over the batch's B images:

    total = (1 - alpha) * sum_{i=1..n} CE(y, z_i)
          + alpha * T^2 * sum_{i=1..n-1} softCE(softmax(z_n / T), z_i / T)
          + beta * sum_{i=1..n-1} mean_b sum_c((f_i - f_n)^2 where f_i > 0 or f_n > 0)

The TPAMI 2021 journal code's (``--recipe journal``: deepest_ce 1, alpha 0.3, no T^2, adapted features, the
second-deepest exit without a feature term):

    total = CE(y, z_n) + (1 - alpha) * sum_{i<n} CE(y, z_i) + alpha * sum_{i<n} softCE(softmax(z_n / T), z_i / T)
          + beta * sum_{i<n, i != n-1} || A_i(f_i) - f_n ||_2 / sqrt(B)

Means make the loss's value independent of how a batch is split: over processes (DDP) or accumulation steps,
the parts' values weighted by their shares (``SelfDistillLoss.denominators``) give the whole batch's. The two
references instead sum the feature term over the batch: the ICCV hint over images and channels (its beta
1e-6), the journal's L2 norm over the (B, C) difference (its beta 0.03). ``feature_reduction="sum"`` gives
their terms; their weights convert as ``mean_feature_weight`` says: beta_mean = beta_sum * B for the hint,
beta_sum * sqrt(B) for the journal's distance (a norm over B images is sqrt(B) times their root mean square).
The root mean square is the one term that does not split exactly: the parts' share-weighted mean equals the
whole batch's where the parts' mean squared distances are equal, and is below it otherwise.

z_i are exit i's logits, f_i its pooled features, shallow to deep; exit n (the deepest) is the teacher, and
its logits and feature are detached in the KD and feature terms. A_i is a learned linear map that the model
holds (``MultiExitNet.adapt_features``), so f_i arrives adapted; the distance is the Frobenius norm of the
(B, C) difference, as ``torch.dist`` in that code. The terms are named by the exits' numbers (``exit_ids``:
a model's ``exit_stages``, e.g. ``kd/exit2``, ``feature/exit1``).

Mixed targets (mixup, CutMix: ``byot.data.augment.Mixed``) enter the label terms only: image i's term is
lam_i CE(y_i, z_i) + (1 - lam_i) CE(y'_i, z_i). The KD and feature terms compare the mixed image's own
exits and need no labels. Label smoothing applies to the label terms only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from byot.data.augment import Mixed, Targets
from byot.models.base import MultiExitOutput


def cross_entropy(logits: torch.Tensor, targets: Targets, weight: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of (B, K) logits against (B,) integer labels; with (K,) class ``weight``
    the weighted mean sum_i w_{y_i} l_i / sum_i w_{y_i}. Mixed targets: each image's two labels weighed by
    its ratio, lam_i l(y_i) + (1 - lam_i) l(y'_i), over the same ratios of the class weights."""
    if not isinstance(targets, Mixed):
        return F.cross_entropy(logits.float(), targets, weight=weight, label_smoothing=label_smoothing)
    lam = targets.lam.float()
    own = F.cross_entropy(logits.float(), targets.labels, weight=weight, reduction="none",
                          label_smoothing=label_smoothing)
    other = F.cross_entropy(logits.float(), targets.partner_labels, weight=weight, reduction="none",
                            label_smoothing=label_smoothing)
    total = (lam * own + (1.0 - lam) * other).sum()
    return total / label_weight_sum(weight, targets) if weight is not None else total / len(lam)


def label_weight_sum(weight: torch.Tensor | None, targets: Targets) -> torch.Tensor:
    """The sum of the class weights of a batch's labels (its image count without weights): what a weighted
    mean divides by; mixed labels count by their ratios."""
    if weight is None:
        return torch.tensor(float(len(targets)))
    if isinstance(targets, Mixed):
        lam = targets.lam.float()
        return (lam * weight[targets.labels] + (1.0 - lam) * weight[targets.partner_labels]).sum()
    return weight[targets].sum()


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -sum_k p_k log softmax(z / T)_k, p the (B, K) softened teacher.

    This is the reference's KD term: a cross-entropy, not a KL divergence, so its value includes the
    teacher's entropy (a constant for the student's gradient).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)  # (B, K)
    return -(teacher_probs * log_q).sum(dim=1).mean()


FEATURE_REDUCTIONS = ("mean", "sum")


def feature_hint(feature: torch.Tensor, teacher_feature: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The ICCV hint of (B, C) features: per image, the sum over channels of squared differences where either
    feature is positive; "mean" over the images, or "sum" (the reference's, hence its beta of ~1e-6)."""
    feature, teacher_feature = feature.float(), teacher_feature.float()
    mask = (feature > 0) | (teacher_feature > 0)
    per_image = ((feature - teacher_feature) ** 2 * mask).sum(dim=1)  # (B,)
    return per_image.sum() if reduction == "sum" else per_image.mean()


def feature_distance(feature: torch.Tensor, teacher_feature: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The journal's distance of (B, C) features: "sum" is the L2 (Frobenius) norm of the whole difference (its
    code's ``torch.dist``, not squared); "mean" that norm over sqrt(B), the root mean square of the images'
    distances."""
    norm = torch.linalg.vector_norm(feature.float() - teacher_feature.float())
    return norm if reduction == "sum" else norm / len(feature) ** 0.5


def mean_feature_weight(beta_sum: float, feature_loss: str, images: int) -> float:
    """The weight of the "mean" feature term that equals ``beta_sum`` on the summed one for a batch of
    ``images``: beta_sum * images for the hint, beta_sum * sqrt(images) for the journal's distance."""
    return beta_sum * (images ** 0.5 if feature_loss == "adapted" else images)


def term_kind(name: str) -> str:
    """"ce", "kd", "hint" or "feature": the kind of a named term ("kd/exit2" -> "kd")."""
    return name.split("/", 1)[0]


def term_exit(name: str) -> int:
    """The exit number in a term's name ("ce/exit4" -> 4)."""
    return int(name.rsplit("exit", 1)[1])


class SelfDistillLoss:
    """Applies the weights and returns every named term; ``out["loss"]`` is the total.

    ``alpha``: share of the KD term (0 gives deep supervision: every exit learns from labels only).
    ``beta``: weight of the feature term; the default 1.28e-4 is the reference's 1e-6 on its summed hint at
    its 128 images per batch (``mean_feature_weight``). ``temperature``: softens the teacher; KD scaled by
    T**2 where ``kd_t2``. ``deepest_ce``: the deepest exit's label weight (None: 1 - alpha, like the others).
    ``feature_loss``: "hint" (ICCV) or "adapted" (the journal's distance; the model adapts the features).
    ``feature_reduction``: "mean" over the batch's images (the default: the value does not depend on the
    batch's size or split) or "sum", the references' (beta_mean = beta_sum * B for the hint, beta_sum *
    sqrt(B) for "adapted"). ``feature_skip``: exit numbers without a feature term. The values are checked
    once, in the run configuration (``byot.config.RANGES``).

    The label and KD terms are always means: over the images, or with ``class_weights`` the weighted mean
    sum_b w_{y_b} l_b / sum_b w_{y_b}.
    """

    def __init__(self, alpha: float = 0.1, beta: float = 1.28e-4, temperature: float = 3.0,
                 class_weights: torch.Tensor | None = None, *, deepest_ce: float | None = None,
                 kd_t2: bool = True, feature_loss: str = "hint", feature_skip: Sequence[int] = (),
                 label_smoothing: float = 0.0, feature_reduction: str = "mean") -> None:
        if feature_reduction not in FEATURE_REDUCTIONS:
            raise ValueError(f"feature_reduction must be one of {FEATURE_REDUCTIONS}, not {feature_reduction!r}")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.class_weights = class_weights  # (K,) weights of the label terms, or None
        self.deepest_ce, self.kd_t2, self.feature_loss = deepest_ce, kd_t2, feature_loss
        self.feature_skip, self.label_smoothing = tuple(feature_skip), label_smoothing
        self.feature_reduction = feature_reduction

    def __call__(
        self, output: MultiExitOutput, targets: torch.Tensor, exit_ids: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """output: logits/features lists (deepest last); targets (B,) -> {"loss", "ce/exitK", ...}.

        ``exit_ids`` names the exits in the returned keys (default 1..n).
        """
        ids = list(exit_ids) if exit_ids is not None else list(range(1, len(output.logits) + 1))
        terms: dict[str, torch.Tensor] = {}
        for k, z in zip(ids, output.logits):
            terms[f"ce/exit{k}"] = cross_entropy(z, targets, self.class_weights, self.label_smoothing)
        # The teacher is detached: the shallow exits learn from it, it does not learn from them.
        teacher_probs = F.softmax(output.logits[-1].detach().float() / self.temperature, dim=1)
        teacher_feature = output.features[-1].detach()
        for k, z, f in zip(ids[:-1], output.logits[:-1], output.features[:-1]):
            terms[f"kd/exit{k}"] = soft_cross_entropy(z, teacher_probs, self.temperature)
            if k in self.feature_skip:
                continue
            if self.feature_loss == "adapted":
                terms[f"feature/exit{k}"] = feature_distance(f, teacher_feature, self.feature_reduction)
            else:
                terms[f"hint/exit{k}"] = feature_hint(f, teacher_feature, self.feature_reduction)
        return {"loss": self.total(terms), **terms}

    def denominators(self, targets: Targets) -> dict[str, torch.Tensor]:
        """What each kind of term is a mean over, for a batch with ``targets``: its summed class weights for
        the label terms (its image count without class weights), its image count for the others.

        A batch split into parts p has the whole's value as sum_p d_p term_p / sum_p d_p for every term
        (for "mean" features; the journal's distance approximately, see the module's docstring).
        """
        images = torch.tensor(float(len(targets)))
        return {"ce": label_weight_sum(self.class_weights, targets), "kd": images, "hint": images,
                "feature": images}

    @property
    def weights(self) -> dict[str, float]:
        """Each kind of term's weight in the total (the deepest exit's label term: ``term_weight``)."""
        kd = self.alpha * self.temperature**2 if self.kd_t2 else self.alpha
        return {"ce": 1.0 - self.alpha, "kd": kd, "hint": self.beta, "feature": self.beta}

    def term_weight(self, name: str, deepest: int) -> float:
        """The weight of term ``name`` when exit ``deepest`` is the teacher."""
        if self.deepest_ce is not None and name == f"ce/exit{deepest}":
            return self.deepest_ce
        return self.weights[term_kind(name)]

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of named ``terms`` (any "loss" entry left out); the deepest exit is the highest
        numbered label term's."""
        names = [name for name in terms if name != "loss"]
        if not names:
            return torch.zeros(())
        deepest = max((term_exit(name) for name in names if term_kind(name) == "ce"), default=0)
        parts = [self.term_weight(name, deepest) * terms[name] for name in names]
        return sum(parts[1:], parts[0])


def describe_loss(loss: SelfDistillLoss) -> str:
    """One line for the run log: each kind of term's weight."""
    deepest = f"deepest {loss.deepest_ce:g}" if loss.deepest_ce is not None else "all"
    kd = f"{loss.alpha:g} x T^2 = {loss.weights['kd']:g}" if loss.kd_t2 else f"{loss.alpha:g} (no T^2)"
    skip = f", none for exit {', '.join(map(str, loss.feature_skip))}" if loss.feature_skip else ""
    smoothing = f", label smoothing {loss.label_smoothing:g}" if loss.label_smoothing else ""
    return (f"CE {1 - loss.alpha:g} ({deepest}), KD {kd} at T = {loss.temperature:g}, {loss.feature_loss} "
            f"{loss.beta:g} ({loss.feature_reduction} over images){skip}{smoothing}")
