"""Multi-exit WideResNet-depth-k (Zagoruyko & Komodakis 2016, the form of xternalz/WideResNet-pytorch):
a 3x3 stem of ``width`` channels, three stages of (depth - 4) / 6 pre-activation blocks (BN-ReLU-conv x2, optional
dropout between) at width x k x (1, 2, 4) channels, and BN-ReLU at the end of the last stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from byot.errors import ByotError
from byot.models.base import MultiExitNet, check_blocks
from byot.models.registry import ExitOptions, Family, register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3; a 1x1 projection (of the activated input) when the
    shape changes, else the identity."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None if in_planes == planes and stride == 1 else nn.Conv2d(in_planes, planes, 1, stride,
                                                                                      bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        out = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(act)))))
        return out + (x if self.shortcut is None else self.shortcut(act))


@dataclass(frozen=True)
class WideResNetSpec:
    depth: int = 16  # 6n + 4: n blocks per stage
    widen: int = 4  # k: the stages have width x k x (1, 2, 4) channels
    width: int = 16  # the stem's channels
    dropout: float = 0.0  # between the two convolutions of every block (the paper's 0.3 on CIFAR)

    def __post_init__(self) -> None:
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ByotError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, 40, ...), not {self.depth}")
        check_blocks("WideResNet", 3 * (self.depth - 4) // 6, f"depth {self.depth}")
        if not 1 <= self.widen <= 64 or not 1 <= self.width <= 1024:
            raise ByotError(f"WideResNet widen must lie in [1, 64] and width in [1, 1024] (got {self.widen}, "
                            f"{self.width})")
        if not 0 <= self.dropout < 1:
            raise ByotError(f"WideResNet dropout must lie in [0, 1), not {self.dropout}")


class MultiExitWideResNet(MultiExitNet):
    def __init__(self, spec: WideResNetSpec, common: ExitOptions) -> None:
        super().__init__()
        n = (spec.depth - 4) // 6
        self.stem = nn.Conv2d(3, spec.width, 3, 1, 1, bias=False)
        in_planes, stages = spec.width, []
        for i in range(3):
            planes = spec.width * spec.widen * 2**i
            blocks: list[nn.Module] = []
            for b in range(n):
                blocks.append(PreActBlock(in_planes, planes, (1 if i == 0 else 2) if b == 0 else 1, spec.dropout))
                in_planes = planes
            if i == 2:  # pre-activation: the last stage ends with the BN-ReLU its blocks leave out
                blocks += [nn.BatchNorm2d(planes), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*blocks))
        self.finish(stages, common)


WIDE_RESNET = Family("wide_resnet", WideResNetSpec, MultiExitWideResNet,
                     "WideResNet-depth-k, pre-activation, CIFAR form")

register_model("multi_wrn16_4_kd", WIDE_RESNET, depth=16, widen=4)
register_model("multi_wrn16_8_kd", WIDE_RESNET, depth=16, widen=8)
register_model("multi_wrn28_10_kd", WIDE_RESNET, depth=28, widen=10)
register_model("multi_wrn40_4_kd", WIDE_RESNET, depth=40, widen=4)
