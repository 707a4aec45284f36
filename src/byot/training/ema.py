"""An exponential moving average of a model's weights (``--ema DECAY``), updated after every optimizer step.

    ema <- decay * ema + (1 - decay) * weights

for every floating-point parameter and buffer (BatchNorm's running statistics included, as timm's
ModelEmaV2); integer buffers (BatchNorm's step count) are copied. The average is a model of its own, in eval
mode, which ``evaluate`` scores per exit like the trained one; its state goes into every checkpoint beside
the weights, so a resumed run continues the same average and ends where an uninterrupted one does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """The average of ``model``'s weights with ``decay`` per step; ``module`` is the averaged model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        ours, theirs = self.module.state_dict().values(), model.state_dict().values()
        pairs = list(zip(ours, theirs))  # views of the tensors themselves: valid while neither is rebuilt
        self.floats = [(a, b) for a, b in pairs if a.is_floating_point()]
        self.others = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | None = None) -> None:
        """One step of the average; ``skipped`` (a () bool on the device: the step's update was skipped for a
        non-finite loss) leaves it as it is, without reading the flag on the host."""
        ours, theirs = [a for a, _ in self.floats], [b for _, b in self.floats]
        if skipped is None:
            torch._foreach_lerp_(ours, theirs, 1.0 - self.decay)
        elif ours:
            steps = torch._foreach_sub(theirs, ours)
            torch._foreach_mul_(steps, (~skipped).float() * (1.0 - self.decay))
            torch._foreach_add_(ours, steps)
        for a, b in self.others:
            a.copy_(torch.where(skipped, a, b) if skipped is not None else b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """In place, so the pairs stay the module's own tensors."""
        with torch.no_grad():
            for key, value in self.module.state_dict().items():
                value.copy_(state[key])
