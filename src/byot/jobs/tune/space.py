"""The tune file: a study's name, its base configuration and the search space over TrainConfig's fields,
checked as training configurations before any trial starts.

    name: cifar100_small
    base: {arch: multi_resnet18_kd, width: 8, epochs: 10, val_split: 0.1}
    objective: deepest               # deepest | exit:N | ensemble | early-exit
    trials: 40
    pruner: median                   # or {type: median, startup_trials: 5, warmup_epochs: 2}; hyperband,
                                     # successive-halving, none
    space:
      lr: {low: 0.02, high: 0.3, log: true}          # a float field: a float range (log or linear)
      epochs: {low: 4, high: 12, step: 4}            # an int field: an int range
      head: [bottleneck, attention]                  # a list: a categorical choice
      alpha: {type: float, low: 0.0, high: 0.9}      # the type may be given
      model_options.depth: [28, 40]                  # a family option (``--model-option depth=...``)

A parameter's values become the option of the same name, as ``byot train --config`` reads it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byot.config import FIELD_NAMES, TrainConfig, build_config
from byot.errors import ByotError

KINDS = ("float", "int", "categorical")
MAX_CHECKED_INTS = 256  # an int range with more values is checked at its ends and this many values between
PARAM_KEYS = ("type", "low", "high", "log", "step", "choices")
FAMILY = "model_options."  # a parameter named model_options.KEY sets one family option
# Fields that are not hyper-parameters of a trial: where it runs and writes, what it reads, what it logs, and
# the hold-out it is scored on (the same for every trial). The seed is left out too: a search over seeds
# selects noise.
UNTUNABLE = {
    "val_split": "every trial is scored on the same hold-out",
    "seed": "a search over seeds selects noise; give --seed to the study instead",
    "final_test": "the tuner evaluates the test split once, for the best trial",
    **{name: "it says where a trial runs or writes, not how it learns"
       for name in ("data_dir", "dataset", "download", "save_folder", "resume", "device", "progress",
                    "print_freq", "workers", "skip_corrupt")},
}


@dataclass(frozen=True)
class Param:
    """One searched option: a float or int range (``log``: sampled on a log scale; ``step``: a grid) or a
    list of choices."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value of this parameter for an Optuna trial (a fixed one for an enqueued retry)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """Values that stand for the whole range when checking it: its ends, or every choice."""
        if self.kind == "categorical":
            return list(self.choices)
        ends = [self.low, self.high]
        return [int(v) for v in ends] if self.kind == "int" else [float(v) for v in ends]

    def values(self) -> list[Any]:
        """The values the checks try: every choice; every integer an int range can draw (its ends and
        ``MAX_CHECKED_INTS`` evenly spaced ones for a longer range); a float range's ends."""
        if self.kind != "int":
            return self.extremes()
        low, high, step = int(self.low), int(self.high), int(self.step or 1)
        drawn = range(low, high + 1, step)
        if len(drawn) <= MAX_CHECKED_INTS:
            return list(drawn)
        picks = {drawn[round(i * (len(drawn) - 1) / (MAX_CHECKED_INTS - 1))] for i in range(MAX_CHECKED_INTS)}
        return sorted(picks | {low, drawn[-1]})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, (), False) or k == "kind"}


def with_params(options: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``options`` with a trial's parameter values over them (family options merged into model_options)."""
    merged = dict(options)
    family = dict(merged.get("model_options") or {})
    for name, value in params.items():
        if name.startswith(FAMILY):
            family[name[len(FAMILY):]] = value
        else:
            merged[name] = value
    if family:
        merged["model_options"] = family
    return merged


def _field_kind(name: str) -> str:
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    kind = str(field.type).split(" |")[0]
    return kind if kind in ("int", "float") else "categorical"


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ByotError(f"{where}: {key} must be a finite number, not {value!r}")
    return value


def parse_param(name: str, spec: Any) -> Param:
    """One entry of ``space:``: a list (choices) or a mapping of PARAM_KEYS."""
    where = f"space: {name}"
    if not name.startswith(FAMILY) and name not in FIELD_NAMES:
        raise ByotError(f"{where}: no such option; searchable: byot train's options ({', '.join(FIELD_NAMES)}) "
                        f"or {FAMILY}KEY for a family option")
    if name in UNTUNABLE:
        raise ByotError(f"{where}: not searchable ({UNTUNABLE[name]})")
    if name in ("model_options", FAMILY) or name == FAMILY.rstrip("."):
        raise ByotError(f"{where}: search one family option at a time, as {FAMILY}KEY (e.g. {FAMILY}depth)")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ByotError(f"{where} must be a list of choices or a mapping with low and high (e.g. {{low: 0.01, "
                        f"high: 0.3, log: true}}), not {spec!r}")
    unknown = sorted(str(k) for k in spec if k not in PARAM_KEYS)
    if unknown:
        raise ByotError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(PARAM_KEYS)}")
    kind = spec.get("type") or ("categorical" if "choices" in spec else None)
    if kind is None:
        kind = (_field_kind(name) if not name.startswith(FAMILY) else
                "int" if all(isinstance(spec.get(k), int) for k in ("low", "high")) else "float")
    if kind not in KINDS:
        raise ByotError(f"{where}: type must be {', '.join(KINDS)}, not {kind!r}")
    if not name.startswith(FAMILY) and kind != "categorical":
        _check_kind(where, name, kind)
    if kind == "categorical":
        return _categorical(where, name, spec)
    return _range(where, name, kind, spec)


def _check_kind(where: str, name: str, kind: str) -> None:
    """A range's type must fit the option's: an int option takes an int range, a float option a float or int
    range, and an option of names or switches takes a list of choices only."""
    field = _field_kind(name)
    if field == "int" and kind != "int":
        raise ByotError(f"{where}: {name} is a whole number: give type int (or leave the type out), not {kind}")
    if field == "categorical":
        raise ByotError(f"{where}: {name} takes a list of choices (e.g. {name}: [a, b]), not a {kind} range")


def _choice_key(choice: Any) -> tuple[str, Any]:
    if isinstance(choice, bool) or choice is None or isinstance(choice, str):
        return type(choice).__name__, choice
    return "number", float(choice)


def _categorical(where: str, name: str, spec: dict[str, Any]) -> Param:
    choices = spec.get("choices")
    extra = sorted(k for k in spec if k not in ("type", "choices"))
    if extra:
        raise ByotError(f"{where}: a categorical parameter takes choices only, not {', '.join(extra)}")
    if not isinstance(choices, list) or not choices:
        raise ByotError(f"{where}: choices must be a non-empty list, e.g. [bottleneck, attention]")
    if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
        raise ByotError(f"{where}: each choice must be a number, a word, true/false or null (Optuna stores them)")
    if len({_choice_key(c) for c in choices}) != len(choices):  # 1 and 1.0 are one value to a config
        raise ByotError(f"{where}: the choices repeat a value")
    return Param(name, "categorical", choices=tuple(choices))


def _range(where: str, name: str, kind: str, spec: dict[str, Any]) -> Param:
    if "choices" in spec:
        raise ByotError(f"{where}: a {kind} range takes low and high, not choices")
    for key in ("low", "high"):
        if key not in spec:
            raise ByotError(f"{where} needs {key} (e.g. {{low: 0.01, high: 0.3}})")
    low, high = _number(where, "low", spec["low"]), _number(where, "high", spec["high"])
    step = _number(where, "step", spec["step"]) if spec.get("step") is not None else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ByotError(f"{where}: log must be true or false")
    if kind == "int" and any(isinstance(v, float) and not float(v).is_integer() for v in (low, high, step or 1)):
        raise ByotError(f"{where}: an int parameter needs whole numbers for low, high and step")
    if not low < high:
        raise ByotError(f"{where}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise ByotError(f"{where}: a log range needs low > 0, not {low:g}")
    if log and step is not None and not (kind == "int" and step == 1):
        raise ByotError(f"{where}: a log range takes no step")
    if step is not None and step <= 0:
        raise ByotError(f"{where}: step must be positive, not {step:g}")
    return Param(name, kind, low, high, log, step)


def parse_space(raw: Any) -> tuple[Param, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ByotError("the tune file's space must be a non-empty mapping of option: range or choices, e.g. "
                        "{lr: {low: 0.02, high: 0.3, log: true}, head: [bottleneck, attention]}")
    return tuple(parse_param(str(name).replace("-", "_"), spec) for name, spec in raw.items())


def check_space(params: tuple[Param, ...], base: dict[str, Any], fixed_by: dict[str, str]) -> TrainConfig:
    """Every parameter's extreme values must make a valid training config with ``base``, and no parameter
    may also be fixed by ``base`` (``fixed_by`` names where each base option came from). Returns the base's
    config at each parameter's first extreme value."""
    for p in params:
        top = p.name.split(".")[0] if not p.name.startswith(FAMILY) else None
        family = p.name[len(FAMILY):] if p.name.startswith(FAMILY) else None
        clash = top in base if top else family in (base.get("model_options") or {})
        if clash:
            given = base[top] if top else base["model_options"][family]
            source = fixed_by.get(top or "model_options", "the base config")
            raise ByotError(f"space: {p.name} is searched and also fixed by {source} ({p.name} {given!r}); "
                            "remove one of them")
    for p in params:
        for value in p.values():
            try:
                check_runnable(build_config({}, with_params(base, {p.name: value})))
            except ByotError as e:
                raise ByotError(f"space: {p.name} = {value!r} does not make a valid training config with the "
                                f"base: {e}") from e
    first = {p.name: p.extremes()[0] for p in params}
    try:
        return build_config({}, with_params(base, first))
    except ByotError as e:
        raise ByotError(f"space: the parameters' first values together ({first}) do not make a valid training "
                        f"config: {e}") from e


def check_runnable(cfg: TrainConfig) -> None:
    """What a config needs of this machine before a trial starts: its device and precision, and its files."""
    from byot.training.runtime import resolve_amp, resolve_device

    logging.disable(logging.WARNING)  # a slow-precision note is for the trial's log, not once per value
    try:
        resolve_amp(cfg.amp, resolve_device(cfg.device))
    finally:
        logging.disable(logging.NOTSET)
    if cfg.pretrained not in (None, "imagenet"):
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise ByotError(f"--pretrained {cfg.pretrained}: no such file (or not a regular file)")


def model_values(params: tuple[Param, ...], base: dict[str, Any]) -> list[TrainConfig]:
    """The base's config at each value of each parameter that changes the model (its exits, say): the
    objective is checked against each."""
    from byot.config import MODEL_FIELDS

    changing = [p for p in params if p.name.startswith(FAMILY) or p.name in MODEL_FIELDS]
    return [build_config({}, with_params(base, {p.name: v})) for p in changing for v in p.values()]
