"""Multi-exit ResNets (He et al. 2016; torchvision's v1.5 blocks, also its ResNeXt and wide variants): a stem,
stages of residual blocks (four, unless ``layers`` says otherwise), a shallow classifier after every stage but
the last (by default) and the backbone's own head after the last (exit 4).
Reads top to bottom: blocks, stems, spec, network, registry entries."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from byot.errors import ByotError
from byot.models.base import MAX_GROUPS, MultiExitNet, check_blocks
from byot.models.registry import ExitOptions, Family, register_model

STEMS = ("auto", "cifar", "imagenet")  # the --stem choices
IMAGENET_STEM_MIN_SIZE = 64  # px; from here on the 7x7/2 + max-pool stem keeps memory 16x lower


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here: v1.5; ``groups`` > 1: ResNeXt) -> 1x1 x4, as torchvision's."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        mid = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


def resolve_stem(stem: str, image_size: int) -> str:
    """"auto" -> "cifar" (3x3, stride 1) below IMAGENET_STEM_MIN_SIZE px, else "imagenet"."""
    if stem not in STEMS:
        raise ByotError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if stem != "auto":
        return stem
    return "imagenet" if image_size >= IMAGENET_STEM_MIN_SIZE else "cifar"


def _make_stem(stem: str, width: int) -> nn.Sequential:
    if stem == "cifar":
        return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )


@dataclass(frozen=True)
class ResNetSpec:
    """A ResNet's options (saved in every checkpoint). ``width``: channels of stage 1 before expansion; the
    stages use width x (1, 2, 4, 8). ``groups`` and ``width_per_group`` widen or group the bottlenecks'
    3x3 convolutions (torchvision's resnext50_32x4d: 32 and 4; wide_resnet50_2: 1 and 128)."""

    block: str = "basic"  # "basic" or "bottleneck"
    layers: tuple[int, ...] = (2, 2, 2, 2)  # residual blocks per stage
    width: int = 64
    stem: str = "auto"  # "cifar" (3x3/1), "imagenet" (7x7/2 + max-pool) or "auto" (from the image size)
    groups: int = 1
    width_per_group: int = 64

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ByotError(f"ResNet block must be one of {', '.join(BLOCKS)}, not {self.block!r}")
        if not self.layers or min(self.layers) < 1:
            raise ByotError(f"ResNet layers must be positive block counts per stage, not {self.layers}")
        check_blocks("ResNet", sum(self.layers), f"layers {list(self.layers)}")
        if max(self.groups, self.width_per_group) > MAX_GROUPS:
            raise ByotError(f"ResNet groups and width_per_group must be at most {MAX_GROUPS} (got {self.groups}, "
                            f"{self.width_per_group})")
        if not 1 <= self.width <= 1024 or self.groups < 1 or self.width_per_group < 1:
            raise ByotError(f"ResNet width must lie in [1, 1024] and groups, width_per_group be positive (got "
                            f"{self.width}, {self.groups}, {self.width_per_group})")
        if self.block == "basic" and (self.groups, self.width_per_group) != (1, 64):
            raise ByotError("groups and width_per_group apply to bottleneck blocks only")
        resolve_stem(self.stem, 32)  # the name is checked here; the image size picks "auto"'s meaning


class MultiExitResNet(MultiExitNet):
    """A ResNet whose forward returns every exit's logits and pooled features, shallow to deep."""

    def __init__(self, spec: ResNetSpec, common: ExitOptions) -> None:
        super().__init__()
        block = BLOCKS[spec.block]
        self.stem_kind = resolve_stem(spec.stem, common.image_size)
        self.stem = _make_stem(self.stem_kind, spec.width)
        in_planes, stages = spec.width, []
        for i, blocks in enumerate(spec.layers):
            planes = spec.width * 2**i
            layers = []
            for b in range(blocks):
                layers.append(block(in_planes, planes, (1 if i == 0 else 2) if b == 0 else 1, spec.groups,
                                    spec.width_per_group))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.finish(stages, common)


RESNET = Family("resnet", ResNetSpec, MultiExitResNet,
                "ResNet (He et al. 2016), torchvision's blocks; cifar stem (3x3/1) below 64 px, imagenet stem above")

register_model("multi_resnet18_kd", RESNET, block="basic", layers=(2, 2, 2, 2))
register_model("multi_resnet34_kd", RESNET, block="basic", layers=(3, 4, 6, 3))
register_model("multi_resnet50_kd", RESNET, block="bottleneck", layers=(3, 4, 6, 3))
register_model("multi_resnet101_kd", RESNET, block="bottleneck", layers=(3, 4, 23, 3))
register_model("multi_resnet152_kd", RESNET, block="bottleneck", layers=(3, 8, 36, 3))
register_model("multi_resnext50_32x4d_kd", RESNET, block="bottleneck", layers=(3, 4, 6, 3), groups=32,
               width_per_group=4)
register_model("multi_wide_resnet50_2_kd", RESNET, block="bottleneck", layers=(3, 4, 6, 3), width_per_group=128)
