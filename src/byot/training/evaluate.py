"""Evaluation: per-exit and ensemble top-1/top-5 (inference kept apart from scoring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from byot.data import Batches
from byot.runs.faults import fault_point
from byot.training.distributed import all_reduce_sum, distributed
from byot.training.runtime import Runtime


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """(B, K) logits, (B,) targets -> (len(ks),) counts of samples whose label is in the top k."""
    top = logits.topk(max(ks), dim=1).indices  # (B, max k)
    hits = top == targets[:, None]  # (B, max k)
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def exit_hits(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Every exit's (B, K) logits, (B,) targets -> (E + 1, 2) counts of top-1 and top-5 hits (top-K where
    K < 5): each exit, then the ensemble (the mean of the exits' softmax)."""
    ks = (1, min(5, logits[0].shape[1]))
    ensemble = torch.stack([z.float().softmax(dim=1) for z in logits]).mean(dim=0)  # (B, K)
    return torch.stack([topk_correct(z, targets, ks) for z in [*logits, ensemble]])


def accuracies(correct: torch.Tensor, seen: int, exit_ids: Sequence[int]) -> dict[str, Any]:
    """(E + 1, 2) hit counts over ``seen`` images -> {"num_images", "exits": [{"exit", "top1", "top5"}],
    "ensemble": {"top1", "top5"}}, in percent."""
    acc = (correct.double() * 100.0 / seen).tolist()
    exits = [{"exit": k, "top1": a[0], "top5": a[1]} for k, a in zip(exit_ids, acc)]
    return {"num_images": seen, "exits": exits, "ensemble": {"top1": acc[-1][0], "top5": acc[-1][1]}}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Batches, runtime: Runtime, exit_ids: Sequence[int],
             confusion: bool = False) -> dict[str, Any]:
    """Accuracy (percent) of every exit and of the ensemble (mean of the exits' softmax).

    Counts accumulate on the device; the host reads them once, at the end (after summing them over
    processes under torchrun, where each scored its shard of every batch). With ``confusion`` the
    result also holds "confusion": one (K, K) int64 matrix per exit (rows: true class, columns: predicted).
    """
    matrices: torch.Tensor | None = None  # (num_exits, K * K)
    model.eval()
    correct: torch.Tensor | None = None  # (num_exits + 1, 2) top-1/top-5 hits: exits, then the ensemble
    seen = 0
    for images, targets in batches:
        fault_point("evaluate")
        with runtime.autocast():
            logits = model(runtime.inputs(images)).logits
        hits = exit_hits(logits, targets)
        correct = hits if correct is None else correct + hits
        seen += len(targets)
        if confusion:
            k = logits[0].shape[1]
            cells = torch.stack([targets * k + z.argmax(dim=1) for z in logits])  # (E, B) flat cell index
            counts = torch.stack([torch.bincount(c, minlength=k * k) for c in cells])
            matrices = counts if matrices is None else matrices + counts
    if correct is None and not distributed():
        return {"num_images": 0, "exits": [], "ensemble": {"top1": 0.0, "top5": 0.0}}
    if correct is None:  # under torchrun a process may hold no image of a small split: it adds zeros
        correct = torch.zeros(len(exit_ids) + 1, 2, dtype=torch.long, device=runtime.device)
    # under torchrun each process scored its part of every batch: the counts add up to the whole split
    counts = all_reduce_sum(torch.cat([correct.flatten(), torch.tensor([seen], device=correct.device)]))
    correct, seen = counts[:-1].view_as(correct), int(counts[-1])
    if matrices is not None:
        matrices = all_reduce_sum(matrices)
    result = accuracies(correct, seen, exit_ids)
    if matrices is not None:
        k = round(matrices.shape[1] ** 0.5)
        result["confusion"] = [m.view(k, k).cpu() for m in matrices]
    return result


@torch.inference_mode()
def collect_logits(model: nn.Module, batches: Batches, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's logits for every sample, in the batches' order: ((E, N, K) float32, (N,) labels), on the CPU.

    The inference half of calibration and early-exit fitting: everything after it works on these
    tensors alone, so a policy can be scored for thousands of thresholds without running the network again.
    """
    model.eval()
    chunks: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for images, targets in batches:
        with runtime.autocast():
            logits = model(runtime.inputs(images)).logits
        chunks.append(torch.stack([z.float() for z in logits]).cpu())  # (E, B, K)
        labels.append(targets.cpu())
    if not chunks:
        raise ValueError("no batches to collect logits from")
    return torch.cat(chunks, dim=1), torch.cat(labels)
