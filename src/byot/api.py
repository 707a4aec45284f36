"""byot in one's own code: a trained checkpoint loaded as a ready model, and every exit scored on a plain
PyTorch DataLoader.

    model, info = byot.load("runs/multi_resnet18_kd/model_best.pth.tar")
    out = model(images)  # images: (B, 3, S, S) float, normalised with info.mean / info.std
    scores = byot.evaluate_exits(model, loader)  # loader of (images, labels), images normalised
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from byot.config import TrainConfig
from byot.deploy.policy import ExitPolicy
from byot.deploy.run import fitted_for, resolve_policy
from byot.errors import ByotError
from byot.models import MultiExitNet
from byot.training.build import build_trained, weights_name
from byot.training.evaluate import accuracies, exit_hits
from byot.training.resolve import resolve_config
from byot.training.runtime import resolve_device

log = logging.getLogger("byot")


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about its model: what to feed it and what its outputs mean."""

    path: str  # the checkpoint file
    arch: str  # the registered architecture (``byot.list_models()``)
    classes: tuple[str, ...]  # class names; logit i is classes[i]
    image_size: int  # px: the side of the square images it was trained on
    mean: tuple[float, ...]  # per channel: inputs are (images / 255 - mean) / std
    std: tuple[float, ...]
    exits: tuple[int, ...]  # exit numbers, shallow to deep: the stage each exit reads; the last is the deepest
    policy: ExitPolicy | None  # the fitted early-exit policy and calibration (temperatures); None: none fitted
    config: TrainConfig  # the run configuration the model was trained with
    weights: str  # "raw" (the trained weights) or "ema" (their running average)
    epoch: int  # epochs trained
    best_top1: float  # percent: the best top-1 the run recorded while training

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Loaded:
    """A trained model, in eval mode on its device, and its ``ModelInfo``; unpacks as ``model, info``."""

    model: MultiExitNet  # (B, 3, S, S) normalised images -> MultiExitOutput (logits (B, K) per exit)
    info: ModelInfo

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.info))


def load(path: str | Path, device: str | torch.device = "cpu", ema: bool = False) -> Loaded:
    """The model a byot checkpoint holds (any byot run's, or the reference script's), rebuilt from the
    configuration saved inside it, in eval mode on ``device``, with its ``ModelInfo``.

    ``ema``: the weight average ``byot train --ema`` saved instead of the trained weights. The model takes
    (B, 3, info.image_size, info.image_size) images normalised with ``info.mean`` and ``info.std`` and
    returns a ``MultiExitOutput``: ``logits``, one (B, K) tensor per exit, shallow to deep.
    """
    cfg, checkpoint = resolve_config({"resume": str(path)})
    model, runtime = build_trained(cfg, checkpoint, resolve_device(str(device)), ema)
    info = ModelInfo(
        path=str(Path(path).expanduser()), arch=cfg.arch, classes=tuple(checkpoint["classes"]),
        image_size=checkpoint["image_size"], mean=tuple(runtime.mean.tolist()), std=tuple(runtime.std.tolist()),
        exits=tuple(model.exit_stages), policy=_stored_policy(cfg, checkpoint, model.num_exits, ema), config=cfg,
        weights=weights_name(ema), epoch=checkpoint["epoch"], best_top1=float(checkpoint["best_top1"]))
    return Loaded(model, info)


def _stored_policy(cfg: TrainConfig, checkpoint: dict, num_exits: int, ema: bool) -> ExitPolicy | None:
    """The policy ``byot calibrate`` / ``byot early-exit`` fitted for the checkpoint, or None; a policy that
    cannot be applied (fitted on another checkpoint, damaged) is named in a warning, not an error: the model
    itself is fine."""
    try:
        fitted = fitted_for(cfg, checkpoint)
        if not fitted.stale and not fitted.entries:
            return None
        return resolve_policy(fitted, num_exits, None, None, use_calibration=True, ema=ema)
    except ByotError as e:
        log.warning("the fitted exit policy is not loaded: %s", e)
        return None


@dataclass(frozen=True)
class ExitScores:
    """Accuracy in percent of each exit and of the ensemble (the mean of the exits' softmax)."""

    num_images: int
    top1: dict[int, float]  # exit number -> top-1 accuracy
    top5: dict[int, float]  # exit number -> top-5 accuracy (top-K where there are K < 5 classes)
    ensemble_top1: float
    ensemble_top5: float


@torch.inference_mode()
def evaluate_exits(model: nn.Module, loader: Iterable[Any], device: str | torch.device | None = None) -> ExitScores:
    """Score every exit of ``model`` on ``loader``: batches of (images, labels), images a float
    (B, C, H, W) tensor already normalised as the model expects, labels (B,) class indices.

    ``model``: anything returning ``MultiExitOutput`` (a byot model, ``attach_exits``'s); it runs in eval
    mode, on ``device`` (None: where its parameters are), and is put back in the mode it was in.
    """
    was_training = model.training
    target = torch.device(device) if device is not None else _device_of(model)
    model.eval()
    correct: torch.Tensor | None = None  # (E + 1, 2) top-1/top-5 hits: each exit, then the ensemble
    seen = 0
    try:
        for images, labels in loader:
            labels = labels.to(target)
            logits = model(images.to(target)).logits
            hits = exit_hits(logits, labels)
            correct = hits if correct is None else correct + hits
            seen += len(labels)
    finally:
        model.train(was_training)
    if correct is None or seen == 0:
        raise ByotError("evaluate_exits: the loader gave no images")
    exit_ids = list(getattr(model, "exit_stages", range(1, len(correct))))
    result = accuracies(correct, seen, exit_ids)
    return ExitScores(seen, {e["exit"]: e["top1"] for e in result["exits"]},
                      {e["exit"]: e["top5"] for e in result["exits"]},
                      result["ensemble"]["top1"], result["ensemble"]["top5"])


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
