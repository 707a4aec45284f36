"""The run configuration: defaults -> YAML file -> command-line flags -> one frozen TrainConfig,
written to the run directory and into every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from byot.errors import ByotError
from byot.models.exits import EXIT_HEADS


@dataclass(frozen=True)
class TrainConfig:
    # model
    arch: str = "multi_resnet18_kd"  # a name from byot.list_models()
    width: int = 64  # base channels; stages use width * (1, 2, 4, 8) (x4 for bottleneck blocks)
    stem: str = "auto"  # "cifar" (3x3/1), "imagenet" (7x7/2 + max-pool) or "auto" (from the image size)
    distill: bool = True  # False (--no-distill): plain backbone, cross-entropy only: the baseline
    head: str = "bottleneck"  # shallow classifiers: "bottleneck" (ICCV 2019 paper) or "attention" (TPAMI 2021)
    pretrained: str | None = None  # "imagenet" (torchvision's weights) or a state-dict file; exits stay fresh
    # data
    dataset: str = "cifar100"  # cifar100 | cifar10 | imagefolder | digits
    data_dir: str | None = None  # folder holding the data set
    download: bool = False  # fetch CIFAR with torchvision's downloader (needs internet)
    image_size: int | None = None  # px; None: 32 for CIFAR, 224 for image folders
    val_split: float = 0.0  # share of each training class held out to select checkpoints; 0: select on test
    workers: int = 4  # DataLoader processes decoding image-folder files (CIFAR lives in memory)
    skip_corrupt: bool = False  # leave unreadable image-folder files out (listed) instead of stopping
    class_weights: str = "none"  # "balanced": label terms weighted by N / (K * n_class), for imbalanced data
    # optimisation
    epochs: int = 200
    batch_size: int = 128  # images per step: the global batch, split over the processes under torchrun
    lr: float = 0.1  # initial learning rate (SGD)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # L2 on every parameter, as the reference
    schedule: str = "step"  # "step": x0.1 at 75/130/180 of 200 epochs, scaled; "cosine"
    accum_steps: int = 1  # batches whose gradients add up before one optimizer step (effective batch x N)
    grad_checkpoint: bool = False  # recompute each stage's activations in backward: less memory, ~30% slower
    skip_nonfinite: int = 0  # optimizer steps with a NaN/inf loss to skip before stopping (0: stop at the first)
    # speed (none of these changes what is learned beyond rounding)
    amp: str = "auto"  # mixed precision: auto | bf16 | fp16 | off (auto: bf16 where the hardware runs it natively)
    channels_last: bool = True  # NHWC memory format: faster convolutions on oneDNN CPUs and tensor-core GPUs
    compile: bool = False  # torch.compile the model (falls back to eager with a warning)
    sync_bn: bool = False  # under torchrun: BatchNorm statistics of the global batch, not each process's part
    # self-distillation loss
    temperature: float = 3.0  # softens the teacher; the KD term is scaled by T**2
    alpha: float = 0.1  # KD weight; labels get (1 - alpha)
    beta: float = 1e-6  # feature-hint weight (the hint is a sum over batch and channels, hence tiny)
    # run
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    save_folder: str = "save_checkpoints"  # run directory = save_folder / arch
    resume: str | None = None  # checkpoint to continue from
    print_freq: int = 10  # steps between log lines within an epoch
    progress: bool = True  # progress bar (only when stderr is a terminal)

    @property
    def run_dir(self) -> Path:
        return Path(self.save_folder) / self.arch


# Options that fix the weights' shapes: a checkpoint's values win, and a different value is an error.
MODEL_FIELDS = ("arch", "width", "stem", "distill", "head", "dataset", "image_size")
FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields (hyphens or underscores) with the safe loader."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ByotError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ByotError(f"config {path} is not valid YAML: {detail}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ByotError(f"config {path} must hold a mapping of options, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(base: dict[str, Any], *overrides: dict[str, Any]) -> TrainConfig:
    """Merge ``overrides`` (later wins) onto ``base``, check names and types, freeze."""
    merged: dict[str, Any] = dict(base)
    for layer in overrides:
        unknown = sorted(set(layer) - set(FIELD_NAMES))
        if unknown:
            raise ByotError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(FIELD_NAMES)}")
        merged.update(layer)
    typed = {f.name: _coerce(f, merged[f.name]) for f in fields(TrainConfig) if f.name in merged}
    cfg = TrainConfig(**typed)
    _validate(cfg)
    return cfg


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    kind = str(field.type)
    if value is None:
        if "None" in kind:
            return None
        raise ByotError(f"option {field.name} cannot be empty")
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ByotError(f"option {field.name}: cannot use {value!r} as {kind}") from e


def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (cfg.batch_size >= 1, "--batch-size must be at least 1"),
        (cfg.lr > 0, "--lr must be positive"),
        (0.0 <= cfg.alpha <= 1.0, "--alpha must lie in [0, 1]"),
        (cfg.beta >= 0, "--beta must be >= 0"),
        (cfg.temperature > 0, "--temperature must be positive"),
        (cfg.width >= 1, "--width must be at least 1"),
        (cfg.image_size is None or cfg.image_size >= 8, "--image-size must be at least 8"),
        (cfg.schedule in ("step", "cosine"), "--schedule must be step or cosine"),
        (cfg.head in EXIT_HEADS, f"--head must be one of {', '.join(EXIT_HEADS)}"),
        (cfg.amp in ("auto", "bf16", "fp16", "off"), "--amp must be auto, bf16, fp16 or off"),
        (cfg.workers >= 0, "--workers must be >= 0"),
        (cfg.accum_steps >= 1, "--accum-steps must be at least 1"),
        (cfg.skip_nonfinite >= 0, "--skip-nonfinite must be >= 0"),
        (0.0 <= cfg.val_split < 1.0, "--val-split must lie in [0, 1)"),
        (cfg.class_weights in ("none", "balanced"), "--class-weights must be none or balanced"),
        (cfg.print_freq >= 1, "--print-freq must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ByotError(message)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def check_model_options(saved: dict[str, Any], given: dict[str, Any], source: str) -> None:
    """Raise when an explicitly given model option disagrees with the checkpoint's."""
    clashes = [f"--{k.replace('_', '-')} {given[k]!r} (checkpoint: {saved.get(k)!r})"
               for k in MODEL_FIELDS if k in given and k in saved and given[k] != saved[k]]
    if clashes:
        raise ByotError(f"{source} was trained with other model options: {'; '.join(clashes)}; "
                        "drop these flags (the model is rebuilt from the checkpoint) or start a new run")


def save_yaml(cfg: TrainConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    data = {**config_to_dict(cfg), **(extra or {})}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
