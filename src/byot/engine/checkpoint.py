"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from byot import __version__
from byot.engine.faults import fault_point
from byot.errors import ByotError

FORMAT_PREFIX = "byot-checkpoint-"
FORMAT = FORMAT_PREFIX + "v1"  # raised when the layout of a checkpoint changes incompatibly


def save_checkpoint(state: dict[str, Any], path: Path, previous: Path | None = None) -> None:
    """Write ``state`` to ``path`` so that a crash leaves either the old file or the new, never half.

    With ``previous``, the file ``path`` held until now becomes ``previous`` (a hard link, renamed into
    place), so at every instant ``path`` holds a complete checkpoint and ``previous`` the one before it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)

    def before_rename() -> None:
        fault_point("checkpoint_write")
        if previous is not None and path.exists():
            _keep_as(path, previous)

    try:
        _write_atomic(path, "wb", lambda f: torch.save({"format": FORMAT, **state}, f), before_rename)
    except OSError as e:
        raise ByotError(f"could not write checkpoint {path}: {e.strerror or e}; the previous file is intact") from e


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s contents with ``text`` so that a crash leaves the old contents or the new."""
    _write_atomic(path, "w", lambda f: f.write(text))


def _write_atomic(path: Path, mode: str, write: Callable[[IO], Any],
                  before_rename: Callable[[], None] | None = None) -> None:
    """``write`` into a temporary file beside ``path``, sync it, rename it over ``path``, sync the folder.
    The temporary file (``.NAME.tmp-PID``) never outlives the call."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        _sync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _keep_as(path: Path, previous: Path) -> None:
    """``previous`` becomes a copy of ``path`` (a hard link where the file system has them) atomically."""
    staged = previous.with_name(f".{previous.name}.tmp-{os.getpid()}")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:
        shutil.copy2(path, staged)
    os.replace(staged, previous)


def _sync_dir(folder: Path) -> None:
    """Make the renames durable (a power cut after rename could otherwise lose them)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself stays atomic
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the half-written ``.NAME.tmp-PID`` files a crash during a checkpoint write left in ``folder``."""
    stale = [p for p in folder.glob(".*.tmp-*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a byot checkpoint on the CPU. Plain tensors and containers only: a file cannot run code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ByotError(f"no checkpoint at {path}; pass --resume PATH of a .pth.tar file a byot run wrote")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or holds objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"cannot read checkpoint {path} (truncated, corrupt or not a byot checkpoint): {first}") from e
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith(FORMAT_PREFIX):
        raise ByotError(f"{path} is not a byot checkpoint (no '{FORMAT}' marker)")
    if state["format"] != FORMAT:
        raise ByotError(f"{path} was written by byot {state.get('version', '?')} in checkpoint format "
                        f"{state['format']}; this byot ({__version__}) reads {FORMAT}: use a byot version that "
                        "reads it")
    return state


def update_checkpoint(path: str | Path, entries: dict[str, Any]) -> None:
    """Add or replace top-level ``entries`` (a calibration, a fitted exit policy) in the checkpoint at
    ``path``, atomically: a crash leaves the old file."""
    state = load_checkpoint(path)
    state.update(entries)
    state.pop("format", None)
    save_checkpoint(state, Path(path).expanduser())


def rng_state() -> dict[str, Any]:
    """Global torch RNG states (data randomness is derived from (seed, epoch) and needs none)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
