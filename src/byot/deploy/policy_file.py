"""The policy file: what ``byot calibrate`` and ``byot early-exit`` fitted for one checkpoint, kept beside it.

A checkpoint is never rewritten after training. The temperatures (``calibration``) and the fitted thresholds
(``early_exit``) go to ``CHECKPOINT.policy.json``, a JSON file that also holds the checkpoint's SHA-256:

    {"format": "byot-policy-v1", "checkpoint": "model_best.pth.tar", "checkpoint_sha256": "9f2c...",
     "byot_version": "0.6.0",
     "calibration": {"temperatures": [1.08, 1.05, 1.03, 1.02], "weights": "raw", "split": "val", ...},
     "early_exit": {"thresholds": [0.93, 0.9, 0.88], "temperatures": [], "final": "deepest",
                    "criterion": {"max_drop": 1.0}, "fitted_on": "val", "weights": "raw", "val": {...}, ...}}

A policy file whose hash is not the checkpoint's (the checkpoint was retrained or replaced since) is never
applied. Checkpoints written by byot 0.5.0 hold the same two entries inside; they are read there when no
policy file exists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byot.errors import ByotError, describe_os_error
from byot.runs.atomic import write_text_atomic
from byot.training.checkpoint import (
    DIGEST,
    OPTIONAL_FIELDS,
    file_sha256,
    unchanged_checkpoint,
)
from byot.version import __version__

log = logging.getLogger("byot")

POLICY_SUFFIX = ".policy.json"  # the policy file of CHECKPOINT is CHECKPOINT + this
POLICY_FORMAT = "byot-policy-v1"  # raised when the layout of a policy file changes incompatibly
ENTRIES = ("calibration", "early_exit")  # what a policy file holds (and a byot 0.5.0 checkpoint held)


@dataclass(frozen=True)
class Fitted:
    """The values fitted for one checkpoint, as ``calibrate`` and ``early-exit`` store them."""

    entries: dict[str, dict] = field(default_factory=dict)  # "calibration" / "early_exit" -> the stored entry
    source: str = "the checkpoint"  # where they were read, for messages
    stale: str | None = None  # why they must not be applied: the policy file belongs to another checkpoint

    def get(self, name: str) -> dict[str, Any]:
        """The entry ``name`` ({} when nothing was fitted); a stale policy file is refused here, where its
        values would be used, so a command that uses none of them (--threshold with --no-calibration) runs."""
        if self.stale:
            raise ByotError(self.stale)
        return self.entries.get(name) or {}


def policy_path(checkpoint_path: Path) -> Path:
    """``model_best.pth.tar`` -> ``model_best.pth.tar.policy.json`` in the same folder."""
    return checkpoint_path.with_name(checkpoint_path.name + POLICY_SUFFIX)


def read_fitted(checkpoint_path: Path, checkpoint: dict[str, Any]) -> Fitted:
    """The policy file beside ``checkpoint_path``; without one, what a byot 0.5.0 checkpoint holds inside.

    ``checkpoint``: the file as ``load_checkpoint`` read it (its SHA-256 in ``checkpoint[DIGEST]``).
    """
    path = policy_path(checkpoint_path)
    if not path.exists():
        return Fitted({k: checkpoint[k] for k in ENTRIES if checkpoint.get(k)}, f"the checkpoint {checkpoint_path}")
    stored = _parse(path)
    if stored["checkpoint_sha256"] != _digest(checkpoint_path, checkpoint):
        return Fitted(stale=f"{path} was fitted on another checkpoint than {checkpoint_path} (their SHA-256 differ: "
                            "retrained or replaced since), so it is not applied; run byot calibrate again (it "
                            f"replaces the file), or delete {path}")
    return Fitted({k: stored[k] for k in ENTRIES if stored.get(k)}, f"the policy file {path}")


def store_fitted(checkpoint_path: Path, checkpoint: dict[str, Any], name: str, entry: dict[str, Any]) -> Path:
    """Put ``entry`` under ``name`` ("calibration" or "early_exit") in the checkpoint's policy file, keeping the
    other entry; returns the file's path. The checkpoint itself is only read.

    Refused if the checkpoint changed since ``checkpoint`` was read from it (the values belong to the weights
    read then); a policy file of another checkpoint is replaced, its other entry dropped.
    """
    digest = _digest(checkpoint_path, checkpoint)
    path = policy_path(checkpoint_path)
    with unchanged_checkpoint(checkpoint_path, digest):  # the check and the write under the folder's write lock
        fitted = read_fitted(checkpoint_path, checkpoint)
        if fitted.stale:
            log.warning("replacing %s: it was fitted on another checkpoint than %s (its SHA-256 differs)", path,
                        checkpoint_path)
            fitted = Fitted({k: checkpoint[k] for k in ENTRIES if checkpoint.get(k)})  # a 0.5.0 file's own
        entries = {**fitted.entries, name: entry}
        state = {"format": POLICY_FORMAT, "checkpoint": checkpoint_path.name, "checkpoint_sha256": digest,
                 "byot_version": __version__, **{k: entries[k] for k in ENTRIES if k in entries}}
        write_text_atomic(path, json.dumps(state, indent=2, allow_nan=False) + "\n")
    return path


def _digest(checkpoint_path: Path, checkpoint: dict[str, Any]) -> str:
    """The SHA-256 of the checkpoint file as it was read (load_checkpoint records it), else as it is now."""
    if checkpoint.get(DIGEST):
        return checkpoint[DIGEST]
    try:
        return file_sha256(checkpoint_path)
    except OSError as e:
        raise ByotError(f"cannot read checkpoint {checkpoint_path}: {describe_os_error(e)}") from e


def _parse(path: Path) -> dict[str, Any]:
    """The policy file's contents, checked: a damaged or hand-edited file is refused, not half-used."""
    try:
        state = json.loads(path.read_text())
    except OSError as e:
        raise ByotError(f"cannot read policy file {path}: {describe_os_error(e)}") from e
    except ValueError as e:  # not JSON, or not UTF-8
        raise ByotError(f"policy file {path} is not valid JSON ({e}); delete it and fit again") from e
    problem = _problem(state)
    if problem:
        raise ByotError(f"policy file {path} is damaged or was edited by hand: {problem}; delete it and fit again")
    return state


def _problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return "it is not a JSON object"
    if state.get("format") != POLICY_FORMAT:
        return f"its format is {state.get('format')!r}, this byot ({__version__}) reads {POLICY_FORMAT!r}"
    if not isinstance(state.get("checkpoint_sha256"), str):
        return "it has no 'checkpoint_sha256'"
    for name in ENTRIES:  # the same checks as the entries a byot 0.5.0 checkpoint holds
        what, ok = OPTIONAL_FIELDS[name]
        if state.get(name) is not None and not ok(state[name]):
            return f"'{name}' must be {what}"
    return None
