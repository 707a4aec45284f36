"""Shallow classifiers attached after stages 1-3 (the paper's "bottleneck" exits)."""

from __future__ import annotations

import torch
from torch import nn


class BottleneckExit(nn.Module):
    """1x1 conv -> kxk conv with stride k -> 1x1 conv (each + BN + ReLU), global pool, linear.

    The kxk stride-k convolution brings a stage's map (B, C_in, H, W) down to the deepest stage's
    size, and the 1x1 convolutions bring its channels to the deepest stage's ``out_channels``, so
    the pooled feature is directly comparable with the deepest exit's (the hint loss needs that).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_classes: int,
                 padding: int = 0) -> None:
        super().__init__()
        mid = max(out_channels // 4, 1)  # the reference's bottleneck ratio
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size=stride, stride=stride, padding=padding),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, kernel_size=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C_in, H, W) stage output -> (logits (B, classes), feature (B, out_channels))."""
        feature = self.body(x).mean(dim=(2, 3))  # (B, out_channels)
        return self.fc(feature), feature


class BackboneHead(nn.Module):
    """The backbone's own head (global average pool + linear): the deepest exit, the teacher."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) last stage output -> (logits (B, classes), feature (B, C))."""
        feature = x.mean(dim=(2, 3))  # (B, C)
        return self.fc(feature), feature
