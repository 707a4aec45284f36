"""What each exit costs: parameters and FLOPs (2 x multiply-adds) of the network up to that exit."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from byot.models.resnet import MultiExitResNet


def _flops(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, Any]:
    with FlopCounterMode(display=False) as counter:
        out = module(x)
    return counter.get_total_flops(), out


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def exit_costs(model: MultiExitResNet, image_size: int) -> list[dict[str, int]]:
    """[{"exit", "flops", "params", "head_flops"}] per exit for one (1, 3, S, S) image, counted on the model.

    The cost of exit k ("flops", "params") is the stem, stages 1..k and head k: what a deployment that
    stops there runs. "head_flops" is head k alone: what an early-exit cascade pays extra at every exit
    it passes through (see ``byot.deploy.policy.exit_flops``).
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    flops, x = _flops(model.stem, x)
    params = _params(model.stem)
    costs = []
    for stage_index, stage in enumerate(model.stages, start=1):
        stage_flops, x = _flops(stage, x)
        flops, params = flops + stage_flops, params + _params(stage)
        if stage_index in model.exit_stages:
            head = model.heads[model.exit_stages.index(stage_index)]
            head_flops, _ = _flops(head, x)
            costs.append({"exit": stage_index, "flops": flops + head_flops, "params": params + _params(head),
                          "head_flops": head_flops})
    model.train(was_training)
    return costs

