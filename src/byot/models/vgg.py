"""Multi-exit VGG with BatchNorm (Simonyan & Zisserman 2015; the CIFAR form of kuangliu/pytorch-cifar and
torchvision's ``vgg*_bn`` features): five blocks of 3x3 convolutions (with bias) + BN + ReLU, each ending in a
2x2 max-pool; the classifier is global pooling + one linear layer. The stages are the five pooling blocks, and
the shallow exits go after blocks 1-4 by default."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from byot.errors import ByotError
from byot.models.base import MultiExitNet
from byot.models.registry import ExitOptions, Family, register_model

# convolutions per pooling block; the blocks have 1, 2, 4, 8, 8 x width channels
CONVS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
MULTIPLIERS = (1, 2, 4, 8, 8)


@dataclass(frozen=True)
class VGGSpec:
    depth: int = 16  # 11, 13, 16 or 19 weight layers
    width: int = 64  # channels of the first block; the blocks use width x (1, 2, 4, 8, 8)

    def __post_init__(self) -> None:
        if self.depth not in CONVS:
            raise ByotError(f"VGG depth must be one of {', '.join(map(str, CONVS))}, not {self.depth}")
        if not 1 <= self.width <= 1024:
            raise ByotError(f"VGG width must lie in [1, 1024], not {self.width}")


class MultiExitVGG(MultiExitNet):
    def __init__(self, spec: VGGSpec, common: ExitOptions) -> None:
        super().__init__()
        self.stem = nn.Identity()  # VGG's first block is its stem
        in_channels, stages = 3, []
        for convs, multiplier in zip(CONVS[spec.depth], MULTIPLIERS):
            out = spec.width * multiplier
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers += [nn.Conv2d(in_channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                in_channels = out
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # ceil: odd sizes keep their last row
            stages.append(nn.Sequential(*layers))
        self.finish(stages, common)


VGG = Family("vgg", VGGSpec, MultiExitVGG, "VGG with BatchNorm, CIFAR form (global pool + one linear layer)")

for _depth in CONVS:
    register_model(f"multi_vgg{_depth}_kd", VGG, depth=_depth)
