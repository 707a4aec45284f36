"""torchvision's classification models as multi-exit networks: ``tv/NAME`` is ``torchvision.models.get_model(NAME)``
(random weights; ``--pretrained`` loads a local file or torchvision's own), cut into stages.

- CNNs (ResNet/ResNeXt/Wide ResNet, ConvNeXt, EfficientNet V1/V2, MobileNetV2/V3, RegNet, MNASNet, VGG,
  ShuffleNetV2, ...; not DenseNet, whose forward applies a ReLU of its own): the modules its forward runs before the global pooling, with the containers whose parts
  change resolution opened up, are cut where the resolution changes; the stages end at strides 4, 8, 16, 32
  (and wherever else the map halves), the stem is what runs before the first; the deepest exit is its own
  pooling and classifier, with the input of the last linear layer as the feature.
- Vision transformers (``vit_b_16`` ...): the patch projection, class token and position embedding are the
  stem, every encoder block a stage (exits by default after each quarter of the depth).
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
from byot.models.library import Chain, LibraryNet, Split, call_order, check_split, cut_at
from byot.models.registry import ExitOptions, Family, register_prefix
from byot.models.timm_family import quarters

IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # every torchvision classifier's weights
POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


@functools.lru_cache(maxsize=1)
def classification_models() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@dataclass(frozen=True)
class TorchvisionSpec:
    model: str = ""  # torchvision.models name, e.g. resnet50, convnext_tiny, efficientnet_b0, vit_b_16

    def __post_init__(self) -> None:
        if self.model not in classification_models():
            close = difflib.get_close_matches(self.model, classification_models(), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('tv/' + c for c in close)}?" if close else ""
            raise ByotError(f"torchvision has no classification model {self.model!r}{hint}")


class TorchvisionHead(nn.Module):
    """A torchvision model's pooling and classifier as the deepest exit: the parts in order, flattened before
    the first linear layer; the input of the last linear layer is the feature."""

    def __init__(self, parts: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        flat: list[tuple[str, nn.Module]] = []
        for name, part in parts:
            items = list(part.named_children()) if type(part) is nn.Sequential else [("", part)]
            flat += [(f"{name}.{n}" if n else name, m) for n, m in items]
        self.parts = Chain(flat)
        linears = [i for i, (_, m) in enumerate(flat) if isinstance(m, nn.Linear)]
        if not linears:
            raise ByotError("the model's head has no linear classifier byot can read the feature of")
        self.last = linears[-1]

    @property
    def classifier(self) -> nn.Module:
        return self.parts[self.last]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for part in list(self.parts)[: self.last]:
            x = torch.flatten(x, 1) if isinstance(part, nn.Linear) and x.dim() > 2 else x
            x = part(x)
        return fp32_logits(self.parts[self.last], torch.flatten(x, 1) if x.dim() > 2 else x)


class TorchvisionViTStem(nn.Module):
    """torchvision's ViT input: the patch projection, the class token, the position embedding, dropout."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.conv_proj, self.class_token = vit.conv_proj, vit.class_token
        self.pos_embedding, self.dropout = vit.encoder.pos_embedding, vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x)  # (B, C, H / p, W / p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ClassTokenHead(nn.Module):
    """torchvision's ViT head: the class token through ``heads``; the last linear layer's input is the feature."""

    def __init__(self, heads: nn.Sequential) -> None:
        super().__init__()
        self.heads = TorchvisionHead([("heads", heads)])

    @property
    def classifier(self) -> nn.Module:
        return self.heads.classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(x[:, 0])


def split_vit(vit: nn.Module) -> Split:
    blocks = list(vit.encoder.layers.named_children())
    stages = [Chain([(f"encoder.layers.{n}", b)]) for n, b in blocks[:-1]]
    stages.append(Chain([(f"encoder.layers.{blocks[-1][0]}", blocks[-1][1]), ("encoder.ln", vit.encoder.ln)]))
    return Split(TorchvisionViTStem(vit), stages, ClassTokenHead(vit.heads), quarters(len(blocks)), "tokens")


def _strides(model: nn.Module, x: torch.Tensor) -> dict[int, int]:
    """{id(module): stride of its output map} for every module of ``model`` whose output is a (B, C, H, W) map."""
    out: dict[int, int] = {}

    def hook(m: nn.Module, args: Any, y: Any) -> None:
        if isinstance(y, torch.Tensor) and y.dim() == 4:
            out[id(m)] = round(x.shape[-1] / y.shape[-1])

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def split_cnn(model: nn.Module, name: str, image_size: int) -> Split:
    x = torch.zeros(1, 3, image_size, image_size)
    try:
        model.eval()
        with torch.no_grad():
            order = call_order(model, lambda: model(x))
            strides = _strides(model, x)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"{name} cannot run at {image_size} px ({first}); use another --image-size") from e
    finally:
        model.train()
    pools = [i for i, n in enumerate(order) if isinstance(model.get_submodule(n), POOLS)]
    # the head starts at the global pooling; a model that pools in its forward (x.mean, F.adaptive_avg_pool2d)
    # has its classifier as the last module (check_split then tells whether that was all it did)
    cut = pools[-1] if pools else len(order) - 1
    trunk = order[:cut]
    head = [(n, model.get_submodule(n)) for n in order[cut:]]
    if not pools:
        head.insert(0, ("avgpool", nn.AdaptiveAvgPool2d(1)))

    units: list[tuple[str, nn.Module]] = []

    def add(unit: str, module: nn.Module) -> None:
        children = list(module.named_children())
        inner = {strides.get(id(c)) for _, c in children} - {None}
        if isinstance(module, nn.Sequential) and len(inner) > 1:  # parts at several resolutions: open it
            for n, c in children:
                add(f"{unit}.{n}", c)
        else:
            units.append((unit, module))

    for n in trunk:
        add(n, model.get_submodule(n))
    unit_strides = [strides.get(id(m)) for _, m in units]
    ends = [units[i][0] for i, s in enumerate(unit_strides)
            if s is not None and s >= 4 and (i + 1 == len(units) or unit_strides[i + 1] != s)]
    ends = [e for i, e in enumerate(ends) if i == 0 or e != ends[i - 1]]
    if len(ends) < 2:
        raise ByotError(f"{name} has fewer than two resolutions after its stem; no place for a shallow exit")
    try:
        stem, stages = cut_at(units, ends)
    except ByotError as e:
        raise ByotError(f"{name}: {e}") from e
    return Split(stem, stages, TorchvisionHead(head))


def build_torchvision(spec: TorchvisionSpec, common: ExitOptions) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {"weights": None, "num_classes": common.num_classes}
    if spec.model.startswith(("swin", "maxvit")):
        raise ByotError(f"tv/{spec.model}: channels-last backbones (Swin, MaxViT) are not supported yet")
    vit = spec.model.startswith("vit_")
    if vit:
        kwargs["image_size"] = common.image_size
        patch = int(spec.model.rsplit("_", 1)[1])
        if common.image_size % patch:
            raise ByotError(f"tv/{spec.model} cuts images into {patch} px patches: --image-size must be a multiple "
                            f"of {patch}, not {common.image_size}")
    try:
        model = torchvision.models.get_model(spec.model, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"torchvision cannot build {spec.model} ({first})") from e
    name = f"tv/{spec.model}"
    split = split_vit(model) if vit else split_cnn(model, name, common.image_size)
    check_split(name, split, model, common.image_size)
    return LibraryNet(name, model, split, common, IMAGENET_NORMALIZATION, "token", 1)


TORCHVISION = Family("torchvision", TorchvisionSpec, build_torchvision,
                     "any torchvision classifier: CNNs split where the resolution changes, ViTs by block")
register_prefix("tv/", TORCHVISION, "model")
