"""A ``byot train`` run that a parent command (``byot sweep``, ``byot tune``) starts in a child process: the
options file it reads, its command, and whether a run directory already holds that run (kept, continued or
redone). The sweep and the tuner share this module and never import each other; processes and signals are
``byot.runs.children``'s.

A run is kept, or resumed, only when it was trained with the options asked for now: the ``config.yaml`` each
run writes at its start is compared, field by field, with the config the parent would give its child. Fields
in ``UNCOMPARED`` change neither what is learned nor what is measured and are ignored; ``data_dir`` is
compared as the absolute folder it names; fields a run's config.yaml lacks (an older byot) count as their
defaults. A run whose options differ, or that left files but no readable config.yaml, is redone from scratch
(``byot train --overwrite``), never resumed."""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from byot.config import FIELD_NAMES, MODEL_FIELDS, TrainConfig, build_config, load_yaml, model_identity
from byot.errors import ByotError
from byot.runs.rundir import run_files
from byot.runs.runfiles import read_metrics, read_test_result

log = logging.getLogger("byot")

OPTIONS_FILE = "sweep_options.yaml"  # in each run root: the --config its byot train child reads
# TrainConfig fields that change neither what a run learns nor what it measures: a stored run that differs
# from what its parent asks only in these is kept. save_folder: the runs may have moved with their parent's folder.
UNCOMPARED = ("resume", "progress", "print_freq", "workers", "device", "save_folder", "download")


def slug(name: str) -> str:
    """A row name as a folder name: lower case, runs of other characters as one '-'."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not text:
        raise ByotError(f"name {name!r} has no letters or digits to name its folder; add some")
    return text


def child_command(arch: str, root: Path, redo: bool, final_test: bool = True) -> list[str]:
    """The ``byot train`` command of one run; it reads its options from ``root / OPTIONS_FILE``.
    ``redo``: the run directory's old run is removed first (--overwrite) instead of continued;
    ``final_test=False``: no test evaluation at the end (a tune trial: the tuner tests the best once)."""
    start = ["--overwrite"] if redo else ["--resume", "auto"]
    return [sys.executable, "-m", "byot", "train", arch, "--config", str(root / OPTIONS_FILE),
            "--save-folder", str(root), *start, "--no-progress", *([] if final_test else ["--no-final-test"])]


def write_options(root: Path, options: dict[str, Any]) -> None:
    """The options file ``child_command`` points at (arch travels as the command's argument)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / OPTIONS_FILE).write_text(yaml.safe_dump({k: v for k, v in options.items() if k != "arch"},
                                                         sort_keys=False))
    except OSError as e:
        raise ByotError(f"cannot write {root / OPTIONS_FILE}: {e.strerror or e}; choose another folder (--runs-dir, --out)") from e


def stored_config(run_dir: Path) -> TrainConfig | None:
    """The config a run wrote at its start (config.yaml), or None when it is missing or unreadable."""
    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        saved = load_yaml(run_dir / "config.yaml")
        return build_config({}, {k: v for k, v in saved.items() if k in FIELD_NAMES})  # not num_classes etc.
    except ByotError as e:
        log.debug("%s: %s", run_dir / "config.yaml", e)
        return None


def _comparable(name: str, value: Any) -> Any:
    if name == "data_dir" and value is not None:
        return str(Path(value).expanduser().resolve())
    return value


def config_changes(wanted: TrainConfig, run_dir: Path) -> list[str] | None:
    """The compared fields in which the run stored in ``run_dir`` differs from ``wanted``, as
    "name old -> new"; None when the run has no readable config.yaml."""
    stored = stored_config(run_dir)
    if stored is None:
        return None
    changes = []
    for name in FIELD_NAMES:  # the model's fields through their canonical identity (below), not as spelled
        old, new = (_comparable(name, getattr(c, name)) for c in (stored, wanted))
        if name not in (*UNCOMPARED, *MODEL_FIELDS) and old != new:
            changes.append(f"{name} {old} -> {new}")
    try:
        before = model_identity(stored)
    except ByotError as e:  # options an older byot wrote that this one does not take
        return [*changes, f"model ({e})"]
    after = model_identity(wanted)
    changes += [f"{k} {before.get(k)} -> {v}" for k, v in after.items() if before.get(k) != v]
    return changes


def finished(run_dir: Path, wanted: TrainConfig) -> dict[str, Any] | None:
    """The test result of a run that is complete and was trained with ``wanted``'s options, else None.

    With a validation split that is test_result.json (the one test evaluation of model_best); without,
    the last epoch's test-split record of metrics.jsonl.
    """
    if config_changes(wanted, run_dir) != []:
        return None
    records = read_metrics(run_dir)
    if not records or records[-1].get("epoch") != wanted.epochs:  # unfinished
        return None
    if wanted.val_split > 0:
        return read_test_result(run_dir)
    last = records[-1]
    if "exits" not in last or "ensemble" not in last:
        return None
    return {"epoch": wanted.epochs, "exits": last["exits"], "ensemble": last["ensemble"], "selected_on": "last epoch"}


@dataclass(frozen=True)
class Plan:
    action: str  # "keep" (finished with these options), "continue" (resume or start), "redo" (from scratch)
    why: str = ""  # for "redo": what differs
    result: dict[str, Any] | None = None  # for "keep"


def plan_run(run_dir: Path, wanted: TrainConfig) -> Plan:
    """What a parent (a sweep row, a tune trial) does with one run directory: keep a finished run of
    ``wanted``'s options, continue (resume or start) one, or redo one trained with other options."""
    changes = config_changes(wanted, run_dir)
    if changes is None:
        # files of a run without its config: nothing says which options made them
        return Plan("redo", "no readable config.yaml") if run_files(run_dir) else Plan("continue")
    if changes:
        return Plan("redo", f"options changed ({'; '.join(changes)})")
    result = finished(run_dir, wanted)
    return Plan("keep", result=result) if result is not None else Plan("continue")
