"""One registry of model names: each name is a family (a builder and a typed spec of its options) with some
of those options fixed, timm-style (``multi_wrn28_10_kd`` is the WideResNet family at depth 28, widen 10).

``create_model(name, num_classes, image_size=..., exits=..., head=..., **options)`` validates the options
against the family's spec once (``model_spec``: unknown names, wrong types and out-of-range values are
one-line errors) and builds the network on the multi-exit contract (``byot.models.base``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from byot.errors import ByotError
from byot.models.base import MultiExitNet
from byot.models.shapes import ExitOptions
from byot.values import convert

logger = logging.getLogger("byot")


@dataclass(frozen=True)
class Family:
    """A backbone family: ``spec`` is a frozen dataclass of its options (checked in its __post_init__),
    ``build(spec, exit_options)`` the network. ``summary`` says what the family is, for the model table."""

    name: str
    spec: type
    build: Callable[[Any, ExitOptions], MultiExitNet]
    summary: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: Family
    fixed: dict[str, Any]  # the registered configuration: options the name stands for (overridable)


_MODELS: dict[str, ModelEntry] = {}
# "timm/" -> (family, the spec option the rest of the name fills): names built on demand, e.g. timm/convnext_tiny
_PREFIXES: dict[str, tuple[Family, str]] = {}


def register_model(name: str, family: Family, **fixed: Any) -> None:
    """Register ``name`` as ``family`` with ``fixed`` options (the configuration the name says)."""
    if name in _MODELS:
        raise ValueError(f"model {name} registered twice")
    unknown = set(fixed) - {f.name for f in fields(family.spec)}
    if unknown:
        raise ValueError(f"{name}: {family.name} has no option(s) {sorted(unknown)}")
    _MODELS[name] = ModelEntry(name, family, dict(fixed))


def register_prefix(prefix: str, family: Family, option: str) -> None:
    """Names ``prefix + NAME`` are ``family`` with its option ``option`` set to NAME (``timm/convnext_tiny``)."""
    if option not in {f.name for f in fields(family.spec)}:
        raise ValueError(f"{family.name} has no option {option}")
    _PREFIXES[prefix] = (family, option)


def list_models() -> list[str]:
    """Names of every registered architecture, sorted (the library prefixes, ``timm/NAME`` and ``tv/NAME``,
    are listed by ``list_prefixes``)."""
    return sorted(_MODELS)


def list_prefixes() -> list[str]:
    return sorted(_PREFIXES)


def model_entry(name: str) -> ModelEntry:
    if name in _MODELS:
        return _MODELS[name]
    for prefix, (family, option) in _PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return ModelEntry(name, family, {option: name[len(prefix):]})
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ByotError(f"unknown arch {name!r}; {hint}byot's own: {', '.join(list_models())}; or any "
                    f"{' / '.join(p + 'NAME' for p in list_prefixes())} (timm's or torchvision's models)")


def family_options(name: str) -> list[str]:
    """The options ``name``'s family takes (``--width``, ``--stem`` and ``--model-option KEY=VALUE``)."""
    return [f.name for f in fields(model_entry(name).family.spec)]


def model_spec(name: str, options: dict[str, Any] | None = None) -> Any:
    """The family spec of ``name`` with ``options`` over the name's fixed ones: typed, range-checked, frozen.

    An option the family does not take, or a value of the wrong type or outside its range, is a ByotError
    naming the option and what the family takes.
    """
    entry = model_entry(name)
    hints = typing.get_type_hints(entry.family.spec)  # real types, whether or not the annotations are strings
    kinds = {f.name: _kind(hints[f.name]) for f in fields(entry.family.spec)}
    given = dict(options or {})
    named = [option for prefix, (_, option) in _PREFIXES.items() if name.startswith(prefix) and option in given]
    if named:
        raise ByotError(f"{name}: the name says the {named[0]}; leave --model-option {named[0]}=... out")
    unknown = sorted(set(given) - set(kinds))
    if unknown:
        raise ByotError(f"{name} ({entry.family.name}) takes no option {', '.join(unknown)}; its options: "
                        f"{', '.join(kinds)}")
    values = {**entry.fixed}
    for key, value in given.items():
        kind = kinds[key]
        if kind == "tuple":
            values[key] = _int_tuple(key, value)
            continue
        try:
            values[key] = convert(kind, value)
        except (TypeError, ValueError) as e:
            raise ByotError(f"{name}: option {key} must be {kind}, not {value!r}") from e
    return entry.family.spec(**values)


def _kind(hint: Any) -> str:
    """"bool", "int", "float", "str" or "tuple" for a spec field's type."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "tuple"
    if origin in (typing.Union, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    return getattr(hint, "__name__", str(hint))


def _int_tuple(key: str, value: Any) -> tuple[int, ...]:
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    try:
        return tuple(convert("int", v) for v in items)
    except (TypeError, ValueError) as e:
        raise ByotError(f"option {key} must be a list of whole numbers, not {value!r}") from e


def parse_exits(text: str | Sequence[int] | None) -> bool | tuple[int, ...]:
    """``--exits 1,2,3`` -> (1, 2, 3); None -> True (the family's natural stages)."""
    if text is None:
        return True
    if isinstance(text, str):
        parts = [p for p in text.replace(",", " ").split() if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError as e:
            raise ByotError(f"--exits {text!r}: give stage numbers separated by commas, e.g. 1,2,3") from e
    return tuple(text)


def build_from_spec(name: str, spec: Any, exits: bool | Sequence[int] = True, num_classes: int = 2,
                    image_size: int = 32, head: str = "bottleneck", legacy_attention: bool = False) -> MultiExitNet:
    """``create_model`` with the family spec already made (``model_spec``)."""
    common = ExitOptions(num_classes, image_size, exits if isinstance(exits, bool) else tuple(exits), head,
                         legacy_attention)
    model = model_entry(name).family.build(spec, common)
    model.arch, model.spec, model.legacy_attention = name, spec, legacy_attention
    return model


def spec_record(model: MultiExitNet) -> dict[str, Any]:
    """What a checkpoint stores about the model's structure (descriptive; the config rebuilds it)."""
    spec = model.spec
    return {"family": model_entry(model.arch).family.name, "options": dataclasses.asdict(spec),
            "exits": list(model.exit_stages), "legacy_attention": bool(getattr(model, "legacy_attention", False)),
            "stage_shapes": [dataclasses.astuple(s) for s in model.stage_shapes]}
