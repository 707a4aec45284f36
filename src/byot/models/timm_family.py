"""timm's models as multi-exit networks: ``timm/NAME`` is NAME from ``timm.create_model`` (random weights;
``--pretrained`` loads a local file or timm's own), cut into stages on the multi-exit contract.

- CNNs (ConvNeXt, EfficientNet, MobileNetV3/V4, RegNet, ResNet/ResNeXt, CSPNet, DenseNet, GhostNet, ...): the
  stages end at the modules timm's ``feature_info`` names at strides 4, 8, 16 and 32; the stem is what runs
  before the first; the deepest exit is timm's own head (``forward_head``) and its pre-logits feature.
- Vision transformers (ViT, DeiT, and timm's other ``VisionTransformer`` models): the patch embedding with the
  class token and position embedding is the stem, every block a stage (exits numbered by block, by default
  after each quarter of the depth: 3, 6, 9 for 12 blocks), token exits pool as the model's head does.

- Swin: its stages hand on channels-last (B, H, W, C) maps; the shallow exits read them through a permute.

Models whose forward is not a chain of their modules are refused with one line.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from byot.errors import ByotError
from byot.models.exits import fp32_logits
from byot.models.library import (
    Chain,
    LibraryNet,
    Split,
    adopt,
    call_order,
    check_split,
    cut_at,
    open_containers,
)
from byot.models.registry import ExitOptions, Family, register_prefix

EXTRA = 'pip install "byot[timm]"'
SIZED = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.swin_transformer")  # builders that take img_size / patch_size


def require_timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise ByotError(f"timm/ models need timm: {EXTRA}") from e
    return timm


@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    return tuple(require_timm().list_models())


@dataclass(frozen=True)
class TimmSpec:
    model: str = ""  # timm's model name (timm.list_models())
    drop_path_rate: float = 0.0  # stochastic depth, timm's option (0: off)
    patch_size: int | None = None  # vision transformers only: another patch size (None: the model's)

    def __post_init__(self) -> None:
        timm = require_timm()
        if not timm.is_model(self.model):
            close = difflib.get_close_matches(self.model, _timm_names(), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
            raise ByotError(f"timm has no model {self.model!r}{hint} (timm.list_models() lists them)")
        if not 0 <= self.drop_path_rate < 1:
            raise ByotError(f"drop_path_rate must lie in [0, 1), not {self.drop_path_rate}")
        if self.patch_size is not None and (self.patch_size < 1 or not self._sized() or "swin" in self.model):
            raise ByotError(f"patch_size is an option of timm's vision transformers, not of {self.model}"
                            if self.patch_size >= 1 else f"patch_size must be positive, not {self.patch_size}")

    def _sized(self) -> bool:
        return require_timm().models.model_entrypoint(self.model).__module__ in SIZED


class TimmHead(nn.Module):
    """timm's own head as the deepest exit: ``forward_head(pre_logits=True)`` is the feature the hint compares,
    its classifier (in fp32) the logits. ``parts`` registers the modules the head runs."""

    def __init__(self, owner: nn.Module, parts: list[str]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({n: owner.get_submodule(n) for n in parts
                                    if isinstance(getattr(owner, n, None), nn.Module)})
        adopt(owner, self)

    @property
    def classifier(self) -> nn.Module:
        return self.__dict__["_library_model"].get_classifier()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self.__dict__["_library_model"]
        owner.training = self.training  # timm heads read their model's flag (dropout before the classifier)
        for name, part in self.parts.items():  # a module swapped in byot's net (SyncBatchNorm) is the one used
            if owner._modules.get(name) is not part:
                owner._modules[name] = part
        return fp32_logits(owner.get_classifier(), owner.forward_head(x, pre_logits=True))  # feature (B, C)


class ViTStem(nn.Module):
    """Patch embedding, class (and register) tokens, position embedding, dropouts and the pre-norm of a timm
    VisionTransformer: its ``_pos_embed`` for a fixed image size, written out."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        if getattr(vit, "dynamic_img_size", False):
            raise ByotError("timm ViTs with dynamic_img_size are not supported; byot builds them for one size")
        self.patch_embed, self.pos_drop = vit.patch_embed, vit.pos_drop
        self.patch_drop, self.norm_pre = vit.patch_drop, vit.norm_pre
        self.cls_token, self.reg_token, self.pos_embed = vit.cls_token, vit.reg_token, vit.pos_embed
        self.no_embed_class = bool(vit.no_embed_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) -> (B, prefix + patches, C) tokens."""
        x = self.patch_embed(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is None:  # timm adds no position dropout without a position embedding
            return self.norm_pre(self.patch_drop(torch.cat([*prefix, x], dim=1)))
        if self.no_embed_class:
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


def quarters(depth: int) -> list[int]:
    """Exits after each quarter of ``depth`` blocks (3, 6, 9 of 12), at least one."""
    return sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3)} - {depth}) or [1]


def split_vit(vit: nn.Module) -> Split:
    if getattr(vit, "dist_token", None) is not None:
        raise ByotError("distilled DeiTs (a class and a distillation token, two heads) are not supported; use a "
                        "deit_*_patch16_224 without 'distilled'")
    blocks = list(vit.blocks)
    if len(blocks) < 2:
        raise ByotError("a vision transformer needs at least 2 blocks for a shallow exit")
    stages = [Chain([(f"blocks.{i}", b)]) for i, b in enumerate(blocks[:-1])]
    stages.append(Chain([(f"blocks.{len(blocks) - 1}", blocks[-1]), ("norm", vit.norm)]))
    head = TimmHead(vit, ["attn_pool", "fc_norm", "head_drop", "head"])
    return Split(ViTStem(vit), stages, head, quarters(len(blocks)), "tokens")


def split_cnn(model: nn.Module, name: str, image_size: int) -> Split:
    info = [f for f in getattr(model, "feature_info", []) if f["reduction"] >= 4]
    if not info:
        raise ByotError(f"{name} has no feature_info stages at strides of 4 or more; byot cannot place exits on it")
    ends = [f["module"] for f in info]
    outputs: dict[str, torch.Size] = {}
    try:
        hooks = [model.get_submodule(e).register_forward_hook(
            lambda m, a, out, e=e: outputs.__setitem__(e, getattr(out, "shape", None))) for e in ends]
    except AttributeError as e:
        raise ByotError(f"{name}: its feature_info names stages it does not hold as modules ({e}); byot cannot "
                        "split it") from e
    x = torch.zeros(1, 3, image_size, image_size)
    try:
        model.eval()
        with torch.no_grad():
            order = call_order(model, lambda: model.forward_features(x))
    except Exception as e:  # a map too small for a kernel, a fixed input size (timm asserts it)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"{name} cannot run at {image_size} px ({first}); use another --image-size") from e
    finally:
        for hook in hooks:
            hook.remove()
        model.train()
    # timm says how its stages hand on their maps (Swin's are channels-last: output_fmt NHWC)
    layout = "nhwc" if str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC") else "nchw"
    channel_dim = 3 if layout == "nhwc" else 1
    for f in info:
        shape = outputs.get(f["module"])
        if shape is None or len(shape) != 4 or shape[channel_dim] != f["num_chs"]:
            raise ByotError(f"{name}'s stages do not give {layout.upper()} maps ({f['module']}: {tuple(shape or ())}, "
                            f"{f['num_chs']} channels expected); byot cannot place exits on it")
    try:
        units = open_containers(model, order, ends)
        stem, stages = cut_at(units, ends)
    except ByotError as e:
        raise ByotError(f"{name}: {e}") from e
    head = TimmHead(model, [n for n, _ in model.named_children() if n not in order])
    return Split(stem, stages, head, layout=layout)


def build_timm_model(spec: TimmSpec, common: ExitOptions) -> nn.Module:
    timm = require_timm()
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": common.num_classes}
    if spec.drop_path_rate:
        kwargs["drop_path_rate"] = spec.drop_path_rate
    if spec._sized():
        kwargs["img_size"] = common.image_size
        if spec.patch_size:
            kwargs["patch_size"] = spec.patch_size
    try:
        model = timm.create_model(spec.model, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"timm cannot build {spec.model} with {kwargs} ({first})") from e
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and spec._sized():
        p = patch[0] if isinstance(patch, (tuple, list)) else patch
        if common.image_size % p:
            sizes = ", ".join(str(p * k) for k in range(max(1, 32 // p), max(1, 32 // p) + 5))
            raise ByotError(f"timm/{spec.model} cuts images into {p} px patches: --image-size must be a multiple of "
                            f"{p} ({sizes}, ...), not {common.image_size}")
    return model


def build_timm(spec: TimmSpec, common: ExitOptions) -> nn.Module:
    model = build_timm_model(spec, common)
    name = f"timm/{spec.model}"
    from timm.models.vision_transformer import VisionTransformer

    split = split_vit(model) if isinstance(model, VisionTransformer) else split_cnn(model, name, common.image_size)
    check_split(name, split, model, common.image_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    normalization = (tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else None
    pool = "token" if getattr(model, "global_pool", "token") == "token" else "avg"
    return LibraryNet(name, model, split, common, normalization, pool, getattr(model, "num_prefix_tokens", 0))


TIMM = Family("timm", TimmSpec, build_timm, "any timm model: CNNs split at feature_info stages, ViTs by block")
register_prefix("timm/", TIMM, "model")
