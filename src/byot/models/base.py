"""The multi-exit contract every backbone family plugs into.

A ``MultiExitNet`` is a stem, a list of stages run one after another, and heads: a shallow classifier
after each chosen stage and the backbone's own head (global pool + linear) after the last stage, the
teacher. A family builds only its stem and stages; the heads are sized from a dry forward of the trunk at
the configured image size (each stage's output channels and spatial size), so any family, any input size
and any choice of exit stages work the same way.

``path()`` is the one walk of the network: forward, ``forward_exit``, cost counting
(``byot.models.cost``), the real early-exit cascade (``byot.deploy.cascade``), export (``subnet``) and
gradient checkpointing all go through it. Exits are numbered by the stage they read (1 = after stage 1);
the deepest exit's number is the number of stages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from byot.errors import ByotError
from byot.models.exits import deepest_head, head_builder
from byot.models.shapes import ExitOptions, StageShape, output_shape

__all__ = ["ExitOptions", "MultiExitNet", "MultiExitOutput", "StageShape", "output_shape"]

# Residual blocks a network may have: the deepest published CIFAR ResNet (1202 layers) has 600; a typo such as
# depth=6000004 would otherwise build for minutes before anything is said
MAX_BLOCKS = 1000
MAX_GROUPS = 1024  # cardinality, groups or channels per group of a grouped convolution


def check_blocks(family: str, blocks: int, depth: str) -> None:
    """Refuse a network of more than MAX_BLOCKS residual blocks, naming the option that asked for it."""
    if blocks > MAX_BLOCKS:
        raise ByotError(f"{family} {depth} asks for {blocks} residual blocks; byot builds at most {MAX_BLOCKS}")


class MultiExitOutput(NamedTuple):
    """What every byot model returns; lists run shallow to deep, the deepest (the teacher) last."""

    logits: list[torch.Tensor]  # each (B, num_classes)
    features: list[torch.Tensor]  # each (B, C_last): pooled features the hint loss compares


class Step(NamedTuple):
    """One step of the walk: the module to run (the stem is step 0), and the head that reads its output."""

    number: int  # 0: the stem; k: stage k
    module: nn.Module
    head: nn.Module | None  # the exit after this stage, or None


# builder(stage shape, deepest stage shape, num_classes, stages between it and the deepest) -> head module; a
# head maps a stage's (B, C, H, W) map to (logits (B, classes), pooled feature (B, C_last))
HeadBuilder = Callable[[StageShape, StageShape, int, int], nn.Module]


def trunk_shapes(stem: nn.Module, stages: Sequence[nn.Module], image_size: int,
                 layout: str = "nchw") -> list[StageShape]:
    """Each stage's output shape for one (1, 3, S, S) image, from a dry forward (eval mode, no grad); ``layout``
    says how a stage's 4-d output is laid out ("nchw" or "nhwc")."""
    modes = [m.training for m in (stem, *stages)]
    shapes = []
    try:
        with torch.no_grad():
            x = stem.eval()(torch.zeros(1, 3, image_size, image_size))
            for stage in stages:
                x = stage.eval()(x)
                shapes.append(output_shape(x, layout))
    except RuntimeError as e:  # a map shrunk below a kernel's size
        first = str(e).strip().splitlines()[0]
        raise ByotError(f"{image_size} px images are too small for this network's stages ({first}); use a larger "
                        "--image-size") from e
    finally:
        for m, mode in zip((stem, *stages), modes):
            m.train(mode)
    return shapes


def resolve_exits(exits: bool | Sequence[int], num_stages: int, natural: Sequence[int] | None = None) -> list[int]:
    """The stages that get a shallow head: ``True`` the family's natural boundaries (default: every stage
    but the last), ``False`` none (the plain backbone), or the given stage numbers (1 .. num_stages - 1)."""
    if exits is False:
        return []
    if exits is True:
        return list(natural if natural is not None else range(1, num_stages))
    chosen = sorted({int(k) for k in exits} - {num_stages})  # the deepest exit is always there: naming it is fine
    bad = [k for k in chosen if not 1 <= k < num_stages]
    if bad or not chosen:
        raise ByotError(f"--exits {','.join(map(str, exits)) or '(empty)'}: this network has {num_stages} stages; "
                        f"shallow exits go after stages 1 to {num_stages - 1} (the deepest exit, {num_stages}, is "
                        "always there); give at least one")
    return chosen


def init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions, BatchNorm at identity, zero biases: the torchvision ResNet init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class AdaptedHead(nn.Module):
    """A shallow head whose pooled feature goes through a learned linear map to the teacher's width: the
    logits are the head's own; the feature (which only the hint reads) is the adapted one."""

    def __init__(self, head: nn.Module, width: int, teacher_width: int) -> None:
        super().__init__()
        self.head = head
        self.adapt = nn.Linear(width, teacher_width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature = self.head(x)
        return logits, self.adapt(feature)


def feature_widths(model: MultiExitNet, image_size: int, stages: Sequence[int]) -> list[int]:
    """The pooled feature width of each head (in ``model.heads`` order), from a dry forward of one image."""
    modes = [m.training for m in model.modules()]
    widths = []
    try:
        model.eval()
        with torch.no_grad():
            x = torch.zeros(1, 3, image_size, image_size)
            heads = iter(model.heads)
            for step in [Step(0, model.stem, None), *(Step(k, s, None) for k, s in enumerate(model.stages, 1))]:
                x = step.module(x)
                if step.number in stages:
                    widths.append(next(heads)(x)[1].shape[-1])
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    return widths


class MultiExitNet(nn.Module):
    """A stem, stages and heads; forward returns every exit's logits and pooled features, shallow to deep.

    Subclasses (the families) build ``stem`` and a list of stages and call ``finish``.
    """

    stem: nn.Module
    stages: nn.ModuleList
    heads: nn.ModuleList
    stage_layout = "nchw"  # how the stages hand on their 4-d maps: "nchw", or "nhwc" (Swin)

    def finish(self, stages: Sequence[nn.Module], common: ExitOptions,
               init: Callable[[nn.Module], None] | None = init_conv_bn, natural: Sequence[int] | None = None,
               build_head: HeadBuilder | None = None, deepest: nn.Module | None = None) -> None:
        """Set the ``stages``, attach the heads ``common`` asks for (the exits, their kind, the classes, sized at
        its image size), then initialise the weights with ``init`` (None: keep them).

        ``natural``: the family's default exit stages (default every stage but the last); ``build_head``: its
        own shallow-head builder (default the one ``common.head`` names); ``deepest``: its own deepest head, a
        module mapping the last stage's output to (logits, feature) (default global pool + linear)."""

        self.stages = nn.ModuleList(stages)
        exits = resolve_exits(common.exits, len(stages), natural)
        self.attach_heads(common.image_size, common.num_classes, exits,
                          build_head or head_builder(common.head, common.legacy_attention),
                          (lambda last, k: deepest) if deepest is not None else deepest_head, init)

    def attach_heads(self, image_size: int, num_classes: int, exits: Sequence[int], build_head: HeadBuilder,
                     deepest: Callable[[StageShape, int], nn.Module],
                     init: Callable[[nn.Module], None] | None = None) -> None:
        """Heads after the stages ``exits`` (built by ``build_head``) and after the last (``deepest``), sized
        from a dry forward at ``image_size`` px; ``init`` initialises the network before any adaptation.

        A shallow head whose pooled feature is narrower or wider than the deepest head's (a backbone whose own
        head widens the last stage, a transformer whose stages differ in width) gets a learned linear
        adaptation of its feature to the deepest's width, which the hint then compares (the journal version's
        adaptation layers)."""
        self.stage_shapes = trunk_shapes(self.stem, self.stages, image_size, self.stage_layout)
        last = self.stage_shapes[-1]
        n = len(self.stages)
        heads = [build_head(self.stage_shapes[k - 1], last, num_classes, n - k) for k in exits]
        heads.append(deepest(last, num_classes))
        self.heads = nn.ModuleList(heads)
        if init is not None:
            init(self)
        widths = feature_widths(self, image_size, [*exits, n])
        for i, width in enumerate(widths[:-1]):
            if width != widths[-1]:
                self.heads[i] = AdaptedHead(self.heads[i], width, widths[-1])
        self.exit_stages = [*exits, len(self.stages)]  # the stage each head reads, shallow to deep
        self.grad_checkpoint = False  # recompute each stage's activations in backward (saves memory)

    def adapt_features(self, image_size: int, skip: Sequence[int] = (), adapt: bool = True) -> None:
        """Set which shallow heads map their pooled feature to the deepest's width: with ``adapt`` every one
        whose exit is not in ``skip`` (exit numbers) gets a learned linear map (the journal version's
        adaptation layers, which its feature distance reads); the heads of ``skip``, which no feature term
        reads, lose any map (a parameter that never gets a gradient stalls DistributedDataParallel)."""
        widths = feature_widths(self, image_size, self.exit_stages)
        for i, stage in enumerate(self.exit_stages[:-1]):
            head = self.heads[i]
            if stage in skip and isinstance(head, AdaptedHead):
                self.heads[i] = head.head
            elif adapt and stage not in skip and not isinstance(head, AdaptedHead):
                self.heads[i] = AdaptedHead(head, widths[i], widths[-1])

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def head_after(self, stage_number: int) -> nn.Module | None:
        return self.heads[self.exit_stages.index(stage_number)] if stage_number in self.exit_stages else None

    def path(self, depth: int | None = None) -> list[Step]:
        """The walk: the stem, then stages 1..``depth`` (default all), each with the head that reads it."""
        last = len(self.stages) if depth is None else depth
        if not 1 <= last <= len(self.stages):
            raise ByotError(f"depth {depth}: this network has stages 1 to {len(self.stages)}")
        return [Step(0, self.stem, None),
                *(Step(k, self.stages[k - 1], self.head_after(k)) for k in range(1, last + 1))]

    def run(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        """One step of the walk; stages are recomputed in backward under ``grad_checkpoint``."""
        if step.number and self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(step.module, x, use_reentrant=False)
        return step.module(x)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> MultiExitOutput:
        """x: (B, 3, H, W) normalised images -> every exit's logits and features.

        ``depth`` stops after that stage: only the exits up to it are computed (the compute an early-exit
        deployment pays for).
        """
        logits: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        for step in self.path(depth):
            x = self.run(step, x)  # (B, C_stage, H_stage, W_stage)
            if step.head is not None:
                out, feature = step.head(x)
                logits.append(out)
                features.append(feature)
        return MultiExitOutput(logits, features)

    def forward_exit(self, x: torch.Tensor, exit_number: int) -> torch.Tensor:
        """x: (B, 3, H, W) normalised images -> (B, num_classes) logits of one exit, running only the stem,
        the stages up to it and its own head (what a deployment of that exit alone computes)."""
        self.check_exits([exit_number])
        for step in self.path(exit_number):
            x = step.module(x)
        return self.head_after(exit_number)(x)[0]  # type: ignore[misc]

    def check_exits(self, exits: Sequence[int]) -> None:
        unknown = [k for k in exits if k not in self.exit_stages]
        if unknown or not exits:
            raise ByotError(f"exit {', '.join(map(str, unknown or exits)) or '(none)'}: this model's exits are "
                            f"{', '.join(map(str, self.exit_stages))}")

    def subnet(self, exits: Sequence[int]) -> MultiExitNet:
        """The same network cut after the deepest of ``exits``, with only their heads (modules shared, not
        copied): what a deployment of those exits runs and exports."""
        self.check_exits(exits)
        chosen = sorted(set(exits))
        net = copy.copy(self)
        net._modules = dict(self._modules)
        net.stages = nn.ModuleList(self.stages[: chosen[-1]])
        net.heads = nn.ModuleList(self.head_after(k) for k in chosen)
        net.exit_stages = chosen
        net.stage_shapes = self.stage_shapes[: chosen[-1]]
        return net
