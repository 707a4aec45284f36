"""Multi-exit MobileNetV2 (Sandler et al. 2018, torchvision's modules): a 3x3 stem, 17 inverted residual blocks
(1x1 expand, 3x3 depthwise, 1x1 linear projection; ReLU6) and a 1x1 convolution to 1280 channels. With the cifar
stem (below 64 px, or ``stem="cifar"``) the stem and the second group keep stride 1 (as the CIFAR versions do),
so a 32 px image ends at 4 px. The stages are the four resolutions after the stem: 16-24, 32, 64-96 and
160-320-1280 channels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from byot.errors import ByotError
from byot.models.base import MultiExitNet
from byot.models.registry import ExitOptions, Family, register_model
from byot.models.resnet import resolve_stem

# (expansion t, channels c, blocks n, stride s) as in the paper's table 2; the stage each group belongs to
GROUPS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STAGE_OF_GROUP = (0, 0, 1, 2, 2, 3, 3)
LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's rounding of scaled channels: to a multiple of 8, never below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = round(in_channels * expansion)
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


@dataclass(frozen=True)
class MobileNetV2Spec:
    width_mult: float = 1.0  # scales every layer's channels (the last 1x1 only upwards, as torchvision)
    stem: str = "auto"  # "cifar" (stride 1 stem and second group), "imagenet" (the paper's strides), "auto"

    def __post_init__(self) -> None:
        if not 0.05 <= self.width_mult <= 8:
            raise ByotError(f"MobileNetV2 width_mult must lie in [0.05, 8], not {self.width_mult}")
        resolve_stem(self.stem, 32)


class MultiExitMobileNetV2(MultiExitNet):
    def __init__(self, spec: MobileNetV2Spec, common: ExitOptions) -> None:
        super().__init__()
        cifar = resolve_stem(spec.stem, common.image_size) == "cifar"
        self.stem_kind = "cifar" if cifar else "imagenet"
        in_channels = make_divisible(32 * spec.width_mult)
        self.stem = conv_bn_relu6(3, in_channels, 3, 1 if cifar else 2)
        stages: list[list[nn.Module]] = [[], [], [], []]
        for g, (t, c, n, s) in enumerate(GROUPS):
            out = make_divisible(c * spec.width_mult)
            stride = 1 if cifar and g == 1 else s
            for b in range(n):
                stages[STAGE_OF_GROUP[g]].append(InvertedResidual(in_channels, out, stride if b == 0 else 1, t))
                in_channels = out
        last = make_divisible(LAST_CHANNELS * max(1.0, spec.width_mult))
        stages[3].append(conv_bn_relu6(in_channels, last, 1))
        self.finish([nn.Sequential(*blocks) for blocks in stages], common, init=_init_like_torchvision)


def _init_like_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


MOBILENETV2 = Family("mobilenetv2", MobileNetV2Spec, MultiExitMobileNetV2,
                     "MobileNetV2, torchvision's blocks; CIFAR strides below 64 px")

register_model("multi_mobilenetv2_kd", MOBILENETV2)
