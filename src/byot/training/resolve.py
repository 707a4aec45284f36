"""A command's run configuration: defaults -> a checkpoint's config (with --resume) -> YAML file -> flags,
and the run directory a resumed checkpoint belongs to."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path
from typing import Any

from byot.config import (
    EXTENDABLE,
    TrainConfig,
    build_config,
    check_same_model,
    describe_changes,
    learning_changes,
    load_yaml,
)
from byot.errors import ByotError
from byot.runs.rundir import LATEST, PREVIOUS
from byot.training.checkpoint import (
    load_checkpoint,
)

log = logging.getLogger("byot")


def resolve_config(given: dict[str, Any], config_file: str | None = None,
                   allow_changes: bool | None = None) -> tuple[TrainConfig, dict | None]:
    """defaults -> checkpoint's config (with --resume) -> YAML file -> flags; returns (config, checkpoint).

    ``allow_changes``: None for a command that evaluates a checkpoint; for a training resume, False refuses
    flags that change a learning option of the checkpoint's run (``learning_changes``, bar ``EXTENDABLE``),
    naming each, and True lets them through (``fit`` records them)."""
    explicit = {**(load_yaml(config_file) if config_file else {}), **given}
    checkpoint = None
    if explicit.get("resume") == "auto":
        explicit["resume"], checkpoint = find_resumable(build_config({}, {**explicit, "resume": None}).run_dir)
    if not explicit.get("resume"):
        return build_config({}, explicit), None
    checkpoint = checkpoint or load_checkpoint(explicit["resume"])
    saved = dict(checkpoint.get("config", {}))
    source = explicit["resume"]
    if explicit.get("arch") not in (None, saved.get("arch")):
        raise ByotError(f"{source} was trained with other model options: --arch {explicit['arch']!r} (checkpoint: "
                        f"{saved.get('arch')!r}); drop these flags (the model is rebuilt from the checkpoint) or "
                        "start a new run")
    if explicit.get("recipe") not in (None, saved.get("recipe", "iccv")):
        raise ByotError(f"{source} was trained with --recipe {saved.get('recipe', 'iccv')}; a resume continues its "
                        f"recipe: drop --recipe {explicit['recipe']}, or start a new run with it")
    # None meant "the data set's own size": a given --image-size is compared with the size it became
    check_same_model(build_config({}, saved), build_config(saved, explicit), source, checkpoint.get("image_size"))
    saved.pop("device", None)  # where it ran before says nothing about where it runs now
    # a tune trial's --no-final-test is the tuner's choice for that command: a resume that trains a trial
    # on (by hand) tests it at the end, unless the command line says --no-final-test again
    saved.pop("final_test", None)
    # where it wrote before neither: the run directory comes from the command line, or from where the
    # checkpoint lies (continue the run it belongs to), never from the file's contents, so a checkpoint
    # received from elsewhere cannot make this run write into a path of its choosing
    saved.pop("save_folder", None)
    own = own_save_folder(Path(explicit["resume"]), saved.get("arch", ""))
    if own is not None and "save_folder" not in explicit:
        explicit["save_folder"] = own
    cfg = build_config(saved, explicit)
    if allow_changes is False:
        _refuse_learning_changes(checkpoint, cfg, source)
    return cfg, checkpoint



def _refuse_learning_changes(checkpoint: dict, cfg: TrainConfig, source: str) -> None:
    changes = {k: v for k, v in recorded_changes(checkpoint, cfg).items() if k not in EXTENDABLE}
    if changes:
        raise ByotError(f"{source} was trained with other learning options: {describe_changes(changes)}; drop "
                        "these flags to continue the run as it was trained, add --allow-changes to go on with them "
                        "(the change is recorded), or start a new run")



def recorded_changes(checkpoint: dict, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``learning_changes`` from the checkpoint's config to ``cfg``, over the options the checkpoint records:
    a reference-script checkpoint records its model alone, and what it learned with is not known."""
    before = trained_config(checkpoint)
    recorded = checkpoint.get("config", {})
    return {k: v for k, v in learning_changes(before, cfg).items() if k in recorded} if before else {}



def trained_config(checkpoint: dict) -> TrainConfig | None:
    """The config a checkpoint's run was trained with, or None when this byot cannot read it."""
    try:
        return build_config({}, dict(checkpoint.get("config", {})))
    except ByotError as e:
        log.debug("the checkpoint's config: %s", e)
        return None



def own_save_folder(checkpoint_path: Path, arch: str) -> str | None:
    """SAVE_FOLDER of the run directory a checkpoint lies in (SAVE_FOLDER/ARCH/file), else None."""
    folder = checkpoint_path.expanduser().parent
    return str(folder.parent) if arch and folder.name == arch else None



def find_resumable(run_dir: Path) -> tuple[str | None, dict | None]:
    """The newest readable checkpoint of ``run_dir`` (latest, else previous) and its contents, read once;
    (None, None) for a new run."""
    for name in (LATEST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path)
        except ByotError as e:
            log.warning("--resume auto: skipping %s: %s", path, e)
            continue
        log.info("--resume auto: continuing from %s", path)
        return str(path), state
    log.info("--resume auto: no checkpoint in %s; starting a new run", run_dir)
    return None, None
