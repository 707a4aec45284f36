"""Multi-exit PyramidNet (Han et al. 2017, basic blocks, the form of dyhan0920/PyramidNet-PyTorch): a 3x3 stem
(conv + BN, no ReLU) of ``width`` channels, three stages of (depth - 2) / 6 blocks whose channels grow by
alpha / (3n) per block (additive widening), BN-conv-BN-ReLU-conv-BN blocks with a zero-padded identity
shortcut (average-pooled where the block downsamples), and BN-ReLU at the end of the last stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from byot.errors import ByotError
from byot.models.base import MultiExitNet, check_blocks
from byot.models.registry import ExitOptions, Family, register_model


class PyramidBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.pad = planes - in_planes  # zero channels appended to the shortcut
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.relu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))  # (B, C_in + pad, H, W)


@dataclass(frozen=True)
class PyramidNetSpec:
    depth: int = 110  # 6n + 2: n blocks per stage
    alpha: float = 48  # channels added over the whole network
    width: int = 16  # the stem's channels

    def __post_init__(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ByotError(f"PyramidNet depth must be 6n + 2 (8, 14, ..., 110, ...), not {self.depth}")
        check_blocks("PyramidNet", 3 * (self.depth - 2) // 6, f"depth {self.depth}")
        if not 0 <= self.alpha <= 4096 or not 1 <= self.width <= 1024:
            raise ByotError(f"PyramidNet alpha must lie in [0, 4096] and width in [1, 1024] (got {self.alpha}, "
                            f"{self.width})")


class MultiExitPyramidNet(MultiExitNet):
    def __init__(self, spec: PyramidNetSpec, common: ExitOptions) -> None:
        super().__init__()
        n = (spec.depth - 2) // 6
        step = spec.alpha / (3 * n)
        self.stem = nn.Sequential(nn.Conv2d(3, spec.width, 3, 1, 1, bias=False), nn.BatchNorm2d(spec.width))
        channels, in_planes, stages = float(spec.width), spec.width, []
        for i in range(3):
            blocks: list[nn.Module] = []
            for b in range(n):
                channels += step
                blocks.append(PyramidBlock(in_planes, round(channels), 2 if i > 0 and b == 0 else 1))
                in_planes = round(channels)
            if i == 2:
                blocks += [nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*blocks))
        self.finish(stages, common)


PYRAMIDNET = Family("pyramidnet", PyramidNetSpec, MultiExitPyramidNet,
                    "PyramidNet, additive widening, basic blocks, zero-padded shortcut")

register_model("multi_pyramidnet110_48_kd", PYRAMIDNET, depth=110, alpha=48)
register_model("multi_pyramidnet110_84_kd", PYRAMIDNET, depth=110, alpha=84)
