"""One training epoch and the learning-rate schedule."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn as nn

from byot.data import Batches
from byot.engine.runtime import Runtime
from byot.losses import SelfDistillLoss
from byot.models import MultiExitOutput

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


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: SelfDistillLoss, runtime: Runtime, scaler: torch.amp.GradScaler,
               exit_ids: Sequence[int]) -> tuple[dict[str, torch.Tensor], MultiExitOutput]:
    """One optimisation step on a uint8 batch (B, 3, H, W); returns the loss terms and the output."""
    with runtime.autocast():
        output = model(runtime.inputs(images))
    terms = loss_fn(output, targets, exit_ids)  # fp32, outside autocast
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return terms, output


def train_one_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                    loss_fn: SelfDistillLoss, runtime: Runtime, scaler: torch.amp.GradScaler,
                    exit_ids: Sequence[int], epoch: int, print_freq: int = 10,
                    progress: bool = False) -> dict[str, Any]:
    """Train for one pass over ``batches``; returns mean loss terms, per-exit train top-1, timing.

    Running sums stay on the device (detached: no autograd graph outlives its step) and are read
    by the host only every ``print_freq`` steps and at the end.
    """
    model.train()
    sums: torch.Tensor | None = None  # (num_terms,) loss terms x batch size
    correct: torch.Tensor | None = None  # (num_exits,)
    names: list[str] = []
    seen, start = 0, time.perf_counter()
    bar = _progress_bar(len(batches), epoch) if progress else None
    for step, (images, targets) in enumerate(batches, start=1):
        terms, output = train_step(model, images, targets, optimizer, loss_fn, runtime, scaler, exit_ids)
        with torch.no_grad():
            values = torch.stack([t.detach().float() for t in terms.values()]) * len(targets)
            hits = torch.stack([(z.argmax(dim=1) == targets).sum() for z in output.logits])
            sums = values if sums is None else sums + values
            correct = hits if correct is None else correct + hits
        names, seen = list(terms), seen + len(targets)
        if bar is not None:
            bar.update(1)
        if step % print_freq == 0 or step == len(batches):
            loss_now, top1_now = (sums[0] / seen).item(), (correct[-1] * 100.0 / seen).item()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_now:.3f}", top1=f"{top1_now:.1f}")
            log.debug("epoch %d step %d/%d loss %.4f top1(deepest) %.2f", epoch + 1, step, len(batches),
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
