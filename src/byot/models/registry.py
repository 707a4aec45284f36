"""One registry of model entry points: ``@register_model`` adds a builder, ``create_model`` calls it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from byot.errors import ByotError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name (the name users type on the command line)."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 100, **options: Any) -> nn.Module:
    """Build the registered architecture ``name``.

    ``options`` go to the builder: ``width`` (base channels), ``stem`` ("cifar", "imagenet" or
    "auto"), ``image_size`` (used by ``stem="auto"`` and to size the exits), ``exits`` (False: the
    plain backbone with only its own head).
    """
    if name not in _MODELS:
        raise ByotError(f"unknown arch {name!r}; known: {', '.join(list_models())}")
    return _MODELS[name](num_classes=num_classes, **options)
