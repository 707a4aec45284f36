"""The early-exit policy, simulated on collected logits: who answers each sample, at what cost.

A sample leaves at the first shallow exit whose calibrated maximum softmax reaches that exit's
threshold; samples no shallow exit takes are answered by the final exit (the deepest, or the ensemble
of every exit). Leaving at exit k costs the network up to k plus every head evaluated on the way
(``exit_flops``): a head whose threshold is NEVER is skipped unless the ensemble needs it. ``byot.deploy.cascade.EarlyExitNet`` runs the same policy for real; a test holds the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from byot.deploy.calibration import calibrated_softmax
from byot.errors import ByotError

FINALS = ("deepest", "ensemble")
NEVER = 2.0  # a threshold no probability reaches (any value above 1 works): that exit never answers
MAX_COMBOS = 20_000  # threshold vectors scored when fitting (exhaustive over per-exit candidates)
COMBO_CHUNK = 1024  # threshold vectors scored at once: (chunk, S, N) booleans in memory
SWEEP_POINTS = 41  # shared thresholds in a sweep: quantiles of the shallow exits' confidences


@dataclass(frozen=True)
class ExitPolicy:
    """Thresholds per shallow exit, temperatures per exit, and who answers the rest."""

    thresholds: tuple[float, ...]  # one per shallow exit: leave when calibrated max softmax >= it
    temperatures: tuple[float, ...] = field(default=())  # one per exit; empty: all 1 (uncalibrated)
    final: str = "deepest"  # "deepest" | "ensemble" (mean of every exit's calibrated softmax)

    def __post_init__(self) -> None:
        if self.final not in FINALS:
            raise ByotError(f"final exit must be one of {', '.join(FINALS)}, got {self.final!r}")
        if self.temperatures and len(self.temperatures) != len(self.thresholds) + 1:
            raise ByotError(f"{len(self.thresholds)} thresholds need {len(self.thresholds) + 1} temperatures, "
                            f"got {len(self.temperatures)}")

    def temperature(self, exit_position: int) -> float:
        return self.temperatures[exit_position] if self.temperatures else 1.0

    def to_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "temperatures": list(self.temperatures), "final": self.final}


def mean_probs(probs: list[torch.Tensor]) -> torch.Tensor:
    """The ensemble: the mean of exits' (B, K) probabilities, summed in exit order (the cascade sums the same way)."""
    total = probs[0]
    for p in probs[1:]:
        total = total + p
    return total / len(probs)


def exit_flops(costs: list[dict], thresholds: torch.Tensor, final: str) -> torch.Tensor:
    """FLOPs per image of a sample that leaves at each exit, for every row of ``thresholds`` (M, S): (M, E).

    ``costs`` is ``byot.models.cost.exit_costs``. Leaving at exit e pays the stem, stages 1..e, head e and
    every earlier head that was evaluated: a shallow head runs unless its threshold is above 1 (it can
    never answer) and the final answer is the deepest exit (the ensemble reads every head).
    """
    base = torch.tensor([c["flops"] for c in costs], dtype=torch.float64)  # (E,)
    heads = torch.tensor([c["head_flops"] for c in costs[:-1]], dtype=torch.float64)  # (S,)
    evaluated = (thresholds <= 1.0) | (final == "ensemble")  # (M, S)
    paid = (evaluated * heads).cumsum(dim=1)  # (M, S): heads paid up to and including each shallow exit
    passed = torch.cat([torch.zeros(len(thresholds), 1, dtype=torch.float64), paid], dim=1)  # (M, E)
    return base + passed


@dataclass(frozen=True)
class Decision:
    """Per sample (N,): the predicted class, its probability and the 0-based position of the answering exit."""

    predicted: torch.Tensor
    probability: torch.Tensor
    exit_position: torch.Tensor


def simulate(logits: torch.Tensor, policy: ExitPolicy) -> Decision:
    """Apply ``policy`` to (E, N, K) logits of every exit (shallow to deep)."""
    n_exits = logits.shape[0]
    if len(policy.thresholds) != n_exits - 1:
        raise ByotError(f"the model has {n_exits} exits: give {n_exits - 1} thresholds, got {len(policy.thresholds)}")
    probs = [calibrated_softmax(z, policy.temperature(i)) for i, z in enumerate(logits)]  # E x (N, K)
    final = mean_probs(probs) if policy.final == "ensemble" else probs[-1]
    answers = torch.stack([*probs[:-1], final])  # (E, N, K)
    confidence = answers.max(dim=2).values  # (E, N)
    position = first_confident(confidence[:-1], torch.tensor(policy.thresholds, dtype=torch.float64)[None])[0]
    chosen = answers.gather(0, position[None, :, None].expand(1, -1, answers.shape[2]))[0]  # (N, K)
    probability, predicted = chosen.max(dim=1)
    return Decision(predicted, probability, position)


def first_confident(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """confidence (S, N) of the shallow exits, thresholds (M, S) -> (M, N) position of the first exit
    whose confidence reaches its threshold, or S (the final exit) where none does."""
    leave = confidence[None].double() >= thresholds[:, :, None]  # (M, S, N)
    any_left = leave.any(dim=1)  # (M, N)
    first = leave.to(torch.uint8).argmax(dim=1)  # (M, N): argmax returns the first maximal position
    return torch.where(any_left, first, torch.full_like(first, confidence.shape[0]))


def policy_stats(logits: torch.Tensor, targets: torch.Tensor, costs: list[dict], policy: ExitPolicy) -> dict:
    """``policy`` on (E, N, K) logits: {"top1" (percent), "mean_flops" (per image), "exit_shares"
    (fraction answered by each exit)}."""
    decision = simulate(logits, policy)
    position = decision.exit_position
    flops = exit_flops(costs, torch.tensor([policy.thresholds], dtype=torch.float64), policy.final)[0]  # (E,)
    shares = torch.bincount(position, minlength=len(costs)).double() / len(position)
    return {"top1": 100.0 * (decision.predicted == targets).double().mean().item(),
            "mean_flops": float(flops[position].mean()), "exit_shares": shares.tolist()}


@dataclass(frozen=True)
class _Scored:
    """Many threshold vectors scored at once on one split."""

    thresholds: torch.Tensor  # (M, S)
    top1: torch.Tensor  # (M,) percent
    mean_flops: torch.Tensor  # (M,)


def _score(logits: torch.Tensor, targets: torch.Tensor, temperatures: tuple[float, ...], final: str,
           costs: list[dict], thresholds: torch.Tensor) -> _Scored:
    """Accuracy and mean cost of every row of ``thresholds`` (M, S), without building per-row decisions."""
    n_exits = logits.shape[0]
    policy = ExitPolicy(tuple([0.0] * (n_exits - 1)), temperatures, final)
    probs = [calibrated_softmax(z, policy.temperature(i)) for i, z in enumerate(logits)]
    final_probs = mean_probs(probs) if final == "ensemble" else probs[-1]
    answers = torch.stack([*probs[:-1], final_probs])  # (E, N, K)
    confidence, predicted = answers.max(dim=2)  # (E, N)
    correct = (predicted == targets[None]).double()  # (E, N)
    top1, flops = [], []
    for start in range(0, len(thresholds), COMBO_CHUNK):
        chunk = thresholds[start:start + COMBO_CHUNK]  # (m, S)
        position = first_confident(confidence[:-1], chunk)  # (m, N)
        top1.append(100.0 * correct.gather(0, position).mean(dim=1))
        flops.append(exit_flops(costs, chunk, final).gather(1, position).mean(dim=1))
    return _Scored(thresholds, torch.cat(top1), torch.cat(flops))


def _candidates(confidence: torch.Tensor) -> torch.Tensor:
    """(S, N) shallow confidences -> (M, S) every combination of per-exit candidate thresholds:
    quantiles of that exit's confidences plus NEVER, at most MAX_COMBOS rows."""
    s = confidence.shape[0]
    per_exit = max(2, int(MAX_COMBOS ** (1.0 / s)) - 1)
    q = torch.linspace(0, 1, per_exit, dtype=torch.float64)
    options = [torch.cat([torch.quantile(c.double(), q), torch.tensor([NEVER], dtype=torch.float64)]).unique()
               for c in confidence]
    return torch.cartesian_prod(*options).reshape(-1, s)


def fit_thresholds(logits: torch.Tensor, targets: torch.Tensor, costs: list[dict], temperatures: tuple[float, ...],
                   final: str, budget_flops: float | None = None, max_drop: float | None = None) -> ExitPolicy:
    """Per-exit thresholds fitted on (E, N, K) validation logits, by exhaustive search over candidates.

    ``budget_flops``: the most accurate policy whose mean FLOPs per image stay within it.
    ``max_drop``: the cheapest policy whose top-1 is at most that many points below the final exit's
    alone (the deepest exit, or the ensemble with ``final="ensemble"``). Ties go to the cheaper, then
    the more accurate, policy.
    """
    if (budget_flops is None) == (max_drop is None):
        raise ByotError("give exactly one of --budget-flops and --max-drop")
    policy0 = ExitPolicy(tuple([0.0] * (logits.shape[0] - 1)), temperatures, final)
    probs = [calibrated_softmax(z, policy0.temperature(i)) for i, z in enumerate(logits[:-1])]
    confidence = torch.stack([p.max(dim=1).values for p in probs])  # (S, N)
    scored = _score(logits, targets, temperatures, final, costs, _candidates(confidence))
    if budget_flops is not None:
        feasible = scored.mean_flops <= budget_flops * (1 + 1e-12)
        if not feasible.any():
            raise ByotError(f"--budget-flops {budget_flops:.4g} is below the cheapest policy's "
                            f"{scored.mean_flops.min().item():.4g} FLOPs per image (every sample at the first exit)")
        best = _lexicographic_best(feasible, scored.top1, -scored.mean_flops)  # most accurate, then cheapest
    else:
        if max_drop < 0:
            raise ByotError(f"--max-drop must be >= 0 points, got {max_drop}")
        reference = _score(logits, targets, temperatures, final, costs,
                           torch.full((1, confidence.shape[0]), NEVER, dtype=torch.float64)).top1[0]
        feasible = scored.top1 >= reference - max_drop - 1e-9
        best = _lexicographic_best(feasible, -scored.mean_flops, scored.top1)  # cheapest, then most accurate
    return ExitPolicy(tuple(scored.thresholds[best].tolist()), temperatures, final)


def _lexicographic_best(feasible: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> int:
    """Index of the feasible row with the largest ``first``, ties broken by the largest ``second``."""
    rows = feasible.nonzero().flatten()
    top = first[rows].max()
    rows = rows[first[rows] >= top - 1e-9]
    return int(rows[second[rows].argmax()])


def sweep(logits: torch.Tensor, targets: torch.Tensor, costs: list[dict], temperatures: tuple[float, ...],
          final: str, points: int = SWEEP_POINTS) -> list[dict]:
    """The accuracy-versus-cost curve of one shared threshold for every shallow exit, from "everything
    leaves at exit 1" to "nothing leaves early": quantiles of the pooled shallow confidences, plus NEVER."""
    policy0 = ExitPolicy(tuple([0.0] * (logits.shape[0] - 1)), temperatures, final)
    shallow = torch.cat([calibrated_softmax(z, policy0.temperature(i)).max(dim=1).values
                         for i, z in enumerate(logits[:-1])]).double()
    shared = torch.cat([torch.quantile(shallow, torch.linspace(0, 1, points, dtype=torch.float64)),
                        torch.tensor([NEVER], dtype=torch.float64)]).unique()
    result = []
    for t in shared.tolist():
        policy = ExitPolicy(tuple([t] * (logits.shape[0] - 1)), temperatures, final)
        result.append({"thresholds": list(policy.thresholds), **policy_stats(logits, targets, costs, policy)})
    return result
