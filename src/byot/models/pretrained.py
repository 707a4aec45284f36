"""ImageNet-pretrained backbones: torchvision ResNet weights (resnet18-152, resnext50_32x4d, wide_resnet50_2)
loaded into a MultiExitResNet.

torchvision and byot name the trunk the same way below the top level (``layer3.1.conv2`` is
``stages.2.1.conv2``, ``downsample.0/1`` alike), so one renaming of the top-level prefixes maps a
torchvision state dict onto the stem, the four stages and the deepest head. The shallow exits have
no ImageNet counterpart and keep their initialisation.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from byot.errors import ByotError
from byot.models.resnet import MultiExitResNet, ResNetSpec

logger = logging.getLogger("byot")

IMAGENET = "imagenet"  # the --pretrained value (or None) that means torchvision's ImageNet weights
TORCHVISION_WIDTH = 64  # torchvision's ResNets all start with 64 channels
# (block class name, blocks per stage) -> torchvision builder of the same trunk
TORCHVISION_ARCHS = {  # (block, blocks per stage, groups, width per group) -> torchvision's builder
    ("basic", (2, 2, 2, 2), 1, 64): "resnet18",
    ("basic", (3, 4, 6, 3), 1, 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 1, 64): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 1, 64): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 1, 64): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 32, 4): "resnext50_32x4d",
    ("bottleneck", (3, 4, 6, 3), 1, 128): "wide_resnet50_2",
}
RESNET_NAMES = [f"resnet{d}" for d in (18, 34, 50, 101, 152)] + ["resnext50_32x4d", "wide_resnet50_2"]
SHOWN_NAMES = 3  # names listed per kind in describe_load's line


def torchvision_arch(model: MultiExitResNet) -> str:
    """The torchvision builder ("resnet18", ..., "resnet152") whose trunk has ``model``'s blocks."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, ResNetSpec):
        raise ByotError(f"--pretrained loads torchvision ResNet weights (the ResNet family: {', '.join(RESNET_NAMES)}); "
                        f"{getattr(model, 'arch', 'this model')} is not one")
    key = (spec.block, tuple(spec.layers), spec.groups, spec.width_per_group)
    if key not in TORCHVISION_ARCHS:
        raise ByotError(f"no torchvision ResNet has {key[0]} blocks {key[1]}; pretrained weights need one")
    return TORCHVISION_ARCHS[key]


def backbone_key_map(model: MultiExitResNet) -> dict[str, str]:
    """{torchvision key: byot key} for every tensor of the stem, the stages and the deepest head's fc.

    conv1.* -> stem.0.*, bn1.* -> stem.1.*, layerN.* -> stages.{N-1}.*, fc.* -> heads.{last}.fc.*;
    the shallow exits' tensors are absent (nothing in a torchvision file belongs to them).
    """
    last_head = len(model.heads) - 1
    prefixes = [("stem.0.", "conv1."), ("stem.1.", "bn1."), (f"heads.{last_head}.fc.", "fc.")]
    mapping = {}
    for byot_key in model.state_dict():
        stage = re.match(r"stages\.(\d+)\.(.+)", byot_key)
        if stage:
            mapping[f"layer{int(stage[1]) + 1}.{stage[2]}"] = byot_key
            continue
        for byot_prefix, tv_prefix in prefixes:
            if byot_key.startswith(byot_prefix):
                mapping[tv_prefix + byot_key[len(byot_prefix):]] = byot_key
    return mapping


def load_pretrained(model: MultiExitResNet, source: str | Path | None) -> dict[str, Any]:
    """Copy torchvision-style ResNet weights into ``model`` in place and say what fitted.

    ``source``: None or "imagenet" for torchvision's DEFAULT ImageNet weights of the matching depth
    (downloaded to, or read from, the torch hub cache), else the path of a local state dict
    (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ..., ``fc.weight``; a dict wrapping it under
    "state_dict" or "model" works too). Tensors whose shapes differ (a 1000-class fc, a 7x7 stem for a
    3x3 one) are skipped and reported. Returns {"source", "loaded": count, "shape_mismatch", "missing"
    (model tensors the file lacks), "unexpected" (file tensors with no place in the model)}, names in
    torchvision's spelling. Raises ByotError when the residual stages do not all fit.
    """
    arch = torchvision_arch(model)
    if model.spec.width != TORCHVISION_WIDTH:
        raise ByotError(f"pretrained ResNet weights need --width {TORCHVISION_WIDTH} (the model has width "
                        f"{model.spec.width})")
    if source is None or str(source) == IMAGENET:
        state, origin = _imagenet_state_dict(arch)
    else:
        origin = str(Path(source).expanduser())
        state = _read_state_dict(Path(origin))
    matched, summary = _match(model, state)
    summary = {"source": origin, **summary}
    _check_stages_fit(summary, origin, arch)  # before copying: a refused file leaves the model untouched
    model.load_state_dict(matched, strict=False)  # copy_ into the existing tensors: dtype and device kept
    logger.debug(describe_load(summary))
    return summary


def describe_load(summary: dict[str, Any]) -> str:
    """One line: how many tensors loaded, then each kind of left-out tensor with its first few names."""
    parts = [f"pretrained weights from {summary['source']}: loaded {summary['loaded']} tensors"]
    for kind, label in (("shape_mismatch", "shape mismatches"), ("missing", "missing from the file"),
                        ("unexpected", "unused from the file")):
        names = summary[kind]
        shown = ", ".join(names[:SHOWN_NAMES])
        shown += f", +{len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
        parts.append(f"{len(names)} {label}" + (f" ({shown})" if names else ""))
    return "; ".join(parts)


def _imagenet_state_dict(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # no network, a proxy, a truncated cache file: all end the same way for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(
            f"cannot get torchvision's ImageNet weights for {arch} ({first}); pass --pretrained PATH with a "
            f"local state dict, saved on a machine with internet by: python -c \"import torch, torchvision; "
            f"torch.save(torchvision.models.{arch}(weights='DEFAULT').state_dict(), '{arch}.pth')\"") from e
    return state, f"torchvision {arch} {weights.name}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torchvision-style state dict file ({"state_dict"/"model": ...} unwrapped,
    a DataParallel "module." prefix dropped)."""
    if not path.is_file():
        raise ByotError(f"no pretrained weights at {path}; pass --pretrained PATH of a saved ResNet "
                        "state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, not a torch file, or objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"cannot read pretrained weights {path} (not a torch state dict?): {first}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    items = state.items() if isinstance(state, dict) else []
    tensors = {k: v for k, v in items if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ByotError(f"{path} holds no tensors; --pretrained needs a ResNet state_dict saved with "
                        "torch.save")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _match(model: MultiExitResNet, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Sort ``state``'s tensors (torchvision names): {byot key: tensor} of those that fit, and the summary."""
    mapping = backbone_key_map(model)
    own = model.state_dict()
    matched, mismatched, unexpected = {}, [], []
    for tv_key, tensor in state.items():
        if tv_key not in mapping:
            unexpected.append(tv_key)
        elif own[mapping[tv_key]].shape != tensor.shape:
            mismatched.append(f"{tv_key} {list(tensor.shape)} vs {list(own[mapping[tv_key]].shape)}")
        else:
            matched[mapping[tv_key]] = tensor
    # BatchNorm's step counter only matters with momentum=None; files saved before torch 0.4.1 lack it
    missing = [k for k in mapping if k not in state and not k.endswith("num_batches_tracked")]
    summary = {"loaded": len(matched), "shape_mismatch": mismatched, "missing": missing,
               "unexpected": unexpected}
    return matched, summary


def _check_stages_fit(summary: dict[str, Any], origin: str, arch: str) -> None:
    """The stages are what pretraining is for: a stage tensor left out means another architecture's file.

    The stem (7x7 vs the CIFAR 3x3) and the fc (class count) may differ; the stages never may, or the
    network would mix pretrained and random blocks without saying so.
    """
    bad = [name for kind in ("shape_mismatch", "missing", "unexpected") for name in summary[kind]
           if name.startswith("layer")]
    if summary["loaded"] == 0 or bad:
        raise ByotError(f"{origin} does not fit {arch}'s residual stages (another architecture's weights?): "
                        f"{describe_load(summary)}")
