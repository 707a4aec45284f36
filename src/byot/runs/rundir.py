"""One run directory, one writer: an exclusive lock held for the whole run, and the list of byot's own files.

Two ``byot train`` processes on one run directory would interleave their metrics, swap each other's
checkpoints and delete each other's temporary files. A run therefore holds an OS file lock
(``flock`` on ``RUN_DIR/.byot-run.lock``) from before its first write until it ends; the kernel releases
it when the process dies in any way, kill -9 included, so a lock is never stale. The lock file holds the
PID of its holder, named in the refusal a second process gets.

``--overwrite`` removes every file byot writes into a run directory (``clear_run``), and only those,
once the new run's data and model have loaded and before it writes anything, so no file of the old run (a ``checkpoint_previous``, a
``test_result.json``, TensorBoard events) survives to be mistaken for the new run's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from byot.errors import ByotError, describe_os_error

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected against a second writer
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("byot")

LATEST, BEST, METRICS = "checkpoint_latest.pth.tar", "model_best.pth.tar", "metrics.jsonl"
PREVIOUS = "checkpoint_previous.pth.tar"  # the epoch before LATEST: the fallback of --resume auto
TEST_RESULT = "test_result.json"  # with --val-split: the one test evaluation, of model_best
LOCK_NAME = ".byot-run.lock"
WRITE_LOCK_NAME = ".byot-write.lock"  # held only while a checkpoint file is replaced
# what a run writes into its directory; globs allowed
RUN_FILES = (LATEST, PREVIOUS, BEST, METRICS, TEST_RESULT, "config.yaml", "log_train.txt", "events.out.tfevents.*",
             "confusion_exit*.csv", "confusion_exit*.png", ".write-probe",
             "*.pth.tar.policy.json")  # byot calibrate's and early-exit's fits, beside their checkpoint
TEMPORARIES = ".*.tmp-*"  # .NAME.tmp-PID: a write in progress, or what a crash left
RUN_FOLDERS = {"early_exit": ("curve.json", "curve.csv", "curve.png")}  # byot early-exit's default --out

_held: dict[Path, int] = {}  # resolved run directory -> the fd holding its lock in this process


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ByotError(f"cannot write to the run directory {path.parent}: {describe_os_error(e)}") from e


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s exclusive lock for the block; a second process is refused at once, naming the
    holder's PID. Taking it again in the process that holds it is a no-op (a caller of ``fit`` may hold it)."""
    key = Path(run_dir).resolve()
    if key in _held:  # the outer holder releases it
        yield
        return
    fd = _open_lock_file(Path(run_dir) / LOCK_NAME)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            raise ByotError(f"{run_dir} is in use by another byot process (PID {holder}); wait for it to end or "
                            "stop it, or choose another --save-folder") from e
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise ByotError(f"cannot write to the run directory {run_dir}: {describe_os_error(e)}") from e
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the lock; the file stays (unlinking it would race with the next opener)


@contextlib.contextmanager
def write_lock(folder: Path) -> Iterator[None]:
    """Serialise replacing checkpoint files of ``folder`` between processes (training writing its epoch,
    ``byot calibrate`` storing temperatures into a checkpoint of the same folder). Held for one write."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(Path(folder) / WRITE_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield  # a folder we cannot create files in: the write itself reports the problem
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def stale_temporaries(folder: Path) -> list[Path]:
    """The ``.NAME.tmp-PID`` files in ``folder`` whose writer (the PID in the name) is gone: what a crash
    during a write left. Another process's write in progress is not among them."""
    return sorted(p for p in folder.glob(TEMPORARIES) if p.is_file() and not pid_alive(_writer_pid(p)))


def _writer_pid(path: Path) -> int:
    tail = path.name.rsplit(".tmp-", 1)[-1]
    digits = tail.split(".", 1)[0]  # export's temporaries keep a suffix: ".x.onnx.tmp-123.onnx"
    return int(digits) if digits.isdigit() else 0


def run_files(run_dir: Path) -> list[Path]:
    """The files byot wrote into ``run_dir`` (never another program's), and its own sub-folders' files;
    temporaries only where their writer is gone."""
    found: list[Path] = stale_temporaries(run_dir)
    for pattern in RUN_FILES:
        found += [p for p in run_dir.glob(pattern) if p.is_file() or p.is_symlink()]
    for folder, names in RUN_FOLDERS.items():
        found += [run_dir / folder / n for n in names if (run_dir / folder / n).is_file()]
    return sorted(set(found))


def clear_run(run_dir: Path) -> list[Path]:
    """``--overwrite``: remove every file of the old run (see ``run_files``); folders byot made are
    removed when they are left empty. Call with the run lock held. Returns what was removed."""
    try:
        with write_lock(run_dir):  # no checkpoint replaced (byot calibrate) while the old run goes
            removed = run_files(run_dir)
            for path in removed:
                path.unlink()
        for folder in RUN_FOLDERS:
            if (run_dir / folder).is_dir() and not any((run_dir / folder).iterdir()):
                (run_dir / folder).rmdir()
    except OSError as e:
        raise ByotError(f"--overwrite: cannot remove {e.filename} of the old run: {e.strerror or e}") from e
    if removed:
        log.info("--overwrite: removed %d file(s) of the earlier run in %s", len(removed), run_dir)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["BEST", "LATEST", "LOCK_NAME", "METRICS", "PREVIOUS", "TEST_RESULT", "clear_run", "pid_alive", "run_files",
           "run_lock", "stale_temporaries", "write_lock"]
