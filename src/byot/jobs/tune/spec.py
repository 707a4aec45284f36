"""A study's settings: the tune file (``byot.jobs.tune.space``) with the command line over it, checked whole
before anything is opened or trained."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byot.config import Key, TrainConfig, check_shape, load_yaml
from byot.errors import ByotError
from byot.jobs.tune.space import Param, check_space, model_values, parse_space
from byot.runs.trainchild import UNCOMPARED, slug

OBJECTIVES = ("deepest", "exit:N", "ensemble", "early-exit")
PRUNERS = ("median", "hyperband", "successive-halving", "none")
SAMPLERS = ("tpe", "random", "nsga2")
PRUNER_KEYS = ("type", "startup_trials", "warmup_epochs", "reduction_factor")
# options that may differ between the machines (and the runs) of one study: where the data is, how it is
# read, where training runs and what it logs; byot sweep ignores the same ones when it compares runs
MACHINE_OPTIONS = ("data_dir", *UNCOMPARED)
SEED_MAX = 2**32 - 1  # numpy's bound, which Optuna's samplers seed
DEFAULT_MAX_DROP = 1.0  # points of top-1 the early-exit objective's policy may give up, unless a budget is given


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


TUNE_KEYS = {
    "name": Key("a non-empty string", "cifar100_small", lambda v: isinstance(v, str) and bool(v.strip()),
                required=True),
    "base": Key("a mapping of byot train options", "{arch: multi_resnet18_kd, epochs: 10, val_split: 0.1}",
                lambda v: v is None or isinstance(v, dict)),
    "space": Key("a mapping of option: range or choices", "{lr: {low: 0.02, high: 0.3, log: true}}",
                 lambda v: isinstance(v, dict) and bool(v), required=True),
    "objective": Key(f"one of {', '.join(OBJECTIVES)}", "deepest", lambda v: isinstance(v, str)),
    "trials": Key("an integer >= 1", "40", _int_at_least(1)),
    "pruner": Key(f"one of {', '.join(PRUNERS)}, or a mapping of {', '.join(PRUNER_KEYS)}",
                  "{type: median, startup_trials: 5, warmup_epochs: 2}", lambda v: isinstance(v, (str, dict))),
    "sampler": Key(f"one of {', '.join(SAMPLERS)}", "tpe", lambda v: v in SAMPLERS),
    "sampler_seed": Key(f"an integer in [0, {SEED_MAX}]", "0", lambda v: _int_at_least(0)(v) and v <= SEED_MAX),
    "budget_flops": Key("a positive finite number", "2.0e8", lambda v: _finite(v) and v > 0),
    "max_drop": Key("a finite number >= 0", "1.0", lambda v: _finite(v) and v >= 0),
}


@dataclass(frozen=True)
class Objective:
    """What a trial is scored by, on the validation split: one exit's top-1, the ensemble's, or (early-exit)
    the top-1 and mean FLOPs per image of an early-exit policy fitted under a budget or a drop."""

    kind: str  # "deepest" | "exit" | "ensemble" | "early-exit"
    exit: int | None = None  # for "exit"
    budget_flops: float | None = None  # for "early-exit": one of these two
    max_drop: float | None = None

    @property
    def directions(self) -> list[str]:
        return ["maximize", "minimize"] if self.kind == "early-exit" else ["maximize"]

    @property
    def names(self) -> list[str]:
        return ["val top-1 (early exit)", "mean FLOPs"] if self.kind == "early-exit" else [f"val top-1 ({self})"]

    def __str__(self) -> str:
        return f"exit:{self.exit}" if self.kind == "exit" else self.kind

    def describe(self) -> str:
        if self.kind == "early-exit":
            rule = (f"within {self.budget_flops:.4g} FLOPs per image" if self.budget_flops is not None
                    else f"at most {self.max_drop:g} points below the deepest exit")
            return ("early-exit: validation top-1 (maximised) and mean FLOPs per image (minimised) of the "
                    f"confidence thresholds fitted on the validation split {rule}")
        what = {"deepest": "the deepest exit", "ensemble": "the ensemble of the exits"}.get(
            self.kind, f"exit {self.exit}")
        return f"{self}: validation top-1 of {what}, maximised"

    def epoch_value(self, record: dict[str, Any]) -> float:
        """The per-epoch value pruning compares (one objective only)."""
        if self.kind == "ensemble":
            return float(record["ensemble"]["top1"])
        if self.kind == "exit":
            found = [e["top1"] for e in record["exits"] if e["exit"] == self.exit]
            if not found:
                raise ByotError(f"--objective exit:{self.exit}: the trial's model has no exit {self.exit}")
            return float(found[0])
        return float(record["exits"][-1]["top1"])


def parse_objective(text: str, budget_flops: float | None, max_drop: float | None) -> Objective:
    text = text.strip()
    if budget_flops is not None and not (_finite(budget_flops) and budget_flops > 0):
        raise ByotError(f"--budget-flops must be a positive finite number, not {budget_flops!r}")
    if max_drop is not None and not (_finite(max_drop) and max_drop >= 0):
        raise ByotError(f"--max-drop must be a finite number >= 0, not {max_drop!r}")
    if text in ("deepest", "ensemble"):
        kind, number = text, None
    elif text == "early-exit":
        if budget_flops is not None and max_drop is not None:
            raise ByotError("the early-exit objective takes one of --budget-flops and --max-drop, not both")
        return Objective("early-exit", budget_flops=budget_flops,
                         max_drop=max_drop if max_drop is not None or budget_flops is not None else DEFAULT_MAX_DROP)
    elif text.startswith("exit:") and text[5:].isdigit():
        kind, number = "exit", int(text[5:])
    else:
        raise ByotError(f"--objective must be deepest, exit:N (an exit's number), ensemble or early-exit, not {text!r}")
    if budget_flops is not None or max_drop is not None:
        raise ByotError(f"--budget-flops and --max-drop belong to the early-exit objective, not {text}")
    return Objective(kind, number)


@dataclass(frozen=True)
class Tune:
    name: str
    base: dict[str, Any]  # byot train options every trial shares (the file's base, the command line's over it)
    params: tuple[Param, ...]
    objective: Objective
    trials: int
    pruner: dict[str, Any]  # {"type": ..., and its settings}
    sampler: str
    sampler_seed: int
    base_config: TrainConfig  # ``base`` at the first extreme of each parameter: what every trial has in common

    def identity(self) -> dict[str, Any]:
        """What a study stores at its creation, and a later run must agree with to continue it (``base``
        without the options that differ between machines; those stored apart, for best.yaml)."""
        return {"base": {k: v for k, v in self.base.items() if k not in MACHINE_OPTIONS},
                "space": [p.to_dict() for p in self.params], "objective": str(self.objective),
                "budget_flops": self.objective.budget_flops, "max_drop": self.objective.max_drop}

    def machine_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.base.items() if k in MACHINE_OPTIONS}


def parse_pruner(value: Any, objective: Objective) -> dict[str, Any]:
    spec = {"type": value} if isinstance(value, str) else dict(value or {})
    unknown = sorted(str(k) for k in spec if k not in PRUNER_KEYS)
    if unknown:
        raise ByotError(f"pruner: unknown key(s) {', '.join(unknown)}; known: {', '.join(PRUNER_KEYS)}")
    kind = spec.get("type", "none" if objective.kind == "early-exit" else "median")
    if kind not in PRUNERS:
        raise ByotError(f"--pruner must be {', '.join(PRUNERS)}, not {kind!r}")
    for key in ("startup_trials", "warmup_epochs"):
        if key in spec and not _int_at_least(0)(spec[key]):
            raise ByotError(f"pruner: {key} must be an integer >= 0, not {spec[key]!r}")
    if "reduction_factor" in spec and not _int_at_least(2)(spec["reduction_factor"]):
        raise ByotError(f"pruner: reduction_factor must be an integer >= 2, not {spec['reduction_factor']!r}")
    if kind != "none" and objective.kind == "early-exit":
        raise ByotError("the early-exit objective has two values, and Optuna prunes single-objective studies "
                        "only: use --pruner none (its default)")
    return {**spec, "type": kind}


def _exit_numbers(cfg: TrainConfig) -> tuple[int, ...]:
    """The numbers of the model's exits (the stages they read, the deepest last), from a shapes-only build."""
    import torch

    from byot.config import family_arguments
    from byot.models.registry import build_from_spec, model_spec, parse_exits

    spec = model_spec(cfg.arch, family_arguments(cfg))
    exits = parse_exits(cfg.exits) if cfg.distill else False
    with torch.device("meta"):
        model = build_from_spec(cfg.arch, spec, exits, image_size=cfg.image_size or 32, head=cfg.head)
    return tuple(model.exit_stages)


def check_objective(objective: Objective, cfg: TrainConfig) -> None:
    """Refuse an objective the base configuration's model cannot give."""
    if objective.kind == "exit":
        numbers = _exit_numbers(cfg)
        if objective.exit not in numbers:
            raise ByotError(f"--objective exit:{objective.exit}: {cfg.arch} here has exits "
                            f"{', '.join(map(str, numbers))}; choose one of them")
    if objective.kind == "early-exit" and not cfg.distill:
        raise ByotError("--objective early-exit needs shallow exits; the base config is the plain backbone "
                        "(distill: false)")


def load_tune(path: str | Path, overrides: dict[str, Any], settings: dict[str, Any]) -> Tune:
    """The tune file at ``path``; ``overrides``: byot train options from the command line (over the base);
    ``settings``: the study's own options given on the command line (objective, trials, pruner, ...)."""
    where = f"tune file {path}"
    raw = {k: v for k, v in load_yaml(path, what="tune file").items()}
    check_shape(where, raw, TUNE_KEYS)
    merged = {**raw, **{k: v for k, v in settings.items() if v is not None}}
    base_file = {str(k).replace("-", "_"): v for k, v in (raw.get("base") or {}).items()}
    base = {**base_file, **overrides}
    fixed_by = {k: "the command line" if k in overrides else f"the base of {path}" for k in base}
    if isinstance(base_file.get("model_options"), dict) and isinstance(overrides.get("model_options"), dict):
        base["model_options"] = {**base_file["model_options"], **overrides["model_options"]}
    if base.get("data_dir"):
        base["data_dir"] = str(Path(base["data_dir"]).expanduser().resolve())  # trials and best.yaml alike
    for key in ("resume", "save_folder", "final_test"):
        if key in base:
            raise ByotError(f"{where}: {key} is set by byot tune for each trial; remove it from the base")
    if not base.get("val_split"):
        raise ByotError("byot tune scores trials on a validation hold-out, never on test: give --val-split "
                        "(e.g. 0.1) or val_split in the tune file's base")
    objective = parse_objective(str(merged.get("objective", "deepest")), merged.get("budget_flops"),
                                merged.get("max_drop"))
    params = parse_space(raw["space"])
    try:
        cfg = check_space(params, base, fixed_by)
    except ByotError as e:
        raise ByotError(f"{where}: {e}") from e
    for each in [cfg, *model_values(params, base)]:  # e.g. every choice of exits
        check_objective(objective, each)
    trials = merged.get("trials", 20)
    if not _int_at_least(1)(trials):
        raise ByotError(f"--trials must be at least 1, not {trials!r}")
    seed = merged.get("sampler_seed", 0)
    if not _int_at_least(0)(seed) or seed > SEED_MAX:
        raise ByotError(f"--sampler-seed must be an integer in [0, {SEED_MAX}], not {seed!r}")
    sampler = merged.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise ByotError(f"--sampler must be {', '.join(SAMPLERS)}, not {sampler!r}")
    name = str(merged["name"]).strip()
    slug(name)  # names its folders: it needs letters or digits
    return Tune(name, base, params, objective, trials, parse_pruner(merged.get("pruner"), objective), sampler,
                merged.get("sampler_seed", 0), cfg)


def replace_name(tune: Tune, name: str | None) -> Tune:
    if name is not None:
        slug(name)  # a name with no letter or digit (``///``, ``..``) is refused whatever --out says
    return dataclasses.replace(tune, name=name) if name else tune
