"""Exits on any ``nn.Module``: BYOT's shallow classifiers placed after named submodules of a model byot did not
build (a torchvision or timm model, or one a user wrote), the model's own output being the deepest exit.

``attach_exits(module, at=["layer1", "layer2", "layer3"])`` runs the module once on a dry input to find
what each named submodule hands on (its output's shape), which module is the classifier (the last one whose
output the module returns) and what that classifier reads (the deepest exit's pooled feature). The shallow
heads are byot's own (``byot.models.exits``), sized from those shapes.

Two ways to run it, tried in this order:

- a stage walk (``AttachedNet``, on the multi-exit contract): the module's modules, in the order its forward
  calls them, cut into a stem and stages at the named submodules. Kept only where the staged forward of a
  random input gives the module's own logits and feature, so the cut cannot change what the module computes.
  Everything that walks a byot model (early exit, export, cost counting, ``depth=``) accepts it.
- hooks (``HookedExits``), as mmrazor's recorders do: the module runs unchanged and a forward hook on each
  named submodule feeds its output to a head. Training and evaluation work; what needs stages to stop after
  (early exit, export, cost counting) is refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from byot.errors import ByotError
from byot.models.base import (
    AdaptedHead,
    MultiExitNet,
    MultiExitOutput,
    StageShape,
    Step,
    init_conv_bn,
    output_shape,
)
from byot.models.exits import head_builder, token_head_builder
from byot.models.library import _close, adopt, call_order, cut_at, open_containers

GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # what pools the deepest map for the classifier
MODES = ("auto", "stages", "hooks")  # attach_exits(mode=...): the stage walk where it fits, or one of the two


@dataclass
class Probe:
    """What one dry forward of the module shows: each named submodule's output, the classifier and its input."""

    maps: list[torch.Tensor]  # the output of each ``at`` submodule: (1, C, H, W) maps or (1, N, C) tokens
    feature: torch.Tensor  # (1, C_last): what the classifier reads, flattened (the deepest exit's feature)
    logits: torch.Tensor  # (1, K): the module's own output
    classifier: str  # the classifier's name in the module
    last: StageShape  # the deepest map the shallow heads bring their maps down to: (C_last, H, W)


class ClassifierHead(nn.Module):
    """The module's own classifier as the deepest exit: its input, flattened, is the pooled feature."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, 1, 1) or (B, C) pooled last map -> (logits (B, K), feature (B, C))."""
        feature = x.flatten(1)  # (B, C)
        return self.classifier(feature), feature


class AttachedNet(MultiExitNet):
    """A module cut into a stem and stages at the named submodules (its own modules, shared, not copied), with a
    shallow head after each stage but the last and the module's own classifier after the last.

    Exit k reads stage k; the deepest exit's number is ``len(at) + 1``. The state dict names the module's
    tensors ``stem.*`` and ``stages.K.*`` (the module's own names, dots as underscores, below them); the
    original module stays reachable as ``module`` (not registered twice).
    """

    def __init__(self, module: nn.Module, stem: nn.Module, stages: Sequence[nn.Module], heads: Sequence[nn.Module],
                 stage_shapes: Sequence[StageShape]) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.stage_shapes = list(stage_shapes)
        self.exit_stages = list(range(1, len(stages) + 1))
        self.grad_checkpoint = False
        adopt(module, self)

    @property
    def module(self) -> nn.Module:
        """The module the exits were attached to (its modules are this network's stem and stages)."""
        return self.__dict__["_library_model"]


class HookedExits(nn.Module):
    """A module run unchanged, with a forward hook on each named submodule feeding its output to a shallow head.

    ``forward`` returns every exit's logits and pooled features, shallow to deep, the module's own output last.
    The hooks are there only while ``forward`` runs: the module itself is left as it was.
    """

    def __init__(self, module: nn.Module, at: Sequence[str], heads: Sequence[nn.Module], classifier: str) -> None:
        super().__init__()
        self.module = module
        self.heads = nn.ModuleList(heads)  # the shallow heads, one per name in ``at``
        self.at, self.classifier = list(at), classifier
        self.exit_stages = list(range(1, len(at) + 2))  # exit k after the k-th named submodule; the last: the output

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        """x: (B, 3, H, W) normalised images -> every exit's logits (B, K) and pooled features (B, C_last)."""
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        seen: list[torch.Tensor] = []

        # each head runs as its submodule hands on its output: a later in-place operation of the module (a
        # ReLU(inplace=True) after it) cannot change what the head reads
        def run_head(i: int, output: torch.Tensor) -> None:
            outputs[i] = self.heads[i](output)

        hooks = [self.module.get_submodule(name).register_forward_hook(lambda m, a, o, i=i: run_head(i, o))
                 for i, name in enumerate(self.at)]
        hooks.append(self.module.get_submodule(self.classifier).register_forward_pre_hook(
            lambda m, args: seen.append(args[0])))
        try:
            logits = self.module(x)  # (B, K)
        finally:
            for hook in hooks:
                hook.remove()
        shallow = [outputs[i] for i in range(len(self.at))]
        return MultiExitOutput([z for z, _ in shallow] + [logits], [f for _, f in shallow] + [seen[-1].flatten(1)])

    def _no_stages(self) -> ByotError:
        return ByotError("these exits are hooks on a module byot could not cut into stages run one after another; "
                         "early exit, export and cost counting need stages (attach_exits(..., mode='stages') "
                         "says why the cut failed)")

    def path(self, depth: int | None = None) -> list[Step]:
        """Refused: a hooked module cannot be stopped after a stage."""
        raise self._no_stages()

    def subnet(self, exits: Sequence[int]) -> MultiExitNet:
        """Refused: a hooked module cannot be cut after an exit."""
        raise self._no_stages()


def attach_exits(module: nn.Module, at: Sequence[str] = ("layer1", "layer2", "layer3"), num_classes: int | None = None,
                 head: str = "bottleneck", input_size: Sequence[int] = (1, 3, 32, 32), classifier: str | None = None,
                 mode: str = "auto") -> AttachedNet | HookedExits:
    """BYOT shallow exits on ``module`` after each submodule named in ``at`` (dotted names, as
    ``module.named_modules()`` gives them, in the order the forward runs them).

    ``module`` maps (B, C_in, H, W) inputs to (B, K) logits; it becomes the deepest exit (the teacher) and its
    weights are shared, not copied. The returned model's forward maps x to ``MultiExitOutput``: logits
    ``len(at) + 1`` tensors of (B, K), shallow to deep, and pooled features as many tensors of (B, C_last),
    C_last being the width the module's classifier reads. ``head``: the shallow classifiers' kind, "bottleneck"
    (ICCV 2019) or "attention" (TPAMI 2021); sized from a dry forward of one ``input_size`` input (a named
    submodule's output is a (B, C, H, W) map or (B, N, C) tokens). ``num_classes``: checked against the
    module's output (None: taken from it). ``classifier``: the name of the module's classifier (None: the last
    module whose output the module returns, else the last nn.Linear it runs).

    ``mode``: "stages" returns an ``AttachedNet`` (the multi-exit contract: early exit and export accept it)
    or raises ByotError saying why the module cannot be cut; "hooks" a ``HookedExits`` (training and evaluation
    only); "auto" the first where it fits.
    """
    if mode not in MODES:
        raise ByotError(f"attach_exits mode {mode!r}: choose one of {', '.join(MODES)}")
    at = _check_names(module, at)
    probe = _probe(module, at, classifier, input_size)
    if num_classes is not None and num_classes != probe.logits.shape[-1]:
        raise ByotError(f"num_classes {num_classes}: the module outputs {probe.logits.shape[-1]} classes and its "
                        "output is the deepest exit; build it with that many, or leave num_classes out")
    heads = _shallow_heads(probe, head)
    net: AttachedNet | HookedExits | None = None
    if mode != "hooks":
        try:
            net = _stage_walk(module, at, probe, heads, input_size)
        except ByotError:
            if mode == "stages":
                raise
    net = net or HookedExits(module, at, heads, probe.classifier)
    for h in heads:
        h.train(module.training)
    net.training = module.training  # the mode the module was given in
    return net


def _check_names(module: nn.Module, at: Sequence[str]) -> list[str]:
    names = dict(module.named_modules())
    at = [at] if isinstance(at, str) else list(at)
    unknown = [n for n in at if n not in names or not n]
    if unknown or not at or len(set(at)) != len(at):
        shown = ", ".join(n for n in names if n and "." not in n)
        raise ByotError(f"attach_exits at={at!r}: give distinct names of the module's submodules "
                        f"({'unknown: ' + ', '.join(map(repr, unknown)) + '; ' if unknown else ''}its top-level "
                        f"ones: {shown})")
    return at


def _probe(module: nn.Module, at: list[str], classifier: str | None, input_size: Sequence[int]) -> Probe:
    """One dry forward (eval mode, no grad) of a zero input of ``input_size``, recording what ``Probe`` holds."""
    named = dict(module.named_modules())
    leaves = [(n, m) for n, m in named.items() if n and not any(True for _ in m.children())]
    calls: dict[str, list[torch.Tensor]] = {n: [] for n in at}
    ran: list[tuple[str, nn.Module, object]] = []  # every leaf module's output, in call order
    hooks = [named[n].register_forward_hook(lambda m, a, o, n=n: calls[n].append(o)) for n in at]
    hooks += [m.register_forward_hook(lambda m, a, o, n=n: ran.append((n, m, o))) for n, m in leaves]
    modes = [m.training for m in module.modules()]
    parameter = next(module.parameters(), None)
    x = torch.zeros(*input_size, device=parameter.device if parameter is not None else None)
    try:
        module.eval()
        with torch.no_grad():
            logits = module(x)
    except Exception as e:  # a map shrunk below a kernel's size, an input of another shape than the module takes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"attach_exits: the module does not run on an input of size {tuple(input_size)} ({first}); "
                        "pass the input_size it takes") from e
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in zip(module.modules(), modes):
            m.training = mode
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ByotError("attach_exits: the module must return one (B, num_classes) tensor of logits")
    for name in at:
        if len(calls[name]) != 1 or not isinstance(calls[name][0], torch.Tensor) or calls[name][0].dim() not in (3, 4):
            raise ByotError(f"attach_exits: submodule {name!r} must run once per forward and hand on one (B, C, H, W) "
                            f"map or (B, N, C) tokens (it ran {len(calls[name])} times)")
    classifier = classifier or _find_classifier(ran, logits)
    feature = _classifier_input(module, classifier, x)
    return Probe([calls[n][0] for n in at], feature, logits, classifier, _last_map(ran, feature.shape[1]))


def _find_classifier(ran: list[tuple[str, nn.Module, object]], logits: torch.Tensor) -> str:
    """The last module whose output the module returns as it is, else the last nn.Linear it runs."""
    for name, _, output in reversed(ran):
        if output is logits:
            return name
    for name, m, _ in reversed(ran):
        if isinstance(m, nn.Linear):
            return name
    raise ByotError("attach_exits: cannot tell which module is the classifier (no module's output is returned as "
                    "it is, and no nn.Linear runs); pass classifier='NAME'")


def _classifier_input(module: nn.Module, classifier: str, x: torch.Tensor) -> torch.Tensor:
    """(1, C_last): what ``classifier`` reads in a forward of ``x``, flattened."""
    seen: list[torch.Tensor] = []
    try:
        target = module.get_submodule(classifier)
    except AttributeError as e:
        raise ByotError(f"attach_exits: the module has no submodule {classifier!r} (classifier=)") from e
    hook = target.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        _eval_forward(module, x)
    finally:
        hook.remove()
    if len(seen) != 1 or not isinstance(seen[0], torch.Tensor):
        raise ByotError(f"attach_exits: the classifier {classifier!r} must run once per forward on one tensor")
    return seen[0].flatten(1)


def _last_map(ran: list[tuple[str, nn.Module, object]], width: int) -> StageShape:
    """(C_last, H, W): the classifier's width at the size of the map the module's global pooling reads (the last
    map, not made by a global pooling, of that width; else of any width), or 1x1 where it makes none."""
    maps = [o for _, m, o in ran if isinstance(o, torch.Tensor) and o.dim() == 4 and not isinstance(m, GLOBAL_POOLS)]
    chosen = [o for o in maps if o.shape[1] == width] or maps
    return StageShape(width, chosen[-1].shape[2], chosen[-1].shape[3]) if chosen else StageShape(width, 1, 1)


def _shallow_heads(probe: Probe, head: str) -> list[nn.Module]:
    """byot's heads for each probed map, at byot's initialisation, each mapping its map to (logits (B, K),
    feature (B, C_last)): a head whose feature comes out of another width gets a learned linear map to it."""
    maps, n = probe.maps, len(probe.maps) + 1
    num_classes, width = probe.logits.shape[-1], probe.feature.shape[1]
    heads = []
    for k, sample in enumerate(maps, start=1):
        shape = output_shape(sample)
        build = token_head_builder(head, "avg", 0) if shape.layout == "tokens" else head_builder(head)
        module = build(shape, probe.last, num_classes, n - k).to(sample.device)
        init_conv_bn(module)
        module.eval()
        with torch.no_grad():
            got = module(sample)[1].shape[-1]
        heads.append(module if got == width else AdaptedHead(module, got, width).to(sample.device))
    return heads


def _stage_walk(module: nn.Module, at: list[str], probe: Probe, heads: list[nn.Module],
                input_size: Sequence[int]) -> AttachedNet:
    """The module cut into a stem and stages at ``at``, or ByotError where the cut would change what it computes."""
    zeros = torch.zeros(*input_size, device=probe.logits.device)
    units = open_containers(module, call_order(module, lambda: _eval_forward(module, zeros)), [*at, probe.classifier])
    if not units or units[-1][0] != probe.classifier:
        raise ByotError(f"attach_exits: the module's forward does not end with its classifier {probe.classifier!r} "
                        "run as one of a chain of modules")
    body = units[:-1]
    if not body or body[-1][0] in at:
        raise ByotError(f"attach_exits: nothing runs between {at[-1]!r} and the classifier; the deepest exit "
                        "needs a stage of its own")
    stem, stages = cut_at(body, [*at, body[-1][0]])
    net = AttachedNet(module, stem, stages, [*heads, ClassifierHead(units[-1][1])],
                      [output_shape(m) for m in probe.maps] + [_shape_2d(probe.last)])
    placed = {id(p) for p in net.parameters()}
    unplaced = [k for k, p in module.named_parameters() if id(p) not in placed]
    if unplaced:
        raise ByotError(f"attach_exits: the module has parameters outside the modules its forward runs one after "
                        f"another ({', '.join(unplaced[:3])}); it cannot be cut into stages")
    _check_same(net, module, input_size, probe.logits.device)
    return net


def _shape_2d(last: StageShape) -> StageShape:
    return StageShape(last.channels, last.height, last.width)


def _eval_forward(module: nn.Module, x: torch.Tensor) -> None:
    modes = [m.training for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            module(x)
    finally:
        for m, mode in zip(module.modules(), modes):
            m.training = mode


def _check_same(net: AttachedNet, module: nn.Module, input_size: Sequence[int], device: torch.device) -> None:
    """The staged forward of one random input gives the module's own logits and classifier input (eval mode)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*input_size, generator=generator).to(device)
    modes = [m.training for m in net.modules()] + [m.training for m in module.modules()]
    feature: list[torch.Tensor] = []  # [0]: what the classifier reads in the module's own forward
    hook = net.heads[-1].classifier.register_forward_pre_hook(lambda m, args: feature.append(args[0]))
    try:
        net.eval()
        module.eval()
        with torch.no_grad():
            expected = module(x)
            out = net(x)
    except Exception as e:  # a stage handed on something the next one cannot take: not a chain
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"attach_exits: the module's forward is not a chain of its modules ({first})") from e
    finally:
        hook.remove()
        for m, mode in zip([*net.modules(), *module.modules()], modes):
            m.training = mode
    if not (_close(out.logits[-1], expected) and _close(out.features[-1], feature[0].flatten(1))):
        raise ByotError("attach_exits: the module's forward does more than run its modules one after another (the "
                        "staged forward gives other logits), so it cannot be cut into stages")
