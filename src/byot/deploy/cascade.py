"""Real early exit: a batch runs stage by stage and shrinks as samples leave, so compute really falls.

``EarlyExitNet`` applies the same rule as ``byot.deploy.policy.simulate`` (which scores it on collected
logits): after each shallow head, the samples whose calibrated maximum softmax reaches that exit's
threshold are answered and dropped from the batch; the rest continue to the next stage.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from byot.deploy.calibration import calibrated_softmax
from byot.deploy.policy import ExitPolicy, mean_probs
from byot.errors import ByotError
from byot.models import MultiExitNet


class EarlyExitResult(NamedTuple):
    """Per input sample (B,), in input order."""

    predicted: torch.Tensor  # class index
    probability: torch.Tensor  # its calibrated probability at the answering exit
    exit: torch.Tensor  # the answering exit's number: the stage it reads (the deepest: the number of stages)


class EarlyExitNet(nn.Module):
    """Wraps a trained multi-exit model (eval mode) with an exit policy."""

    def __init__(self, model: MultiExitNet, policy: ExitPolicy) -> None:
        super().__init__()
        if len(policy.thresholds) != model.num_exits - 1:
            raise ByotError(f"the model has {model.num_exits} exits: the policy needs {model.num_exits - 1} "
                            f"thresholds, got {len(policy.thresholds)}")
        model.path()  # a model that cannot be walked stage by stage (attach_exits' hooks) says so now, in one line
        self.model, self.policy = model.eval(), policy

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> EarlyExitResult:
        """x: (B, 3, H, W) normalised images -> each sample's answer and the exit that gave it."""
        m, policy = self.model, self.policy
        b = x.shape[0]
        predicted = torch.empty(b, dtype=torch.long, device=x.device)
        probability = torch.empty(b, dtype=torch.float32, device=x.device)
        exit_number = torch.empty(b, dtype=torch.long, device=x.device)
        alive = torch.arange(b, device=x.device)  # input positions of the samples still running
        seen: list[torch.Tensor] = []  # calibrated probabilities of the exits passed (ensemble only)
        for step in m.path():
            x = step.module(x)  # (B_alive, C, H, W)
            if step.head is None:
                continue
            position = m.exit_stages.index(step.number)
            last = position == m.num_exits - 1
            if not last and policy.thresholds[position] > 1.0 and policy.final != "ensemble":
                continue  # this head can never answer and the deepest exit needs nothing from it: skip it
            probs = calibrated_softmax(step.head(x)[0], policy.temperature(position))  # (B_alive, K)
            if last:  # the final exit answers everyone left
                answer = mean_probs([*seen, probs]) if policy.final == "ensemble" else probs
                done = torch.ones(len(alive), dtype=torch.bool, device=x.device)
            else:
                answer = probs
                done = probs.max(dim=1).values.double() >= policy.thresholds[position]
                if policy.final == "ensemble":
                    seen.append(probs)
            p, c = answer[done].max(dim=1)
            leaving = alive[done]
            predicted[leaving], probability[leaving], exit_number[leaving] = c, p, step.number
            keep = ~done
            alive, x = alive[keep], x[keep]
            seen = [s[keep] for s in seen]
            if len(alive) == 0:
                break
        return EarlyExitResult(predicted, probability, exit_number)
