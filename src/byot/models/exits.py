"""Shallow classifiers attached after chosen stages, by name: "bottleneck" (the ICCV 2019 paper's) and
"attention" (the TPAMI 2021 journal version's). Each is built from its stage's output shape and the
deepest stage's (``byot.models.base.StageShape``) and maps the stage's map to (logits, pooled feature) with
the feature as wide as the deepest stage's, which the hint loss compares with the teacher's."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from byot.errors import ByotError
from byot.models.shapes import StageShape


def fp32_logits(fc: nn.Linear, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) pooled feature -> (logits, feature) with the linear layer in fp32 (see ``pooled_logits``)."""
    feature = feature.float()
    if feature.device.type == "meta":
        return fc(feature), feature
    with torch.autocast(feature.device.type, enabled=False):
        return fc(feature), feature


def pooled_logits(fc: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) map -> (logits (B, classes), pooled feature (B, C)), both in fp32 whatever the autocast.

    The classifier is a sliver of the compute, but bf16 logits carry 8 bits of mantissa: ties between
    classes become common and softmax confidences (which early exit thresholds) coarse. So the pooling
    and the linear layer run in fp32.
    """
    return fp32_logits(fc, x.float().mean(dim=(2, 3)))  # (B, C) pooled


class BottleneckExit(nn.Module):
    """1x1 conv -> kxk conv with stride k -> 1x1 conv (each + BN + ReLU), global pool, linear.

    The kxk stride-k convolution brings a stage's map (B, C_in, H, W) down to the deepest stage's
    size, and the 1x1 convolutions bring its channels to the deepest stage's ``out_channels``, so
    the pooled feature is directly comparable with the deepest exit's (the hint loss needs that).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_classes: int,
                 padding: int = 0) -> None:
        super().__init__()
        # the reference's bottleneck ratio (C_last / 4), but no wider than twice the stage: the same for the
        # ResNets, and a head that stays a small part of the network where the deepest stage is very wide
        # (MobileNetV2's 1280 channels would otherwise give its first head 6.5M parameters)
        mid = max(min(out_channels // 4, 2 * in_channels), 1)
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

    depthwise 3x3 (stride s) -> pointwise 1x1 -> BN -> ReLU -> depthwise 3x3 -> pointwise 1x1 to C_out -> BN
    [-> ReLU], as the journal version's shallow classifiers and attention modules use; ``last_relu=False``
    ends at the BN (the attention mask's logits, which a sigmoid then squashes).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, last_relu: bool = True) -> None:
        layers = [
            nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        super().__init__(*layers, *([nn.ReLU(inplace=True)] if last_relu else []))


class AttentionExit(nn.Module):
    """The TPAMI 2021 shallow classifier: a learned sigmoid mask over the stage's map, then a chain of
    SepConv blocks down to the deepest stage's size and channels, global pool, linear.

    The mask is a SepConv of the map at half resolution ending in BN (as the journal's attention module),
    resized back to the map's size and squashed by a sigmoid: values in (0, 1), so it can switch a place off
    as well as keep it. It gates only the exit's input; the backbone runs on unmasked.
    ``legacy_mask`` rebuilds the mask of byot checkpoints written before 0.2 (a ReLU before the sigmoid,
    range [0.5, 1)), so that they still test to the accuracy they were trained to.
    """

    def __init__(self, channels: list[int], strides: list[int], num_classes: int, legacy_mask: bool = False) -> None:
        """``channels``: the map's channels, then each SepConv block's output (the last is the deepest
        stage's); ``strides``: each block's stride (2 while the map is larger than the deepest stage's)."""
        super().__init__()
        self.attention = SepConv(channels[0], channels[0], last_relu=legacy_mask)
        self.body = nn.Sequential(*[SepConv(c_in, c_out, stride)
                                    for c_in, c_out, stride in zip(channels, channels[1:], strides)])
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C_in, H, W) stage output -> (logits (B, classes), feature (B, out_channels))."""
        mask = F.interpolate(self.attention(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return pooled_logits(self.fc, self.body(torch.sigmoid(mask) * x))


class TokenExit(nn.Module):
    """A shallow classifier for a transformer block's (B, N, C) tokens: LayerNorm, pooling as the backbone's
    own head pools (its class token, or the mean of the patch tokens), linear.

    ``attention=True`` is the token version of the attention head: a learned score per token, softmax over
    the tokens, and the scores' weighted mean as the pooled feature (the head learns where to look, as the
    attention head's mask does over a map's positions).
    """

    def __init__(self, channels: int, num_classes: int, pool: str = "token", prefix_tokens: int = 1,
                 attention: bool = False) -> None:
        super().__init__()
        if pool not in ("token", "avg"):
            raise ByotError(f"token exits pool by the class token or the mean of the tokens, not {pool!r}")
        self.pool, self.prefix_tokens = pool, prefix_tokens
        self.norm = nn.LayerNorm(channels)
        self.score = nn.Linear(channels, 1) if attention else None
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, C) tokens -> (logits (B, classes), feature (B, C))."""
        h = self.norm(x)
        if self.score is not None:
            weights = torch.softmax(self.score(h).float(), dim=1)  # (B, N, 1)
            return fp32_logits(self.fc, (weights * h.float()).sum(dim=1))
        if self.pool == "token":
            return fp32_logits(self.fc, h[:, 0])
        return fp32_logits(self.fc, h[:, self.prefix_tokens:].mean(dim=1))


def token_head_builder(head: str, pool: str, prefix_tokens: int) -> Callable[..., nn.Module]:
    """builder(stage shape, deepest shape, num_classes, stages between) of token exits of kind ``head``."""
    if head not in EXIT_HEADS:
        raise ByotError(f"unknown exit head {head!r}; choose one of {', '.join(HEADS)}")
    return lambda shape, last, k, between: TokenExit(shape.channels, k, pool, prefix_tokens, head == "attention")


def halvings(size: int, last_size: int) -> int:
    """How many stride-2 steps (H -> ceil(H / 2)) take ``size`` px down to ``last_size`` px."""
    steps = 0
    while size > last_size:
        size, steps = math.ceil(size / 2), steps + 1
    return steps


def bottleneck_head(shape: StageShape, last: StageShape, num_classes: int, stages_between: int = 1) -> nn.Module:
    """The ICCV 2019 head for a stage of ``shape``: one strided kxk convolution reaches the deepest stage's size."""
    k = max(math.ceil(shape.height / last.height), math.ceil(shape.width / last.width))
    padding = math.ceil((k * last.height - shape.height) / 2)  # floor((H + 2p - k) / k) + 1 == last H
    return BottleneckExit(shape.channels, last.channels, k, num_classes, padding)


def attention_head(shape: StageShape, last: StageShape, num_classes: int, stages_between: int = 1,
                   legacy_mask: bool = False) -> nn.Module:
    """The TPAMI 2021 head for a stage of ``shape``, ``stages_between`` stages before the deepest: one SepConv
    block per stage between (as the journal's), more where the map must halve more often than that; the
    channels grow geometrically from the stage's to the deepest's, so a family whose channels do not double
    (VGG's last blocks, MobileNetV2's 1280) gets a chain all the same. For the ResNets each block doubles."""
    halves = max(halvings(shape.height, last.height), halvings(shape.width, last.width))
    blocks = max(halves, stages_between, 1)
    ratio = last.channels / shape.channels
    channels = [round(shape.channels * ratio ** (j / blocks)) for j in range(blocks + 1)]
    return AttentionExit(channels, [2] * halves + [1] * (blocks - halves), num_classes, legacy_mask)


# name -> builder(stage shape, deepest stage shape, num_classes, stages between): the shallow classifiers
EXIT_HEADS: dict[str, Callable[..., nn.Module]] = {
    "bottleneck": bottleneck_head,  # Zhang et al., ICCV 2019 (the reference implementation's ScalaNet)
    "attention": attention_head,  # Zhang et al., TPAMI 2021
}
HEADS = tuple(EXIT_HEADS)  # the --head choices


class ChannelsFirst(nn.Module):
    """A map head for a stage that hands on (B, H, W, C) maps: the map permuted to (B, C, H, W) first."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(x.permute(0, 3, 1, 2))


def head_builder(head: str, legacy_attention: bool = False) -> Callable[..., nn.Module]:
    """builder(stage shape, deepest shape, num_classes, stages between) of the shallow classifier ``head``;
    a stage of channels-last maps gets the head behind a permute (``ChannelsFirst``)."""
    if head not in EXIT_HEADS:
        raise ByotError(f"unknown exit head {head!r}; choose one of {', '.join(HEADS)}")
    if head == "attention":
        build = lambda shape, last, k, between: attention_head(shape, last, k, between, legacy_attention)
    else:
        build = EXIT_HEADS[head]

    def build_any(shape: StageShape, last: StageShape, k: int, between: int) -> nn.Module:
        if shape.layout == "nhwc":
            first = StageShape(shape.channels, shape.height, shape.width)
            return ChannelsFirst(build(first, StageShape(last.channels, last.height, last.width), k, between))
        return build(shape, last, k, between)

    return build_any


def deepest_head(last: StageShape, num_classes: int) -> nn.Module:
    return BackboneHead(last.channels, num_classes)
