"""``create_model``: a registered architecture built by name, with local pretrained weights if asked."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from byot.errors import ByotError
from byot.models.base import MultiExitNet
from byot.models.pretrained import describe_load, load_pretrained
from byot.models.registry import build_from_spec, model_spec

logger = logging.getLogger("byot")


def create_model(name: str, num_classes: int = 100, image_size: int = 32, exits: bool | Sequence[int] = True,
                 head: str = "bottleneck", legacy_attention: bool = False, pretrained: str | Path | None = None,
                 **options: Any) -> MultiExitNet:
    """Build the registered architecture ``name``: a model mapping (B, 3, image_size, image_size) normalised
    images to ``MultiExitOutput`` (each exit's (B, num_classes) logits and pooled features, shallow to deep).

    ``exits``: True (shallow heads after the family's natural stages), False (the plain backbone: only its
    own head) or the stage numbers that get a shallow head. ``image_size`` (px) sizes the heads (and picks
    the stem where a family has ``stem="auto"``). ``options`` are the family's (``family_options(name)``):
    e.g. ``width`` and ``stem`` for the ResNets, ``depth`` and ``widen`` for the WideResNets.

    ``pretrained``: None keeps the fresh initialisation; a path loads a local state dict (torch or
    safetensors) into the backbone, as ``byot train --pretrained PATH`` does: torchvision ResNet weights into
    the ResNet family (width 64), the library's own weights into ``timm/NAME`` and ``tv/NAME``; "imagenet"
    fetches the library's pretrained weights. The classifier and the shallow exits start fresh where their
    shapes differ; a file that does not fit the backbone is a ByotError. A library model's weights expect its
    own normalisation: ``model.normalization`` (mean, std) where it has one.
    """
    if num_classes < 1 or image_size < 1:
        raise ByotError(f"num_classes and image_size must be positive (got {num_classes}, {image_size})")
    model = build_from_spec(name, model_spec(name, options), exits, num_classes, image_size, head, legacy_attention)
    if pretrained is not None:
        logger.info("%s", describe_load(load_pretrained(model, pretrained)))
    return model
