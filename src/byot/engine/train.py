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
from byot.engine.runtime import Runtime
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
               scaler: torch.amp.GradScaler, exit_ids: Sequence[int]) -> list[tuple[dict, list[torch.Tensor]]]:
    """One optimizer step over ``group``: one uint8 batch (B, 3, H, W) with its labels, or several
    whose gradients accumulate (--accum-steps). Returns each batch's loss terms and detached logits."""
    total = sum(len(targets) for _, targets in group)
    optimizer.zero_grad(set_to_none=True)
    results = []
    for images, targets in group:
        with runtime.autocast():
            output = model(runtime.inputs(images))
        terms = loss_fn(output, targets, exit_ids)  # fp32, outside autocast
        objective = terms["loss"] if len(group) == 1 else loss_fn.objective(terms, len(targets) / total)
        with _bn_statistics_kept(model):
            scaler.scale(objective).backward()
        results.append((terms, [z.detach() for z in output.logits]))
    scaler.step(optimizer)
    scaler.update()
    return results


@contextlib.contextmanager
def _bn_statistics_kept(model: nn.Module) -> Iterator[None]:
    """With gradient checkpointing, backward re-runs each stage's forward, which would update the
    BatchNorm running statistics a second time; keep the values the real forward left."""
    base = getattr(model, "_orig_mod", model)
    if not getattr(base, "grad_checkpoint", False):
        yield
        return
    buffers = [b for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
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


def train_one_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                    loss_fn: SelfDistillLoss, runtime: Runtime, scaler: torch.amp.GradScaler,
                    exit_ids: Sequence[int], epoch: int, print_freq: int = 10,
                    progress: bool = False, accum_steps: int = 1) -> dict[str, Any]:
    """Train for one pass over ``batches``; returns mean loss terms, per-exit train top-1, timing.

    Running sums stay on the device (detached: no autograd graph outlives its step) and are read
    by the host only every ``print_freq`` steps and at the end.
    """
    model.train()
    sums: torch.Tensor | None = None  # (num_terms,) loss terms x batch size
    correct: torch.Tensor | None = None  # (num_exits,)
    names: list[str] = []
    seen, start = 0, time.perf_counter()
    steps = math.ceil(len(batches) / accum_steps)  # optimizer steps
    bar = _progress_bar(steps, epoch) if progress else None
    for step, group in enumerate(_groups(batches, accum_steps), start=1):
        for (_, targets), (terms, logits) in zip(group, train_step(model, group, optimizer, loss_fn, runtime,
                                                                    scaler, exit_ids)):
            with torch.no_grad():
                values = torch.stack([t.detach().float() for t in terms.values()]) * len(targets)
                hits = torch.stack([(z.argmax(dim=1) == targets).sum() for z in logits])
                sums = values if sums is None else sums + values
                correct = hits if correct is None else correct + hits
            names, seen = list(terms), seen + len(targets)
        if bar is not None:
            bar.update(1)
        if step % print_freq == 0 or step == steps:
            loss_now, top1_now = (sums[0] / seen).item(), (correct[-1] * 100.0 / seen).item()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_now:.3f}", top1=f"{top1_now:.1f}")
            log.debug("epoch %d step %d/%d loss %.4f top1(deepest) %.2f", epoch + 1, step, steps,
                      loss_now, top1_now)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if sums is None:
        return {"losses": {}, "train_top1": [], "images": 0, "seconds": seconds}
    means = (sums / seen).tolist()
    return {"losses": dict(zip(names, means)), "train_top1": (correct * 100.0 / seen).tolist(),
            "images": seen, "seconds": seconds}


def _progress_bar(total: int, epoch: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr)
