"""What a training run writes into its run directory besides checkpoints: the checks before its first write,
the log, the metrics lines, the TensorBoard events, and their readers (the sweep's, the resume's)."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
from pathlib import Path
from typing import Any

from byot.config import (
    TrainConfig,
)
from byot.errors import ByotError, describe_os_error
from byot.runs.atomic import write_text_atomic
from byot.runs.rundir import LATEST, METRICS, TEST_RESULT
from byot.runs.signals import critical_section

log = logging.getLogger("byot")


def prepare_run_dir(cfg: TrainConfig, resume_path: str | None, overwrite: bool, main: bool = True) -> None:
    """Check that this run may write into its run directory (called with the run lock held, before
    anything of the new run is written); ``overwrite`` empties it later, once the data and model have loaded
    (``_fit_session``), so that a mistyped flag never costs the old run."""
    run_dir = cfg.run_dir
    holds_run = (run_dir / LATEST).exists()
    inside = resume_path is not None and Path(resume_path).expanduser().resolve().parent == run_dir.resolve()
    if overwrite and inside:
        raise ByotError(f"--overwrite would delete {resume_path}, the checkpoint this run resumes from; drop "
                        "--overwrite to continue the run, or drop --resume to start afresh")
    if holds_run and not overwrite and resume_path is None:
        raise ByotError(f"{run_dir} already holds a run; continue it with --resume {run_dir / LATEST}, "
                        "or choose another --save-folder, or add --overwrite")
    if holds_run and not overwrite and not inside:  # the resumed run would mix its files with another run's
        raise ByotError(f"{run_dir} holds another run than {resume_path}'s; resume into an empty --save-folder "
                        "(or the checkpoint's own), or add --overwrite to replace that run")
    if resume_path is not None and not inside:
        log.info("resuming %s into the run directory %s", resume_path, run_dir)
    if main:  # (other processes: rank 0 writes here)
        _probe_write(run_dir)



def _probe_write(run_dir: Path) -> None:
    probe = run_dir / ".write-probe"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
    except OSError as e:
        raise ByotError(f"cannot write to the run directory {run_dir}: {describe_os_error(e)}") from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)  # a full disk may have created it empty before refusing the bytes



class RunLog:
    """The run's log_train.txt receives every log line of the run (rank 0 only). Lines are held in memory
    until ``start`` opens the file: an ``--overwrite`` removes the old run's log only after the data and model
    have loaded, and the lines logged while they loaded still reach the new log."""

    def __init__(self, run_dir: Path, main: bool) -> None:
        self.path, self.main, self.file = run_dir / "log_train.txt", main, None
        self.buffer = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        self.buffer.setLevel(logging.DEBUG)
        if main:
            logging.getLogger("byot").addHandler(self.buffer)

    def start(self) -> None:
        if not self.main or self.file is not None:
            return
        try:
            self.file = logging.FileHandler(self.path, errors="backslashreplace")
        except OSError as e:
            raise ByotError(f"cannot write to the run directory {self.path.parent}: {describe_os_error(e)}") from e
        self.file.setLevel(logging.DEBUG)
        self.file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        logger = logging.getLogger("byot")
        logger.removeHandler(self.buffer)
        logger.addHandler(self.file)

    def close(self) -> None:
        """Detach; lines of a run that failed before ``start`` are appended to the log all the same."""
        if self.main and self.file is None:
            with contextlib.suppress(ByotError):
                self.start()
        logger = logging.getLogger("byot")
        for handler in (self.buffer, self.file):
            if handler is not None:
                logger.removeHandler(handler)
                handler.close()



def reset_metrics(path: Path, last_epoch: int) -> None:
    """Keep the metrics of epochs the checkpoint has seen (a crash may have logged one more, or cut a
    line short); the file is rewritten, atomically, only when something must go."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _epoch_of(line) is not None and _epoch_of(line) <= last_epoch]
    if kept != lines:
        with critical_section():
            write_text_atomic(path, "".join(line + "\n" for line in kept))



def read_test_result(run_dir: Path) -> dict[str, Any] | None:
    """The run's test_result.json, or None when it is missing or unreadable (a crash while writing it)."""
    try:
        result = json.loads((run_dir / TEST_RESULT).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and "exits" in result else None



def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records, in order; a line a crash cut short is left out."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records



def _epoch_of(line: str) -> int | None:
    """The epoch of a metrics line; None for a line a crash cut short."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None



def open_tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no event files are written (pip install tensorboard)")
        return None
    return SummaryWriter(str(run_dir))



def write_tensorboard(writer: Any, record: dict[str, Any]) -> None:
    if writer is None:
        return
    step = record["epoch"]
    writer.add_scalar("lr", record["lr"], step)
    for name, value in record["losses"].items():
        writer.add_scalar(f"train/{name}", value, step)
    for e in record["exits"]:
        writer.add_scalar(f"{record['eval_split']}/top1_exit{e['exit']}", e["top1"], step)
    writer.add_scalar(f"{record['eval_split']}/top1_ensemble", record["ensemble"]["top1"], step)
    writer.add_scalar("train/images_per_s", record["train_images_per_s"], step)
    writer.flush()
