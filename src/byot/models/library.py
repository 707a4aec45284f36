"""Backbones from other libraries (timm, torchvision) on the multi-exit contract.

A library model is split into a stem and stages made of its own modules (the same objects: its weights, its
initialisation, its state-dict layout below byot's prefixes), and its own head stays the deepest exit. The
split is a chain: the modules its feature extractor calls, in the order it calls them, with containers that
hold a stage boundary opened up. Whether that chain really is the network is checked when it is built: the
staged forward of one random image must give the library model's own logits, else the model is refused
(its forward does something besides calling its modules one after another).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from byot.errors import ByotError
from byot.models.base import MultiExitNet, init_conv_bn
from byot.models.registry import ExitOptions


@dataclass
class Split:
    """A library model cut for the contract: stem, stages and the deepest head, and the natural exits."""

    stem: nn.Module
    stages: list[nn.Module]
    head: nn.Module  # last stage's output -> (logits, pooled feature)
    natural: list[int] | None = None  # default exit stages; None: every stage but the last
    layout: str = "nchw"  # "nhwc" for channels-last maps (Swin), "tokens" for a transformer's (B, N, C) stages


class Chain(nn.Sequential):
    """Modules run one after another (a stage or a stem made of a library model's modules); its children keep
    the library's names with dots as underscores, so a state dict reads like the library's."""

    def __init__(self, units: Sequence[tuple[str, nn.Module]] | dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in (units.items() if isinstance(units, dict) else units):  # (slicing passes a dict)
            self.add_module(name.replace(".", "_"), module)


def call_order(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """The names of ``model``'s direct children in the order ``run()`` calls them (each once at most)."""
    order: list[str] = []
    hooks = [child.register_forward_pre_hook(lambda m, a, n=name: order.append(n))
             for name, child in model.named_children()]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return order


def open_containers(model: nn.Module, names: Sequence[str], boundaries: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The chain of ``names`` (children of ``model``, dotted paths) with every container that holds one of
    the ``boundaries`` replaced by its own children, recursively; a container that is not a plain
    nn.Sequential cannot be opened (its forward may do more than call its children)."""
    units: list[tuple[str, nn.Module]] = []

    def add(name: str, module: nn.Module) -> None:
        if any(b.startswith(name + ".") for b in boundaries):
            if not isinstance(module, nn.Sequential):
                raise ByotError(f"{name} holds a stage boundary but is not a chain of modules")
            for child_name, child in module.named_children():
                add(f"{name}.{child_name}", child)
        else:
            units.append((name, module))

    for name in names:
        add(name, model.get_submodule(name))
    return units


def cut_at(units: list[tuple[str, nn.Module]], ends: Sequence[str]) -> tuple[nn.Module, list[nn.Module]]:
    """Stem and stages of the chain ``units``: stage 1 is the unit named ``ends[0]`` and the stem everything
    before it; stage k runs from after ``ends[k - 2]`` to ``ends[k - 1]``; the units after the last boundary
    join the last stage (the library's closing convolution or norm)."""
    names = [n for n, _ in units]
    missing = [e for e in ends if e not in names]
    if missing:
        raise ByotError(f"byot cannot split this network into stages: its stage {missing[0]} is not run as one "
                        "of a chain of modules")
    positions = [names.index(e) for e in ends]
    if positions != sorted(positions):
        raise ByotError("the stage boundaries are not in the order the network runs them")
    stem = Chain(units[: positions[0]])
    stages = []
    start = positions[0]
    for i, end in enumerate(positions):
        stop = len(units) if i == len(positions) - 1 else end + 1
        stages.append(Chain(units[start:stop]))
        start = stop
    return stem, stages


def check_split(name: str, split: Split, owner: nn.Module, image_size: int) -> None:
    """The staged forward of one random image gives the library model ``owner``'s own logits and its own
    classifier input (the pre-logits feature, captured as the owner runs), both in eval mode; otherwise the
    split is refused, naming the model.

    Both are compared relative to their size: some models' logits are tiny at initialisation (zero-initialised
    layer scales and last norms), where an absolute tolerance would accept a wrong split; the feature is not.
    """
    modules = [owner, split.stem, *split.stages, split.head]
    modes = [[m.training for m in module.modules()] for module in modules]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, image_size, image_size, generator=generator)
    seen: list[torch.Tensor] = []
    hook = split.head.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            expected = owner(x)
            expected_feature = seen[-1] if seen else None
            y = split.stem(x)
            for stage in split.stages:
                y = stage(y)
            got, feature = split.head(y)
    except Exception as e:  # a map too small for a kernel, a fixed input size, a part byot cannot call alone
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"{name}: its split into stages does not run at {image_size} px ({first}); either the "
                        "images are too small for it, or its forward is not a chain of its modules") from e
    finally:
        hook.remove()
        for module, flags in zip(modules, modes):
            for m, flag in zip(module.modules(), flags):
                m.training = flag
    if not isinstance(expected, torch.Tensor) or got.shape != expected.shape or (
            expected.device.type != "meta" and not (_close(got, expected) and expected_feature is not None
                                                    and _close(feature, expected_feature.flatten(1)))):
        raise ByotError(f"{name}: byot cannot split it into stages (its forward does more than run its modules one "
                        "after another, so shallow exits cannot be placed without changing what it computes); "
                        "see the README's list of supported library models")


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to rounding, relative to the size of ``expected`` (not to an absolute tolerance)."""
    expected = expected.float()
    scale = expected.abs().max().item()
    return got.shape == expected.shape and (scale == 0 and bool((got == 0).all())
                                            or bool(((got.float() - expected).abs() <= 1e-4 * scale).all()))


def adopt(owner: nn.Module, into: nn.Module) -> None:
    """Keep a reference to the library model ``owner`` in ``into`` without registering it (its modules are
    registered where the split put them; the owner only supplies methods such as timm's forward_head)."""
    into.__dict__["_library_model"] = owner


class LibraryNet(MultiExitNet):
    """A library model's split on the contract, with shallow heads (fresh, byot's initialisation) after the
    chosen stages. ``library_keys`` maps each byot state-dict key of the backbone to the library's own name
    for that tensor (what ``--pretrained`` files use); ``normalization`` is the (mean, std) the library's
    pretrained weights expect, or None."""

    def __init__(self, name: str, owner: nn.Module, split: Split, common: ExitOptions,
                 normalization: tuple[tuple[float, ...], tuple[float, ...]] | None, pool: str = "token",
                 prefix_tokens: int = 0) -> None:
        super().__init__()
        from byot.models.exits import token_head_builder

        self.stem = split.stem
        self.stage_layout = "nhwc" if split.layout == "nhwc" else "nchw"
        builder = token_head_builder(common.head, pool, prefix_tokens) if split.layout == "tokens" else None
        self.finish(split.stages, common, init=_init_shallow_heads, natural=split.natural, build_head=builder,
                    deepest=split.head)
        self.normalization = normalization
        adopt(owner, self)  # the library's own model over the same modules (byot bench compares the two)
        self.library_keys = library_keys(owner, self)
        classifier = {id(t) for t in split.head.classifier.state_dict(keep_vars=True).values()}
        self.classifier_keys = {k for k, t in self.state_dict(keep_vars=True).items() if id(t) in classifier}
        unplaced = [k for k, p in owner.named_parameters() if k not in self.library_keys.values()]
        if unplaced:
            raise ByotError(f"{name} has parameters outside the modules byot runs ({', '.join(unplaced[:3])}, used in "
                            "training only?); byot cannot split it")


def _init_shallow_heads(net: nn.Module) -> None:
    for head in net.heads[:-1]:  # the backbone and its own head keep the library's initialisation
        init_conv_bn(head)


def library_keys(owner: nn.Module, net: nn.Module) -> dict[str, str]:
    """{byot key: library key} for every tensor the two share (matched by identity, not by name)."""
    own = {id(t): k for k, t in owner.state_dict(keep_vars=True).items()}
    return {k: own[id(t)] for k, t in net.state_dict(keep_vars=True).items() if id(t) in own}
