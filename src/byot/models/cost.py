"""What each exit costs: parameters and FLOPs (2 x multiply-adds) of the network up to that exit."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from byot.models.base import MultiExitNet


def _flops(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    # attention through the math backend: its matmuls are counted on every device, where the CPU's fused
    # kernel has no FLOP formula in torch's counter (a ViT's attention would count as free)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = module(x)
    return counter.get_total_flops(), out


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def exit_costs(model: MultiExitNet, image_size: int) -> list[dict[str, int]]:
    """[{"exit", "flops", "params", "head_flops"}] per exit for one (1, 3, S, S) image, counted on the model.

    The cost of exit k ("flops", "params") is the stem, stages 1..k and head k: what a deployment that
    stops there runs. "head_flops" is head k alone: what an early-exit cascade pays extra at every exit
    it passes through (see ``byot.deploy.policy.exit_flops``).
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    flops = params = 0
    costs = []
    for step in model.path():
        step_flops, x = _flops(step.module, x)
        flops, params = flops + step_flops, params + _params(step.module)
        if step.head is not None:
            head_flops, _ = _flops(step.head, x)
            costs.append({"exit": step.number, "flops": flops + head_flops, "params": params + _params(step.head),
                          "head_flops": head_flops})
    model.train(was_training)
    return costs
