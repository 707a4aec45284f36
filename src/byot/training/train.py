"""One training epoch and the learning-rate schedule."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from byot.config import CHOICES
from byot.data import Batches
from byot.data.augment import Targets, hard_labels
from byot.errors import ByotError
from byot.losses import SelfDistillLoss, mean_feature_weight, term_kind
from byot.runs.faults import fault_point
from byot.training.distributed import all_reduce_max, all_reduce_sum
from byot.training.runtime import Runtime

log = logging.getLogger("byot.train")

SCHEDULES = CHOICES["schedule"]
REFERENCE_EPOCHS = 200
REFERENCE_MILESTONES = (75, 130, 180)  # of 200 epochs: lr x0.1 at each


def lr_at(epoch: int, base_lr: float, epochs: int, schedule: str, warmup: int = 0) -> float:
    """Learning rate for 0-based ``epoch``: a pure function of the config, so resume needs no state.

    "step": the reference's x0.1 at epochs 75, 130, 180 of 200, scaled to ``epochs``;
    "journal": the journal code's /10 at epochs E // 3, 2E // 3 and E - 10 (83 / 166 / 240 of 250; as a set:
    a milestone met twice divides once), except that no milestone falls on epoch 0: that code starts a
    10-epoch run at base / 10 (E - 10 = 0) and a 1- or 2-epoch one too (E // 3 = 0); from 11 epochs on the
    two agree;
    "cosine": half a cosine from ``base_lr`` to 0 over ``epochs``. ``warmup`` epochs first rise linearly
    (base / (warmup + 1), 2 base / (warmup + 1), ...), then the schedule runs over the epochs left.
    """
    if schedule not in SCHEDULES:
        raise ByotError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup:
        if epoch < warmup:
            return base_lr * (epoch + 1) / (warmup + 1)
        epoch, epochs = epoch - warmup, max(1, epochs - warmup)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "journal":
        return base_lr * 0.1 ** sum(epoch >= m for m in journal_milestones(epochs))
    # at least epoch 1: a short run never starts below the base rate
    milestones = [max(1, round(m * epochs / REFERENCE_EPOCHS)) for m in REFERENCE_MILESTONES]
    return base_lr * 0.1 ** sum(epoch >= m for m in milestones)


def journal_milestones(epochs: int) -> list[int]:
    """The epochs (0-based) at whose start the journal schedule divides the rate by 10."""
    return sorted({max(1, epochs // 3), max(1, 2 * epochs // 3), *([epochs - 10] if epochs > 10 else [])})


class StepResult(NamedTuple):
    batches: list[tuple[dict, list[torch.Tensor]]]  # per batch of the group: loss terms, detached logits
    bad: torch.Tensor  # () bool: some loss was not finite, in any process; the update was skipped


def train_step(model: nn.Module, group: Sequence[tuple[torch.Tensor, Targets]],
               optimizer: torch.optim.Optimizer, loss_fn: SelfDistillLoss, runtime: Runtime,
               scaler: torch.amp.GradScaler, exit_ids: Sequence[int],
               keep_bn_on_nonfinite: bool = False, global_total: int | None = None,
               world_size: int = 1, full_total: int | None = None) -> StepResult:
    """One optimizer step over ``group``: one uint8 batch (B, 3, H, W) with its labels, or several
    whose gradients accumulate (--accum-steps); under torchrun this process's part of the global batch(es)
    of ``global_total`` images (``PartWeights`` makes the gradient the one-process gradient of it all).
    ``full_total``: the images of a full step, for which the loss's feature weight was converted
    (``build_loss``); a step of another size, an epoch's last, keeps --beta's weight on its own images.

    The scaler skips the update when a gradient is not finite; ``keep_bn_on_nonfinite`` also undoes such a
    step's BatchNorm statistics (for --skip-nonfinite, where training goes on after it).
    """
    weigh = PartWeights(loss_fn, group, global_total, world_size, full_total)
    snapshot = BatchNormSnapshot(model) if keep_bn_on_nonfinite else None
    optimizer.zero_grad(set_to_none=True)
    results, objectives = [], []
    for i, (images, targets) in enumerate(group):
        with _gradients_reduced_after_last(model, i == len(group) - 1):
            with runtime.autocast():
                output = model(runtime.inputs(images))
            terms = loss_fn(output, targets, exit_ids)  # fp32, outside autocast
            objective = weigh(terms, targets)
            with _bn_statistics_kept(model):
                scaler.scale(objective).backward()
        results.append((terms, [z.detach() for z in output.logits]))
        objectives.append(objective.detach())
    scaler.step(optimizer)
    runtime.update_scaler(scaler)
    # one verdict for every process: a NaN in one process's loss poisons the averaged gradients of all
    bad = all_reduce_max((~torch.isfinite(torch.stack(objectives)).all()).float()) > 0
    if snapshot is not None:
        snapshot.restore_if(bad)
    return StepResult(results, bad)


def _gradients_reduced_after_last(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Accumulating under DDP: all-reduce the gradients once, after the group's last batch."""
    return model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()


class PartWeights:
    """Each part's objective within an optimizer step: a part is one batch of an accumulated step
    (--accum-steps) in one process of ``world_size``. The loss's terms are means, so a part's term weighs
    its share of the step's denominator (``SelfDistillLoss.denominators``: its images, or for class-weighted
    label terms its labels' summed weights) times the number of processes, which DistributedDataParallel's
    averaging divides out. The accumulated, averaged gradient is then the one-process gradient of the whole
    step's images; for the journal's feature term, a root mean square over images, it is where the parts'
    mean squared distances are equal (exact in one process without --accum-steps), as that code's norm
    scaled by the square root of the part's share was before.

    --beta weighs the references' feature term summed over a step's images; ``build_loss`` converts it to
    the per-image weight of a full step of ``full_total`` images (``mean_feature_weight``). A step of another
    size, an epoch's last, scales its feature terms from that weight to its own, so every step's objective
    stays the references' at --beta."""

    def __init__(self, loss_fn: SelfDistillLoss, group: Sequence[tuple[torch.Tensor, Targets]],
                 global_total: int | None, world_size: int, full_total: int | None = None) -> None:
        self.loss_fn, self.world = loss_fn, world_size
        images = global_total or sum(len(targets) for _, targets in group)
        feature = (mean_feature_weight(1.0, loss_fn.feature_loss, images)
                   / mean_feature_weight(1.0, loss_fn.feature_loss, full_total or images))
        self.exact = len(group) == 1 and world_size == 1 and feature == 1.0
        self.feature = {"hint": feature, "feature": feature}
        self.step = dict.fromkeys(loss_fn.denominators(group[0][1]), float(images))  # over processes too
        if loss_fn.class_weights is not None and not self.exact:
            label_weights = sum(loss_fn.denominators(targets)["ce"] for _, targets in group)
            self.step["ce"] = all_reduce_sum(label_weights.detach().clone())

    def __call__(self, terms: dict[str, torch.Tensor], targets: Targets) -> torch.Tensor:
        if self.exact:
            return terms["loss"]
        own = self.loss_fn.denominators(targets)
        scale = {kind: self.world * own[kind] / self.step[kind] * self.feature.get(kind, 1.0) for kind in own}
        return self.loss_fn.total({n: v * scale[term_kind(n)] for n, v in terms.items() if n != "loss"})


class BatchNormSnapshot:
    """The BatchNorm running statistics before a step, put back if the step turns out bad."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = _bn_buffers(model)
        self.saved = [b.clone() for b in self.buffers]

    def restore_if(self, bad: torch.Tensor) -> None:
        with torch.no_grad():
            for b, v in zip(self.buffers, self.saved):
                b.copy_(torch.where(bad, v, b))


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    base = _unwrapped(model)
    return [b for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


@contextlib.contextmanager
def _bn_statistics_kept(model: nn.Module) -> Iterator[None]:
    """With gradient checkpointing, backward re-runs each stage's forward, which would update the
    BatchNorm running statistics a second time; keep the values the real forward left."""
    base = _unwrapped(model)
    if not getattr(base, "grad_checkpoint", False):
        yield
        return
    buffers = _bn_buffers(model)
    saved = [b.clone() for b in buffers]
    yield
    with torch.no_grad():
        for b, v in zip(buffers, saved):
            b.copy_(v)


def _groups(batches: Batches, size: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class NonFiniteLoss(ByotError):
    """A loss term went NaN or infinite more often than --skip-nonfinite allows."""


class NonFiniteGuard:
    """Counts on the device the optimizer steps whose loss terms were not all finite; the host reads the
    count only where it reads the loss anyway (log lines, epoch end) and stops the run past ``allowed``.

    ``skipped`` carries the count of earlier epochs, so --skip-nonfinite N holds for the whole run.
    """

    def __init__(self, allowed: int, lr: float, skipped: int = 0) -> None:
        self.allowed, self.lr, self.skipped = allowed, lr, skipped
        self.names: list[str] = []
        self.bad_steps: torch.Tensor | None = None  # () long: bad steps in this epoch
        self.first_step: torch.Tensor | None = None  # () long: the first bad step (-1: none yet)
        self.first_terms: torch.Tensor | None = None  # (T,) bool: the terms that were not finite then
        self.reported = 0  # bad steps of this epoch already logged

    def observe(self, bad: torch.Tensor, finite: torch.Tensor, names: list[str], step: int) -> torch.Tensor:
        """bad: () bool, the step's verdict (the same in every process); finite: (T,) bool per loss term in
        this process, to name the culprit -> ``bad``."""
        if self.bad_steps is None:
            self.names = names
            self.bad_steps = torch.zeros((), dtype=torch.long, device=finite.device)
            self.first_step = torch.full((), -1, dtype=torch.long, device=finite.device)
            self.first_terms = torch.zeros_like(finite)
        first = bad & (self.first_step < 0)
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.first_terms = torch.where(first, ~finite, self.first_terms)
        self.bad_steps = self.bad_steps + bad.long()
        return bad

    def check(self, epoch: int) -> int:
        """Raise NonFiniteLoss when the run's bad steps exceed ``allowed``; returns the run's count so far."""
        if self.bad_steps is None:
            return self.skipped
        bad = int(self.bad_steps)  # steps whose verdict was bad: the same count in every process
        if bad == 0:
            return self.skipped
        total = self.skipped + bad
        step = int(self.first_step)
        terms = ([n for n, f in zip(self.names, self.first_terms.tolist()) if f and n != "loss"]
                 or ["loss (in another process)"])
        if total > self.allowed:
            allowed = f"more than --skip-nonfinite {self.allowed} " if self.allowed else ""
            raise NonFiniteLoss(
                f"loss term {', '.join(terms)} became non-finite at epoch {epoch + 1}, step {step} ({total} "
                f"{allowed}non-finite step(s) in this run); this epoch is not saved, finished epochs' checkpoints "
                f"are kept; try a lower --lr "
                f"(now {self.lr:g}), or --skip-nonfinite N to skip up to N such steps")
        if bad > self.reported:
            self.reported = bad
            log.warning("skipped the update of %d non-finite step(s) in epoch %d (first: step %d, %s); %d of "
                        "--skip-nonfinite %d used", bad, epoch + 1, step, ", ".join(terms), total, self.allowed)
        return total


class _EpochSums:
    """Running sums of one epoch on the device: loss terms x images and images of finite steps, hits per
    exit, images seen. ``totals`` is their sum over all processes (a copy; one all-reduce under torchrun)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # (T,)
        self.counted: torch.Tensor | None = None  # (): images of finite steps
        self.correct: torch.Tensor | None = None  # (E,)
        self.seen = 0  # all images (a host count: no device tensor per step)

    def add(self, names: list[str], sums: torch.Tensor, counted: torch.Tensor, correct: torch.Tensor,
            seen: int) -> None:
        self.names = names
        if self.sums is None:
            self.sums, self.counted, self.correct, self.seen = sums, counted, correct.float(), seen
        else:
            self.sums, self.counted = self.sums + sums, self.counted + counted
            self.correct, self.seen = self.correct + correct, self.seen + seen

    def totals(self) -> tuple[list[float], list[float], float]:
        """(mean loss terms over finite steps, per-exit top-1 percent, images) over all processes."""
        seen = torch.full((1,), float(self.seen), device=self.sums.device)
        flat = all_reduce_sum(torch.cat([self.sums, self.counted[None], self.correct, seen]))
        t = len(self.sums)
        sums, counted, correct, seen = flat[:t], flat[t], flat[t + 1:-1], flat[-1]
        return ((sums / counted.clamp(min=1)).tolist(), (correct * 100.0 / seen.clamp(min=1)).tolist(),
                float(seen))


def train_one_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                    loss_fn: SelfDistillLoss, runtime: Runtime, scaler: torch.amp.GradScaler,
                    exit_ids: Sequence[int], epoch: int, print_freq: int = 10,
                    progress: bool = False, accum_steps: int = 1,
                    guard: NonFiniteGuard | None = None,
                    on_step: Callable[[torch.Tensor], None] | None = None) -> dict[str, Any]:
    """Train for one pass over ``batches``; returns mean loss terms, per-exit train top-1, timing.

    Running sums stay on the device (detached: no autograd graph outlives its step) and are read
    by the host only every ``print_freq`` steps and at the end (summed over processes there under
    torchrun). Steps with a non-finite loss term are left out of the sums and counted by ``guard``,
    which stops the run past its allowance. ``on_step(bad)`` runs after every optimizer step with its () bool
    verdict (the weight average, which leaves out a skipped step).
    """
    model.train()
    guard = guard or NonFiniteGuard(0, 0.0)
    world = getattr(getattr(batches, "shard", None), "world", 1)
    sizes = batches.global_batch_sizes()
    totals = [sum(sizes[i:i + accum_steps]) for i in range(0, len(sizes), accum_steps)]  # per optimizer step
    full = batches.batch_size * accum_steps  # the images of a full step, as build_loss counts them
    acc = _EpochSums()
    start = time.perf_counter()
    steps = len(totals)
    bar = _progress_bar(steps, epoch) if progress else None
    keep_bn = guard.allowed > 0
    for step, group in enumerate(_groups(batches, accum_steps), start=1):
        fault_point("train_step")
        outcome = train_step(model, group, optimizer, loss_fn, runtime, scaler, exit_ids, keep_bn,
                             totals[step - 1], world, full)
        results = outcome.batches
        if on_step is not None:
            on_step(outcome.bad)
        with torch.no_grad():
            names = [n for n in results[0][0] if n != "loss"]  # the total is rebuilt from the terms' means
            values = torch.stack([_weighted(terms, names, len(targets))
                                  for (_, targets), (terms, _) in zip(group, results)])  # (G, T)
            finite = torch.stack([torch.isfinite(terms["loss"]) for terms, _ in results]).all()
            bad = guard.observe(outcome.bad, torch.cat([finite[None], torch.isfinite(values).all(dim=0)]),
                                ["loss", *names], step)
            images = sum(len(targets) for _, targets in group)
            step_sums = torch.where(bad, torch.zeros_like(values[0]), values.sum(dim=0))
            step_images = (~bad).float() * images  # a scalar operand: no host-to-device copy per step
            hits = sum(torch.stack([(z.argmax(dim=1) == hard_labels(targets)).sum() for z in logits])
                       for (_, targets), (_, logits) in zip(group, results))
            acc.add(names, step_sums, step_images, hits, images)
        if bar is not None:
            bar.update(1)
        if step % print_freq == 0 or step == steps:
            guard.check(epoch)
            means, top1, _ = acc.totals()
            loss_now = _total(loss_fn, acc.names, means)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_now:.3f}", top1=f"{top1[-1]:.1f}")
            log.debug("epoch %d step %d/%d loss %.4f top1(deepest) %.2f", epoch + 1, step, steps, loss_now, top1[-1])
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if acc.sums is None:
        return {"losses": {}, "train_top1": [], "images": 0, "seconds": seconds, "nonfinite_steps": guard.skipped}
    means, top1, seen = acc.totals()
    losses = {"loss": _total(loss_fn, acc.names, means), **dict(zip(acc.names, means))}
    return {"losses": losses, "train_top1": top1, "images": int(seen), "seconds": seconds,
            "nonfinite_steps": guard.check(epoch)}


def _weighted(terms: dict[str, torch.Tensor], names: list[str], images: int) -> torch.Tensor:
    """(T,) loss terms weighted for an image-weighted epoch mean: every term is a mean over this part's
    ``images`` (class-weighted label terms too: the log weighs images, not labels)."""
    return torch.stack([terms[n].detach().float() for n in names]) * float(images)


def _total(loss_fn: SelfDistillLoss, names: list[str], means: list[float]) -> float:
    """The mean total loss from the terms' means (the objective is linear in them)."""
    return float(loss_fn.total({n: torch.tensor(m) for n, m in zip(names, means)}))


def _progress_bar(total: int, epoch: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr)
