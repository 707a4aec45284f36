"""Augmentation and normalisation applied to whole batches as tensor ops (no per-sample Python)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding, the reference's RandomCrop(32, padding=4)) and flip.

    images: (B, C, H, W) on any device; the random draws come from the CPU ``generator`` so a run
    is reproducible whatever the device.
    """
    offsets, flip = draw_crop_flip(len(images), padding, generator)
    return apply_crop_flip(images, padding, offsets, flip)


def draw_crop_flip(batch: int, padding: int, generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The random part of ``random_crop_flip`` for ``batch`` samples: crop offsets (B, 2) in [0, 2p] (None
    without padding) and flip flags (B,). Drawn for a whole global batch, sliced per process under torchrun."""
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator) if padding > 0 else None
    return offsets, torch.rand(batch, generator=generator) < 0.5


def apply_crop_flip(images: torch.Tensor, padding: int, offsets: torch.Tensor | None,
                    flip: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """Crop each (C, H, W) image of ``images`` at its offset in the image padded with ``fill`` (0 as the
    reference; the journal code pads with grey 128), then flip where asked."""
    b, _, h, w = images.shape
    if offsets is not None:
        offsets = offsets.to(images.device)  # (B, 2)
        padded = F.pad(images, (padding, padding, padding, padding), value=fill)  # (B, C, H + 2p, W + 2p)
        rows = offsets[:, 0:1] + torch.arange(h, device=images.device)  # (B, H)
        cols = offsets[:, 1:2] + torch.arange(w, device=images.device)  # (B, W)
        batch = torch.arange(b, device=images.device)[:, None, None]
        # advanced indexing puts the indexed dims first: (B, H, W, C) -> back to (B, C, H, W)
        images = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = flip.to(images.device)  # (B,)
    return torch.where(flip[:, None, None, None], images.flip(3), images).contiguous()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std, with mean/std of shape (3,)."""
    x = images.float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
