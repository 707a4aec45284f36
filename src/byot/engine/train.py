"""One training epoch and the learning-rate schedule."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from byot.data import Batches
from byot.engine.faults import fault_point, reached
from byot.engine.runtime import Runtime
from byot.errors import ByotError
from byot.losses import SelfDistillLoss

log = logging.getLogger("byot.train")

REFERENCE_EPOCHS = 200
REFERENCE_MILESTONES = (75, 130, 180)  # of 200 epochs: lr x0.1 at each


def lr_at(epoch: int, base_lr: float, epochs: int, schedule: str) -> float:
    """Learning rate for 0-based ``epoch``: a pure function of the config, so resume needs no state.

    "step": the reference's x0.1 at epochs 75, 130, 180 of 200, scaled to ``epochs``;
    "cosine": half a cosine from ``base_lr`` to 0 over ``epochs``.
    """
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    # at least epoch 1: a short run never starts below the base rate
    milestones = [max(1, round(m * epochs / REFERENCE_EPOCHS)) for m in REFERENCE_MILESTONES]
    return base_lr * 0.1 ** sum(epoch >= m for m in milestones)


def train_step(model: nn.Module, group: Sequence[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, loss_fn: SelfDistillLoss, runtime: Runtime,
               scaler: torch.amp.GradScaler, exit_ids: Sequence[int],
               keep_bn_on_nonfinite: bool = False) -> list[tuple[dict, list[torch.Tensor]]]:
    """One optimizer step over ``group``: one uint8 batch (B, 3, H, W) with its labels, or several
    whose gradients accumulate (--accum-steps). Returns each batch's loss terms and detached logits.

    The scaler skips the update when a gradient is not finite, without a host synchronisation (the
    fused and foreach SGD kernels read its flag on the device). ``keep_bn_on_nonfinite`` also undoes
    such a step's BatchNorm statistics (for --skip-nonfinite, where training goes on after it).
    """
    total = sum(len(targets) for _, targets in group)
    optimizer.zero_grad(set_to_none=True)
    snapshot = _bn_buffers(model) if keep_bn_on_nonfinite else []
    saved = [b.clone() for b in snapshot]
    results, objectives = [], []
    for images, targets in group:
        with runtime.autocast():
            output = model(runtime.inputs(images))
        terms = loss_fn(output, targets, exit_ids)  # fp32, outside autocast
        if reached("nonfinite_loss"):  # fault injection (tests): this step's KD term of exit 2 becomes NaN
            terms["kd/exit2"] = terms["kd/exit2"] * float("nan")
            terms["loss"] = loss_fn.objective({k: v for k, v in terms.items() if k != "loss"})
        objective = terms["loss"] if len(group) == 1 else loss_fn.objective(terms, len(targets) / total)
        with _bn_statistics_kept(model):
            scaler.scale(objective).backward()
        results.append((terms, [z.detach() for z in output.logits]))
        objectives.append(objective.detach())
    scaler.step(optimizer)
    scaler.update()
    if snapshot:
        bad = ~torch.isfinite(torch.stack(objectives)).all()
        with torch.no_grad():
            for b, v in zip(snapshot, saved):
                b.copy_(torch.where(bad, v, b))
    return results


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    base = getattr(model, "_orig_mod", model)
    return [b for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


@contextlib.contextmanager
def _bn_statistics_kept(model: nn.Module) -> Iterator[None]:
    """With gradient checkpointing, backward re-runs each stage's forward, which would update the
    BatchNorm running statistics a second time; keep the values the real forward left."""
    base = getattr(model, "_orig_mod", model)
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

    def observe(self, finite: torch.Tensor, names: list[str], step: int) -> torch.Tensor:
        """finite: (T,) bool per loss term for this step -> () bool, True if the step was bad."""
        if self.bad_steps is None:
            self.names = names
            self.bad_steps = torch.zeros((), dtype=torch.long, device=finite.device)
            self.first_step = torch.full((), -1, dtype=torch.long, device=finite.device)
            self.first_terms = torch.zeros_like(finite)
        bad = ~finite.all()
        first = bad & (self.first_step < 0)
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.first_terms = torch.where(first, ~finite, self.first_terms)
        self.bad_steps = self.bad_steps + bad.long()
        return bad

    def check(self, epoch: int) -> int:
        """Raise NonFiniteLoss when the run's bad steps exceed ``allowed``; returns the run's count so far."""
        if self.bad_steps is None:
            return self.skipped
        bad = int(self.bad_steps)
        if bad == 0:
            return self.skipped
        total = self.skipped + bad
        step = int(self.first_step)
        terms = [n for n, f in zip(self.names, self.first_terms.tolist()) if f and n != "loss"] or ["loss"]
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


def train_one_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                    loss_fn: SelfDistillLoss, runtime: Runtime, scaler: torch.amp.GradScaler,
                    exit_ids: Sequence[int], epoch: int, print_freq: int = 10,
                    progress: bool = False, accum_steps: int = 1,
                    guard: NonFiniteGuard | None = None) -> dict[str, Any]:
    """Train for one pass over ``batches``; returns mean loss terms, per-exit train top-1, timing.

    Running sums stay on the device (detached: no autograd graph outlives its step) and are read
    by the host only every ``print_freq`` steps and at the end. Steps with a non-finite loss term
    are left out of the sums and counted by ``guard``, which stops the run past its allowance.
    """
    model.train()
    guard = guard or NonFiniteGuard(0, 0.0)
    sums: torch.Tensor | None = None  # (num_terms,) loss terms x batch size, finite steps only
    correct: torch.Tensor | None = None  # (num_exits,)
    counted: torch.Tensor | None = None  # () images of finite steps
    names: list[str] = []
    seen, start = 0, time.perf_counter()
    steps = math.ceil(len(batches) / accum_steps)  # optimizer steps
    bar = _progress_bar(steps, epoch) if progress else None
    keep_bn = guard.allowed > 0
    for step, group in enumerate(_groups(batches, accum_steps), start=1):
        fault_point("train_step")
        results = train_step(model, group, optimizer, loss_fn, runtime, scaler, exit_ids, keep_bn)
        with torch.no_grad():
            names = list(results[0][0])
            values = torch.stack([torch.stack([t.detach().float() for t in terms.values()]) * len(targets)
                                  for (_, targets), (terms, _) in zip(group, results)])  # (G, T)
            bad = guard.observe(torch.isfinite(values).all(dim=0), names, step)
            images = sum(len(targets) for _, targets in group)
            step_sums = torch.where(bad, torch.zeros_like(values[0]), values.sum(dim=0))
            step_images = torch.where(bad, torch.zeros((), device=values.device), torch.tensor(
                float(images), device=values.device))
            hits = sum(torch.stack([(z.argmax(dim=1) == targets).sum() for z in logits])
                       for (_, targets), (_, logits) in zip(group, results))
            sums = step_sums if sums is None else sums + step_sums
            counted = step_images if counted is None else counted + step_images
            correct = hits if correct is None else correct + hits
        seen += images
        if bar is not None:
            bar.update(1)
        if step % print_freq == 0 or step == steps:
            guard.check(epoch)
            loss_now, top1_now = (sums[0] / counted.clamp(min=1)).item(), (correct[-1] * 100.0 / seen).item()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_now:.3f}", top1=f"{top1_now:.1f}")
            log.debug("epoch %d step %d/%d loss %.4f top1(deepest) %.2f", epoch + 1, step, steps,
                      loss_now, top1_now)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if sums is None:
        return {"losses": {}, "train_top1": [], "images": 0, "seconds": seconds, "nonfinite_steps": guard.skipped}
    means = (sums / counted.clamp(min=1)).tolist()
    return {"losses": dict(zip(names, means)), "train_top1": (correct * 100.0 / seen).tolist(),
            "images": seen, "seconds": seconds, "nonfinite_steps": guard.check(epoch)}


def _progress_bar(total: int, epoch: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr)
