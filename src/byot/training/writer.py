"""Every write a training run makes into its run directory, through one writer: at the start (config.yaml,
the metrics cut back to the checkpoint's epoch, what a crash left), after each epoch (the metrics line and
the checkpoints, in the order that makes a crash between any two harmless, and TensorBoard), and the one test
result. Under torchrun only the main process writes; the others hold a writer that writes nothing."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from byot.config import TrainConfig, save_yaml
from byot.errors import ByotError, describe_os_error
from byot.runs.atomic import write_text_atomic
from byot.runs.faults import fault_point
from byot.runs.rundir import BEST, LATEST, METRICS, PREVIOUS, TEST_RESULT
from byot.runs.runfiles import open_tensorboard, reset_metrics, write_tensorboard
from byot.runs.signals import critical_section
from byot.training.checkpoint import remove_stale_temporaries, save_checkpoint

log = logging.getLogger("byot")


class RunWriter:
    """The run directory's one writer (``active``: this process writes; under torchrun, rank 0)."""

    def __init__(self, run_dir: Path, active: bool) -> None:
        self.run_dir, self.active, self.tensorboard = run_dir, active, None

    def start(self, cfg: TrainConfig, start_epoch: int, extra: dict[str, Any]) -> None:
        """Before the first epoch: remove what a crash left, write config.yaml (with ``extra``: classes,
        version, world size, history), cut metrics.jsonl back to ``start_epoch``, open TensorBoard."""
        if not self.active:
            return
        run_dir = self.run_dir
        for stale in remove_stale_temporaries(run_dir):
            log.warning("removed %s, a checkpoint write that a crash cut short", stale)
        try:
            save_yaml(cfg, run_dir / "config.yaml", extra)
        except OSError as e:
            raise ByotError(f"cannot write {run_dir / 'config.yaml'}: {describe_os_error(e)}") from e
        reset_metrics(run_dir / METRICS, start_epoch)
        if start_epoch < cfg.epochs and (run_dir / TEST_RESULT).exists():  # a resume that extends a finished run:
            (run_dir / TEST_RESULT).unlink()  # its one test result is of the shorter run; the new one comes at the end
            log.info("removed %s of the run's earlier end; it is redone after epoch %d", TEST_RESULT, cfg.epochs)
        self.tensorboard = open_tensorboard(run_dir)

    def epoch(self, record: dict[str, Any], state: dict[str, Any], improved: bool) -> None:
        """Metrics line, then model_best (if it improved), then checkpoint_latest (the old one kept as
        checkpoint_previous), with signals deferred until all three are on disk; then TensorBoard.

        The order makes a crash between any two writes harmless: a resume starts from checkpoint_latest's
        epoch, drops metrics lines after it, and redoes the lost epoch exactly, rewriting model_best if needed.
        """
        if not self.active:
            return
        run_dir = self.run_dir
        with critical_section():
            try:
                with open(run_dir / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise ByotError(f"could not append to {run_dir / METRICS}: {describe_os_error(e)}; the checkpoints "
                                "of finished epochs are intact") from e
            fault_point("after_metrics")
            if improved:
                save_checkpoint(state, run_dir / BEST)
            save_checkpoint(state, run_dir / LATEST, previous=run_dir / PREVIOUS)
        write_tensorboard(self.tensorboard, record)

    def test_result(self, result: dict[str, Any]) -> None:
        if self.active:
            write_text_atomic(self.run_dir / TEST_RESULT, json.dumps(result, indent=1) + "\n")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
