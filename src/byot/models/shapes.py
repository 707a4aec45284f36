"""The small types the multi-exit contract and the families share: a stage's output shape and the options
every family takes besides its own. They sit below base.py, exits.py and registry.py, which all read them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StageShape:
    """A stage's output for one image: a (channels, height, width) map (``layout="nhwc"`` where the stage
    hands it on channels-last, as Swin's do), or for a transformer's (B, N, C) tokens ``layout="tokens"``
    with height = N tokens and width 1."""

    channels: int
    height: int
    width: int
    layout: str = "nchw"  # "nchw", "nhwc" or "tokens"


def output_shape(x: torch.Tensor, layout: str = "nchw") -> StageShape:
    """The StageShape of a stage's (1, C, H, W) map, (1, H, W, C) map (``layout="nhwc"``) or (1, N, C) tokens."""
    if x.dim() == 3:
        return StageShape(x.shape[2], x.shape[1], 1, "tokens")
    if layout == "nhwc":
        return StageShape(x.shape[3], x.shape[1], x.shape[2], "nhwc")
    return StageShape(x.shape[1], x.shape[2], x.shape[3])



@dataclass(frozen=True)
class ExitOptions:
    """What every family takes besides its own spec: the classes, the input size the heads are sized for,
    where the shallow exits go and which kind they are."""

    num_classes: int = 100
    image_size: int = 32  # px; sizes the heads (a dry forward of the trunk at this size)
    exits: bool | tuple[int, ...] = True  # True: the family's natural stages; False: the plain backbone
    head: str = "bottleneck"  # shallow classifiers: "bottleneck" (ICCV 2019) or "attention" (TPAMI 2021)
    legacy_attention: bool = False  # attention masks as byot wrote them before 0.2 (old checkpoints only)


