"""Multi-exit ResNeXt for CIFAR (Xie et al. 2017, the form of prlz77/ResNeXt.pytorch): a 3x3 stem of ``width``
channels and three stages of (depth - 2) / 9 bottlenecks whose 3x3 convolution has ``cardinality`` groups of
``bottleneck_width`` x 2^stage channels; the stages output 4 x width x (1, 2, 4) channels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from byot.errors import ByotError
from byot.models.base import MAX_GROUPS, MultiExitNet, check_blocks
from byot.models.registry import ExitOptions, Family, register_model


class ResNeXtBlock(nn.Module):
    """1x1 reduce -> grouped 3x3 (stride) -> 1x1 expand (each + BN, ReLU but the last), + shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int, inner: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_planes, inner, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(inner)
        self.conv_conv = nn.Conv2d(inner, inner, 3, stride, 1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(inner)
        self.conv_expand = nn.Conv2d(inner, planes, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if in_planes != planes or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn_reduce(self.conv_reduce(x)))
        out = self.relu(self.bn(self.conv_conv(out)))
        out = self.bn_expand(self.conv_expand(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


@dataclass(frozen=True)
class ResNeXtSpec:
    depth: int = 29  # 9n + 2: n blocks per stage
    cardinality: int = 8  # groups of the 3x3 convolutions
    bottleneck_width: int = 64  # d: channels per group in stage 1 (doubling per stage)
    width: int = 64  # the stem's channels; the stages output 4 x width x (1, 2, 4)

    def __post_init__(self) -> None:
        if self.depth < 11 or (self.depth - 2) % 9:
            raise ByotError(f"ResNeXt depth must be 9n + 2 (11, 20, 29, ...), not {self.depth}")
        check_blocks("ResNeXt", 3 * (self.depth - 2) // 9, f"depth {self.depth}")
        if max(self.cardinality, self.bottleneck_width) > MAX_GROUPS:
            raise ByotError(f"ResNeXt cardinality and bottleneck_width must be at most {MAX_GROUPS} (got "
                            f"{self.cardinality}, {self.bottleneck_width})")
        if min(self.cardinality, self.bottleneck_width, self.width) < 1 or self.width > 1024:
            raise ByotError(f"ResNeXt cardinality, bottleneck_width and width must be positive, width at most 1024 "
                            f"(got {self.cardinality}, {self.bottleneck_width}, {self.width})")


class MultiExitResNeXt(MultiExitNet):
    def __init__(self, spec: ResNeXtSpec, common: ExitOptions) -> None:
        super().__init__()
        n = (spec.depth - 2) // 9
        self.stem = nn.Sequential(nn.Conv2d(3, spec.width, 3, 1, 1, bias=False), nn.BatchNorm2d(spec.width),
                                  nn.ReLU(inplace=True))
        in_planes, stages = spec.width, []
        for i in range(3):
            planes, inner = 4 * spec.width * 2**i, spec.cardinality * spec.bottleneck_width * 2**i
            blocks = []
            for b in range(n):
                blocks.append(ResNeXtBlock(in_planes, planes, (1 if i == 0 else 2) if b == 0 else 1,
                                           spec.cardinality, inner))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.finish(stages, common)


RESNEXT = Family("resnext", ResNeXtSpec, MultiExitResNeXt, "ResNeXt for CIFAR (grouped 3x3 bottlenecks)")

register_model("multi_resnext29_8x64d_kd", RESNEXT, depth=29, cardinality=8, bottleneck_width=64)
register_model("multi_resnext29_16x64d_kd", RESNEXT, depth=29, cardinality=16, bottleneck_width=64)
