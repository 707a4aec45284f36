"""Shallow classifiers attached after stages 1-3, by name: "bottleneck" (the ICCV 2019 paper's) and
"attention" (the TPAMI 2021 journal version's). Each maps a stage's map to (logits, pooled feature) with
the feature as wide as the deepest stage's, which the hint loss compares with the teacher's."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from byot.errors import ByotError


def pooled_logits(fc: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) map -> (logits (B, classes), pooled feature (B, C)), both in fp32 whatever the autocast.

    The classifier is a sliver of the compute, but bf16 logits carry 8 bits of mantissa: ties between
    classes become common and softmax confidences (which early exit thresholds) coarse. So the pooling
    and the linear layer run in fp32.
    """
    feature = x.float().mean(dim=(2, 3))  # (B, C)
    with torch.autocast(x.device.type, enabled=False):
        return fc(feature), feature


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
        return pooled_logits(self.fc, self.body(x))


class BackboneHead(nn.Module):
    """The backbone's own head (global average pool + linear): the deepest exit, the teacher."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) last stage output -> (logits (B, classes), feature (B, C))."""
        return pooled_logits(self.fc, x)


class SepConv(nn.Sequential):
    """Two depthwise-separable 3x3 convolutions, the first strided: (B, C_in, H, W) -> (B, C_out, ceil(H/s), ...).

    depthwise 3x3 (stride s) -> pointwise 1x1 -> BN -> ReLU -> depthwise 3x3 -> pointwise 1x1 to C_out -> BN -> ReLU,
    as the journal version's shallow classifiers and attention modules use.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class AttentionExit(nn.Module):
    """The TPAMI 2021 shallow classifier: a learned sigmoid mask over the stage's map, then a chain of
    SepConv blocks (each halving the size and doubling the channels) down to the deepest stage's size and
    channels, global pool, linear.

    The mask is a SepConv of the map at half resolution, resized back to the map's size and squashed by a
    sigmoid: it selects where the exit looks. It gates only the exit's input; the backbone runs on unmasked.
    """

    def __init__(self, in_channels: int, out_channels: int, strides: list[int], num_classes: int) -> None:
        """One SepConv block per doubling of the channels (len(strides) of them); ``strides``: 2 while the
        map is larger than the deepest stage's, 1 once it has that size (tiny inputs)."""
        super().__init__()
        if in_channels * 2 ** len(strides) != out_channels:
            raise ByotError(f"attention exit: {in_channels} channels cannot reach {out_channels} by doubling "
                            f"{len(strides)} times")
        self.attention = SepConv(in_channels, in_channels)
        self.body = nn.Sequential(*[SepConv(in_channels * 2**j, in_channels * 2 ** (j + 1), stride)
                                    for j, stride in enumerate(strides)])
        self.fc = nn.Linear(out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C_in, H, W) stage output -> (logits (B, classes), feature (B, out_channels))."""
        mask = F.interpolate(self.attention(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return pooled_logits(self.fc, self.body(torch.sigmoid(mask) * x))


def halvings(size: int, last_size: int) -> int:
    """How many stride-2 steps (H -> ceil(H / 2)) take ``size`` px down to ``last_size`` px."""
    steps = 0
    while size > last_size:
        size, steps = math.ceil(size / 2), steps + 1
    return steps


def _bottleneck(in_channels: int, out_channels: int, size: int, last_size: int, num_classes: int) -> nn.Module:
    k = math.ceil(size / last_size)  # the smallest stride that reaches the last stage's size
    padding = math.ceil((k * last_size - size) / 2)  # floor((size + 2p - k) / k) + 1 == last_size exactly
    return BottleneckExit(in_channels, out_channels, k, num_classes, padding)


def _attention(in_channels: int, out_channels: int, size: int, last_size: int, num_classes: int) -> nn.Module:
    doublings = round(math.log2(out_channels / in_channels))  # one block per stage between (channels x2 each)
    halves = halvings(size, last_size)
    if halves > doublings:
        raise ByotError(f"attention exit: {size} px cannot reach {last_size} px in {doublings} stride-2 blocks")
    return AttentionExit(in_channels, out_channels, [2] * halves + [1] * (doublings - halves), num_classes)


# name -> builder(in_channels, out_channels, stage size px, deepest stage size px, num_classes)
EXIT_HEADS: dict[str, Callable[[int, int, int, int, int], nn.Module]] = {
    "bottleneck": _bottleneck,  # Zhang et al., ICCV 2019 (the reference implementation's ScalaNet)
    "attention": _attention,  # Zhang et al., TPAMI 2021
}


def build_exit(head: str, in_channels: int, out_channels: int, size: int, last_size: int,
               num_classes: int) -> nn.Module:
    """The shallow classifier ``head`` for a stage of ``in_channels`` x ``size`` px."""
    if head not in EXIT_HEADS:
        raise ByotError(f"unknown exit head {head!r}; choose one of {', '.join(EXIT_HEADS)}")
    return EXIT_HEADS[head](in_channels, out_channels, size, last_size, num_classes)
