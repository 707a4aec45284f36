"""``byot predict``: image files in, class, probability and answering exit out, through the real cascade."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from byot.config import TrainConfig
from byot.data.folder import IMAGE_EXTENSIONS, resize_center_crop, to_rgb, to_uint8_tensor
from byot.deploy.cascade import EarlyExitNet
from byot.deploy.run import fitted_for, resize_ratio, resolve_policy
from byot.errors import ByotError
from byot.training.build import build_trained
from byot.training.runtime import resolve_device

log = logging.getLogger("byot")


def find_images(paths: Sequence[str]) -> list[Path]:
    """Files as given (in order), folders searched recursively for image files (sorted, hidden ones skipped)."""
    found: list[Path] = []
    for text in paths:
        if not text.strip():  # Path("") is the working directory: an empty argument is a mistake, not "here"
            raise ByotError("an empty PATH was given; name image files or folders (. for this folder)")
        path = Path(text).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        else:
            raise ByotError(f"{text} is neither an image file nor a folder")
    if not found:
        raise ByotError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(paths)}")
    return found


def read_image(path: Path, size: int, ratio: float) -> torch.Tensor:
    """One file -> uint8 (3, size, size), as the test split is prepared: RGB, resize, centre crop."""
    try:
        with Image.open(path) as raw:
            image = to_rgb(raw)
    except Exception as e:  # truncated, corrupt or not an image at all
        raise ByotError(f"cannot read image {path}: {str(e).strip() or type(e).__name__}") from e
    return to_uint8_tensor(resize_center_crop(image, size, ratio))


def predict_paths(cfg: TrainConfig, checkpoint: dict, paths: Sequence[str], thresholds: Sequence[float] | None,
                  final: str | None, use_calibration: bool = True,
                  ema: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """([{"path", "class", "probability", "exit"}] per readable image, [one line per unreadable file]), through
    the policy of --threshold or the checkpoint's policy file; ``ema``: with the weight average the checkpoint holds instead of its weights."""
    device = resolve_device(cfg.device)
    model, runtime = build_trained(cfg, checkpoint, device, ema)
    policy = resolve_policy(fitted_for(cfg, checkpoint), model.num_exits, thresholds, final, use_calibration, ema)
    net = EarlyExitNet(model, policy)
    size, ratio, classes = checkpoint["image_size"], resize_ratio(cfg.dataset), checkpoint["classes"]
    files = find_images(paths)
    results, errors = [], []
    for start in range(0, len(files), cfg.batch_size):
        batch, kept = [], []
        for path in files[start:start + cfg.batch_size]:
            try:
                batch.append(read_image(path, size, ratio))
                kept.append(path)
            except ByotError as e:
                errors.append(str(e))
        if not batch:
            continue
        images = torch.stack(batch).to(device)  # (B, 3, S, S) uint8
        with runtime.autocast():
            answer = net(runtime.inputs(images))
        for path, c, p, k in zip(kept, answer.predicted.tolist(), answer.probability.tolist(), answer.exit.tolist()):
            results.append({"path": str(path), "class": classes[c], "probability": p, "exit": k})
    return results, errors
