"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True``."""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from byot.errors import ByotError, describe_os_error
from byot.runs.atomic import write_atomic
from byot.runs.faults import fault_point, reached
from byot.runs.rundir import stale_temporaries, write_lock
from byot.training.reference import convert_reference, is_reference_checkpoint
from byot.version import __version__

FORMAT_PREFIX = "byot-checkpoint-"
FORMAT = FORMAT_PREFIX + "v1"  # raised when the layout of a checkpoint changes incompatibly
DIGEST = "_loaded_sha256"  # set by load_checkpoint (the file's SHA-256 as read); never written


def save_checkpoint(state: dict[str, Any], path: Path, previous: Path | None = None) -> None:
    """Write ``state`` to ``path`` so that a crash leaves either the old file or the new, never half.

    With ``previous``, the file ``path`` held until now becomes ``previous`` (a hard link, renamed into
    place), so at every instant ``path`` holds a complete checkpoint and ``previous`` the one before it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ByotError(f"could not write checkpoint {path}: {describe_os_error(e)}") from e
    with write_lock(path.parent):
        _save_locked(state, path, previous)


class _RecordingFile:
    """A file object for torch.save that remembers the OSError of a failed write: torch reports it as a
    RuntimeError ("unexpected pos ...") that says nothing of the disk."""

    def __init__(self, f: IO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            if reached("disk_full"):  # the fault-injection tests' full disk, where no small file system can be made
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, f: IO) -> None:
    recording = _RecordingFile(f)
    try:
        torch.save(obj, recording)
    except RuntimeError:
        if recording.error is not None:
            raise recording.error from None
        raise


def _keep_as(path: Path, previous: Path) -> None:
    """``previous`` becomes a copy of ``path`` (a hard link where the file system has them) atomically."""
    staged = previous.with_name(f".{previous.name}.tmp-{os.getpid()}")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:
        shutil.copy2(path, staged)
    os.replace(staged, previous)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the half-written ``.NAME.tmp-PID`` files a crash during a write left in ``folder``: only
    those whose writer (the PID in the name) is gone; another process's write in progress is left alone."""
    stale = stale_temporaries(folder)
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a byot checkpoint on the CPU. Plain tensors and containers only: a file cannot run code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ByotError(f"no checkpoint at {path}; pass --resume PATH of a .pth.tar file a byot run wrote")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ByotError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or holds objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"cannot read checkpoint {path} (truncated, corrupt or not a byot checkpoint): {first}") from e
    if is_reference_checkpoint(state):  # the published reference script's own files
        state = convert_reference(state, str(path))
    elif not isinstance(state, dict) or not str(state.get("format", "")).startswith(FORMAT_PREFIX):
        raise ByotError(f"{path} is not a byot checkpoint (no '{FORMAT}' marker) nor one of the reference "
                        "script's ({'epoch', 'arch', 'state_dict', 'best_prec1'})")
    elif state["format"] != FORMAT:
        raise ByotError(f"{path} was written by byot {state.get('version', '?')} in checkpoint format "
                        f"{state['format']}; this byot ({__version__}) reads {FORMAT}: use a byot version that "
                        "reads it")
    problem = checkpoint_problem(state)
    if problem:
        raise ByotError(f"{path} is damaged or was edited by hand: {problem}")
    state[DIGEST] = hashlib.sha256(data).hexdigest()
    return state


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_numbers(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_number(t) and t > 0 for t in v)


def _str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(c, str) for c in v)


def _tensors(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _count(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


# field -> (what it must be, check); every byot run writes each of these (see byot.training.session.checkpoint_state)
REQUIRED_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "arch": ("a string", lambda v: isinstance(v, str)),
    "num_classes": ("an integer >= 1", lambda v: _count(v, 1)),
    "classes": ("a list of class names", _str_list),
    "image_size": ("an integer >= 1", lambda v: _count(v, 1)),
    "config": ("a mapping of options", lambda v: isinstance(v, dict)),
    "epoch": ("an integer >= 0", lambda v: _count(v, 0)),
    "best_top1": ("a finite number", _is_number),
    "model": ("a mapping of tensor names to tensors", _tensors),
    "optimizer": ("an optimizer state (state, param_groups)",
                  lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list)),
    "rng": ("RNG states (a uint8 tensor under 'torch')",
            lambda v: isinstance(v, dict) and isinstance(v.get("torch"), torch.Tensor)
            and v["torch"].dtype == torch.uint8),
}
OPTIONAL_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "scaler": ("a mapping", lambda v: isinstance(v, dict)),
    "nonfinite_steps": ("an integer >= 0", lambda v: _count(v, 0)),
    "world_size": ("an integer >= 1", lambda v: _count(v, 1)),
    "model_spec": ("a mapping", lambda v: isinstance(v, dict)),
    "normalization": ("[mean, std] of 3 numbers each",
                      lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(
                          isinstance(x, (list, tuple)) and len(x) == 3 and all(_is_number(t) for t in x) for x in v)),
    # fitted after training: byot 0.5.0 wrote these two into the checkpoint; byot now writes them to the policy
    # file beside it (byot.deploy.policy_file), which checks them with the same rules
    "calibration": ("a mapping whose 'temperatures' are positive numbers",
                    lambda v: isinstance(v, dict) and _positive_numbers(v.get("temperatures"))),
    "early_exit": ("a mapping of 'thresholds' (numbers), 'temperatures' (positive numbers) and 'final'",
                   lambda v: isinstance(v, dict) and isinstance(v.get("thresholds"), (list, tuple))
                   and all(isinstance(t, (int, float)) and not isinstance(t, bool) and not math.isnan(t)
                           for t in v["thresholds"])
                   and _positive_numbers(v.get("temperatures", [])) and v.get("final", "deepest") in
                   ("deepest", "ensemble")),
}


def checkpoint_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a checkpoint's fields, or None: hand-edited or damaged files
    are refused on load, not half-used."""
    reference = state.get("reference") is not None  # converted from the reference script: weights only
    for name, (what, ok) in REQUIRED_FIELDS.items():
        if reference and name in ("optimizer", "rng"):
            continue
        if name not in state:
            return f"it has no '{name}' field"
        if not ok(state[name]):
            return f"'{name}' must be {what}"
    for name, (what, ok) in OPTIONAL_FIELDS.items():
        if state.get(name) is not None and not ok(state[name]):
            return f"'{name}' must be {what}"
    if len(state["classes"]) != state["num_classes"]:
        return f"'classes' lists {len(state['classes'])} names for num_classes {state['num_classes']}"
    return None


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, as ``load_checkpoint`` records it in ``state[DIGEST]``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):  # 1 MiB at a time: checkpoints can be large
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def unchanged_checkpoint(path: Path, fitted_on: str | None) -> Iterator[None]:
    """Hold the write lock of ``path``'s folder while the checkpoint there is still the file of SHA-256
    ``fitted_on`` (``state[DIGEST]`` of ``load_checkpoint``): what was computed from it can be stored beside it.

    If the file has been rewritten since (a training run saving its next epoch), the values belong to other
    weights and are refused; every checkpoint write takes the same lock, so none can slip between the check
    and the caller's write.
    """
    with write_lock(path.parent):
        try:
            now = file_sha256(path)
        except OSError as e:
            raise ByotError(f"cannot read checkpoint {path}: {describe_os_error(e)}") from e
        if fitted_on is not None and now != fitted_on:
            raise ByotError(f"{path} changed while this command ran (was it rewritten by a training run?): "
                            "what was fitted on the weights read before is not stored; run the command again")
        yield


def _save_locked(state: dict[str, Any], path: Path, previous: Path | None = None) -> None:
    """save_checkpoint for a caller that holds the folder's write lock (flock is per open file, so
    taking it again here would wait for ourselves)."""
    state = {k: v for k, v in state.items() if k not in ("format", DIGEST)}

    def before_rename() -> None:
        fault_point("checkpoint_write")
        if previous is not None and path.exists():
            _keep_as(path, previous)

    try:
        write_atomic(path, "wb", lambda f: _torch_save({"format": FORMAT, **state}, f), before_rename)
    except OSError as e:
        raise ByotError(f"could not write checkpoint {path}: {describe_os_error(e)}; the previous file is "
                        "intact") from e


def rng_state() -> dict[str, Any]:
    """Global torch RNG states (data randomness is derived from (seed, epoch) and needs none)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
