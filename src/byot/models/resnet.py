"""Multi-exit ResNets: a ResNet cut into 4 stages, a shallow classifier after stages 1-3 and the
backbone's own head as exit 4. Reads top to bottom: blocks, stems, sizes, network, registry entries."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from byot.errors import ByotError
from byot.models.exits import BackboneHead, build_exit
from byot.models.registry import register_model

STEMS = ("auto", "cifar", "imagenet")
IMAGENET_STEM_MIN_SIZE = 64  # px; from here on the 7x7/2 + max-pool stem keeps memory 16x lower


class MultiExitOutput(NamedTuple):
    """What every byot model returns; lists run shallow to deep, the deepest (the teacher) last."""

    logits: list[torch.Tensor]  # each (B, num_classes)
    features: list[torch.Tensor]  # each (B, C_last): pooled features the hint loss compares


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


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


def stage_sizes(stem: str, image_size: int) -> list[int]:
    """Side length (px) of each stage's output map for a square input of ``image_size`` px.

    Every stride-2 layer here (3x3 pad 1, 1x1, 7x7 pad 3, max-pool 3 pad 1) maps H to ceil(H / 2).
    """
    size = image_size if stem == "cifar" else math.ceil(math.ceil(image_size / 2) / 2)
    sizes = [size]
    for _ in range(3):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


@dataclass(frozen=True)
class ResNetSpec:
    """Everything that fixes a multi-exit ResNet's weights' shapes (saved in every checkpoint)."""

    block: type[nn.Module]
    layers: tuple[int, int, int, int]  # residual blocks per stage
    num_classes: int = 100
    width: int = 64  # channels of stage 1 before expansion; stages use width * (1, 2, 4, 8)
    stem: str = "cifar"  # resolved: "cifar" or "imagenet"
    image_size: int = 32  # px; sizes the exits' stride-k convolutions
    exits: bool = True  # False: the plain backbone (only its own head), the baseline
    head: str = "bottleneck"  # shallow classifiers: "bottleneck" (ICCV 2019) or "attention" (TPAMI 2021)


class MultiExitResNet(nn.Module):
    """A ResNet whose forward returns every exit's logits and pooled features, shallow to deep."""

    def __init__(self, spec: ResNetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stem = _make_stem(spec.stem, spec.width)
        expansion = spec.block.expansion  # type: ignore[attr-defined]
        channels = [spec.width * 2**i * expansion for i in range(4)]
        in_planes = spec.width
        stages = []
        for i, blocks in enumerate(spec.layers):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(blocks):
                layers.append(spec.block(in_planes, spec.width * 2**i, stride if b == 0 else 1))
                in_planes = channels[i]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        sizes = stage_sizes(spec.stem, spec.image_size)
        if spec.exits:
            heads: list[nn.Module] = []
            for i in range(3):
                heads.append(build_exit(spec.head, channels[i], channels[3], sizes[i], sizes[3], spec.num_classes))
        else:
            heads = []
        heads.append(BackboneHead(channels[3], spec.num_classes))
        self.heads = nn.ModuleList(heads)
        self.exit_stages = [1, 2, 3, 4] if spec.exits else [4]  # the stage each head reads
        self.grad_checkpoint = False  # recompute each stage's activations in backward (saves memory)
        _init_weights(self)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor, depth: int = 4) -> MultiExitOutput:
        """x: (B, 3, H, W) normalised images -> every exit's logits and features.

        ``depth`` (1-4) stops after that stage: only the exits up to it are computed (the compute
        an early-exit deployment pays for).
        """
        logits: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        x = self.stem(x)
        for stage_index, stage in enumerate(self.stages[:depth], start=1):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)  # (B, C_stage, H_stage, W_stage)
            else:
                x = stage(x)  # (B, C_stage, H_stage, W_stage)
            if stage_index in self.exit_stages:
                out, feature = self.heads[self.exit_stages.index(stage_index)](x)
                logits.append(out)
                features.append(feature)
        return MultiExitOutput(logits, features)


    def forward_exit(self, x: torch.Tensor, exit_number: int) -> torch.Tensor:
        """x: (B, 3, H, W) normalised images -> (B, num_classes) logits of one exit, running only the stem,
        the stages up to it and its own head (what a deployment of that exit alone computes)."""
        if exit_number not in self.exit_stages:
            raise ByotError(f"exit {exit_number}: this model's exits are {self.exit_stages}")
        x = self.stem(x)
        for stage in self.stages[:exit_number]:
            x = stage(x)  # (B, C_stage, H_stage, W_stage)
        return self.heads[self.exit_stages.index(exit_number)](x)[0]


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _build(
    block: type[nn.Module],
    layers: tuple[int, int, int, int],
    num_classes: int = 100,
    width: int = 64,
    stem: str = "auto",
    image_size: int = 32,
    exits: bool = True,
    head: str = "bottleneck",
) -> MultiExitResNet:
    if width < 1 or num_classes < 1 or image_size < 1:
        raise ByotError(f"width, num_classes and image_size must be positive (got {width}, {num_classes}, {image_size})")
    spec = ResNetSpec(block, layers, num_classes, width, resolve_stem(stem, image_size), image_size, exits, head)
    return MultiExitResNet(spec)


@register_model
def multi_resnet18_kd(**options) -> MultiExitResNet:
    return _build(BasicBlock, (2, 2, 2, 2), **options)


@register_model
def multi_resnet34_kd(**options) -> MultiExitResNet:
    return _build(BasicBlock, (3, 4, 6, 3), **options)


@register_model
def multi_resnet50_kd(**options) -> MultiExitResNet:
    return _build(Bottleneck, (3, 4, 6, 3), **options)


@register_model
def multi_resnet101_kd(**options) -> MultiExitResNet:
    return _build(Bottleneck, (3, 4, 23, 3), **options)


@register_model
def multi_resnet152_kd(**options) -> MultiExitResNet:
    return _build(Bottleneck, (3, 8, 36, 3), **options)
