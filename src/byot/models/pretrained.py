"""ImageNet-pretrained backbones: torchvision ResNet weights (resnet18-152, resnext50_32x4d, wide_resnet50_2)
loaded into a MultiExitResNet.

torchvision and byot name the trunk the same way below the top level (``layer3.1.conv2`` is
``stages.2.1.conv2``, ``downsample.0/1`` alike), so one renaming of the top-level prefixes maps a
torchvision state dict onto the stem, the four stages and the deepest head. The shallow exits have
no ImageNet counterpart and keep their initialisation.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
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
    from byot.models.library import LibraryNet

    if isinstance(model, LibraryNet):
        return load_library_pretrained(model, source)
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
    """The tensors of a state dict file, torch or safetensors ({"state_dict"/"model": ...} unwrapped,
    a DataParallel "module." prefix dropped)."""
    if not path.is_file():
        raise ByotError(f"no pretrained weights at {path}; pass --pretrained PATH of a saved state dict")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, not a torch file, or objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"cannot read pretrained weights {path} (not a torch state dict or safetensors file?): "
                        f"{first}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    items = state.items() if isinstance(state, dict) else []
    tensors = {k: v for k, v in items if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ByotError(f"{path} holds no tensors; --pretrained needs a state_dict saved with torch.save or "
                        "safetensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    _check_finite(tensors, path)
    return tensors


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a file with a NaN or an infinity in any floating-point tensor: training from it would diverge at
    once and the loss would point at the learning rate, not at the file."""
    counts = {name: tensor.numel() - int(torch.isfinite(tensor).sum()) for name, tensor in tensors.items()
              if tensor.is_floating_point() or tensor.is_complex()}
    bad = {name: count for name, count in counts.items() if count}
    if bad:
        first, count = next(iter(bad.items()))
        total = sum(bad.values())
        raise ByotError(f"pretrained weights {path} hold {total} non-finite value{'s' if total > 1 else ''} "
                        f"(NaN or infinity), first in tensor {first} ({count} of its {tensors[first].numel()}); "
                        "a file saved from a diverged run or damaged cannot be trained from")


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


def load_library_pretrained(model: Any, source: str | Path | None) -> dict[str, Any]:
    """Copy a timm or torchvision state dict (the library's own names) into a LibraryNet's backbone.

    ``source``: None or "imagenet" for the library's own pretrained weights (timm's hub or cache,
    torchvision's), else a local file (.safetensors or a torch state dict). The classifier and the shallow
    exits start fresh. A ViT position embedding of another grid is resampled (bicubic). Every backbone tensor
    must be in the file with its shape, else the file is refused before anything is copied.
    Returns the summary ``describe_load`` prints.
    """
    if source is None or str(source) == IMAGENET:
        state, origin = _library_weights(model)
    else:
        origin = str(Path(source).expanduser())
        state = _read_state_dict(Path(origin))
    state = _timm_filtered(model, state)
    own = model.state_dict()
    wanted = {lib: key for key, lib in model.library_keys.items() if key not in model.classifier_keys}
    matched, mismatched, unexpected = {}, [], []
    for lib_key, tensor in state.items():
        key = wanted.get(lib_key)
        if key is None:
            unexpected.append(lib_key)
            continue
        if tensor.shape != own[key].shape and tensor.dim() == 3 and lib_key.endswith(("pos_embed", "pos_embedding")):
            tensor = resample_position_embedding(tensor, own[key].shape[1])
        if tensor.shape != own[key].shape:
            mismatched.append(f"{lib_key} {list(tensor.shape)} vs {list(own[key].shape)}")
        else:
            matched[key] = tensor
    missing = [lib for lib, key in wanted.items() if lib not in state and not lib.endswith("num_batches_tracked")]
    summary = {"source": origin, "loaded": len(matched), "shape_mismatch": mismatched, "missing": missing,
               "unexpected": [k for k in unexpected if k not in model.library_keys.values()]}
    if mismatched or missing or not matched:
        raise ByotError(f"{origin} does not fit {model.arch}'s backbone as built here (weights of another model "
                        f"or another configuration?): {describe_load(summary)}")
    model.load_state_dict(matched, strict=False)
    logger.debug(describe_load(summary))
    return summary


def _timm_filtered(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm file through timm's own ``checkpoint_filter_fn`` for the model's architecture, where it has one:
    what timm does when it loads pretrained weights into a model of another size (Swin's relative position
    tables and ViTs' position embeddings resampled, old key names renamed). Other files as they are."""
    if not model.arch.startswith("timm/"):
        return state
    import importlib

    owner = model.__dict__["_library_model"]
    filter_fn = getattr(importlib.import_module(type(owner).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        with warnings.catch_warnings():  # timm's resampling warns about torch internals, not about the file
            warnings.simplefilter("ignore")
            filtered = filter_fn(dict(state), owner)
    except Exception:  # a file of another model: the matching below says what does not fit
        logger.debug("timm's checkpoint filter did not take the file; matching it as it is", exc_info=True)
        return state
    return {k: v for k, v in filtered.items() if isinstance(v, torch.Tensor)}


def _library_weights(model: Any) -> tuple[dict[str, torch.Tensor], str]:
    prefix, name = model.arch.split("/", 1)
    library = "timm" if prefix == "timm" else "torchvision"
    try:
        if library == "timm":
            import timm

            with _hub_offline_unless_reachable():
                state = timm.create_model(name, pretrained=True).state_dict()
            return state, f"timm {name} pretrained"
        import torchvision

        weights = torchvision.models.get_model_weights(name).DEFAULT
        return weights.get_state_dict(progress=False, check_hash=True), f"torchvision {name} {weights.name}"
    except Exception as e:  # no network, no cache, no pretrained weights for that name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        save = (f"timm.create_model('{name}', pretrained=True)" if library == "timm"
                else f"torchvision.models.get_model('{name}', weights='DEFAULT')")
        raise ByotError(f"cannot get {library}'s pretrained weights for {name} ({first[:200]}); pass --pretrained "
                        f"PATH of a local file, saved on a machine with internet by: python -c \"import torch, "
                        f"{library}; torch.save({save}.state_dict(), '{name}.pth')\"") from e


@contextlib.contextmanager
def _hub_offline_unless_reachable(host: str = "huggingface.co") -> Iterator[None]:
    """The Hugging Face hub in offline mode (its cache only) when ``host`` does not resolve: without a network
    its client would otherwise retry for a minute before failing."""
    import socket

    try:
        socket.getaddrinfo(host, 443)
        yield
        return
    except OSError:
        pass
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def resample_position_embedding(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """A ViT's (1, N, C) position embedding (prefix tokens, then a square grid) for ``tokens`` positions:
    the grid resized bicubically, the prefix tokens kept."""
    import math

    import torch.nn.functional as F

    n, channels = pos.shape[1], pos.shape[2]
    old = math.isqrt(n)
    prefix = n - old * old
    new = math.isqrt(tokens - prefix)
    if new * new != tokens - prefix or old < 1:
        return pos
    grid = pos[:, prefix:].reshape(1, old, old, channels).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, channels).to(pos.dtype)
    return torch.cat([pos[:, :prefix], grid], dim=1)
