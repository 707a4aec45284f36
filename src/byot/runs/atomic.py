"""Atomic writes: a file is replaced by a complete new one or left as it was, whatever stops the process."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from byot.errors import ByotError, describe_os_error


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s contents with ``text`` so that a crash leaves the old contents or the new."""
    try:
        write_atomic(path, "w", lambda f: f.write(text))
    except OSError as e:
        raise ByotError(f"could not write {path}: {describe_os_error(e)}; its previous contents are intact") from e


def write_atomic(path: Path, mode: str, write: Callable[[IO], Any],
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
        sync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sync_dir(folder: Path) -> None:
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
