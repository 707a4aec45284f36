"""``fit``: one training run, from a configuration (and a checkpoint to continue) to its epochs' records. It
reads as a table of contents: build the session (``byot.training.session``), write through the run
directory's one writer (``byot.training.writer``), run the epochs, and with a validation split test
model_best once at the end."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from byot.config import TrainConfig
from byot.runs.rundir import BEST, LATEST, clear_run, run_lock
from byot.runs.runfiles import RunLog, prepare_run_dir, read_test_result
from byot.training.build import load_model_state
from byot.training.checkpoint import load_checkpoint
from byot.training.distributed import DistContext, barrier, launched_by_torchrun, shutdown
from byot.training.evaluate import evaluate
from byot.training.runtime import precision_name
from byot.training.session import Session, build_session, checkpoint_state, config_history, log_start
from byot.training.train import NonFiniteGuard, lr_at, train_one_epoch
from byot.training.writer import RunWriter
from byot.version import __version__

log = logging.getLogger("byot")


def fit(cfg: TrainConfig, checkpoint: dict | None = None, overwrite: bool = False,
        stop_after: int | None = None, on_epoch: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Train ``cfg`` (continuing ``checkpoint`` when given); returns one record per epoch run.

    ``stop_after`` ends the run after that many epochs of this call (an interruption, for tests).
    Launched by torchrun, every process trains its shard and rank 0 alone writes files.
    """
    ctx = launched_by_torchrun()
    # one writer per run directory, from before the first write to the end (rank 0 writes for all)
    with run_lock(cfg.run_dir) if ctx.is_main else contextlib.nullcontext():
        prepare_run_dir(cfg, cfg.resume if checkpoint is not None else None, overwrite, ctx.is_main)
        run_log = RunLog(cfg.run_dir, ctx.is_main)
        try:
            records = _fit_session(cfg, checkpoint, ctx, overwrite, run_log, stop_after, on_epoch)
        finally:
            run_log.close()
    return records



def _fit_session(cfg: TrainConfig, checkpoint: dict | None, ctx: DistContext, overwrite: bool, run_log: RunLog,
                 stop_after: int | None, on_epoch: Callable[[dict], None] | None) -> list[dict[str, Any]]:
    session = build_session(cfg, checkpoint, ctx)
    if overwrite and ctx.is_main:  # data, device, model and checkpoint all fit: now the old run may go
        clear_run(cfg.run_dir)
    run_log.start()
    try:
        records = _fit(session, checkpoint, stop_after, on_epoch)
    except BaseException:
        if ctx.active:
            shutdown()
        raise
    if ctx.active:
        del session  # DistributedDataParallel's reducer goes before the group it talks through
        barrier()  # no process leaves while another still reduces
        shutdown()
    return records



def _fit(s: Session, checkpoint: dict | None, stop_after: int | None,
         on_epoch: Callable[[dict], None] | None) -> list[dict[str, Any]]:
    cfg = s.cfg
    start_epoch, best = (checkpoint["epoch"], checkpoint["best_top1"]) if checkpoint else (0, 0.0)
    s.config_history, changes = config_history(cfg, checkpoint, start_epoch)
    writer = RunWriter(cfg.run_dir, s.ctx.is_main)
    writer.start(cfg, start_epoch, {"num_classes": len(s.data.classes), "byot_version": __version__,
                                    "world_size": s.ctx.world_size,
                                    **({"history": s.config_history} if s.config_history else {})})
    log_start(s, start_epoch, best)
    records: list[dict[str, Any]] = []
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if stop_after is not None and len(records) >= stop_after:
                break
            record = _run_epoch(s, epoch)
            improved = record["exits"][-1]["top1"] >= best
            best = max(best, record["exits"][-1]["top1"])
            record["best_top1"] = best
            if changes and not records:
                record["config_changes"] = changes
            writer.epoch(record, checkpoint_state(s, epoch + 1, best) if writer.active else {}, improved)
            log.info(epoch_summary(record, cfg.epochs))
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        writer.close()
    completed = start_epoch + len(records) == cfg.epochs
    # the one test evaluation: after the last epoch, or on a resume of a run that ended before writing it
    if s.data.val is not None and cfg.final_test and completed and (records or read_test_result(cfg.run_dir) is None):
        final = _final_test(s, writer)
        if records:
            records[-1]["final_test"] = final
    return records



def _run_epoch(s: Session, epoch: int) -> dict[str, Any]:
    start = time.perf_counter()
    lr = lr_at(epoch, s.cfg.lr, s.cfg.epochs, s.cfg.schedule, s.cfg.warmup_epochs)
    for group in s.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    s.data.train.set_epoch(epoch)
    guard = NonFiniteGuard(s.cfg.skip_nonfinite, s.cfg.lr, s.nonfinite_steps)
    stats = train_one_epoch(s.forward, s.data.train, s.optimizer, s.loss_fn, s.runtime, s.scaler,
                            s.model.exit_stages, epoch, s.cfg.print_freq, s.cfg.progress, s.cfg.accum_steps, guard,
                            s.ema.update if s.ema is not None else None)
    s.nonfinite_steps = stats["nonfinite_steps"]
    split = "val" if s.data.val is not None else "test"
    held_out = s.data.val if s.data.val is not None else s.data.test  # (an empty split is refused when loading)
    result = evaluate(s.forward, held_out, s.eval_runtime, s.model.exit_stages)
    averaged = {}
    if s.ema is not None:
        scored = evaluate(s.ema.module, held_out, s.eval_runtime, s.model.exit_stages)
        averaged = {"ema": {"exits": scored["exits"], "ensemble": scored["ensemble"]}}
    return {"epoch": epoch + 1, "lr": lr, "losses": stats["losses"], "train_top1": stats["train_top1"],
            "eval_split": split, "exits": result["exits"], "ensemble": result["ensemble"], **averaged,
            "epoch_seconds": time.perf_counter() - start, "train_seconds": stats["seconds"],
            "train_images_per_s": stats["images"] / max(stats["seconds"], 1e-9),
            "nonfinite_steps": s.nonfinite_steps}



def _final_test(s: Session, writer: RunWriter) -> dict[str, Any]:
    """With a validation split, the test split is seen once: by model_best, after training."""
    run_dir = s.cfg.run_dir
    barrier()  # every process reads model_best once rank 0 has written it
    path = run_dir / BEST
    if not path.exists():  # resumed into a folder without it: the best epoch was before the resume
        log.warning("%s is missing (the run was resumed elsewhere); testing %s instead", path, LATEST)
        path = run_dir / LATEST
    best = load_checkpoint(path)
    load_model_state(s.model, best["model"], str(path))
    result = {"checkpoint": str(path), "epoch": best["epoch"], "precision": precision_name(s.eval_runtime),
              **evaluate(s.forward, s.data.test, s.eval_runtime, s.model.exit_stages)}
    if s.ema is not None and best.get("ema") is not None:  # the average saved beside model_best's weights
        s.ema.load_state_dict(best["ema"])
        scored = evaluate(s.ema.module, s.data.test, s.eval_runtime, s.model.exit_stages)
        result["ema"] = {"exits": scored["exits"], "ensemble": scored["ensemble"]}
    writer.test_result(result)
    exits = " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in result["exits"])
    log.info("test split, evaluated once with model_best (epoch %d, selected on validation): top-1 %s "
             "ensemble %.2f", best["epoch"], exits, result["ensemble"]["top1"])
    if "ema" in result:
        averaged = " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in result["ema"]["exits"])
        log.info("... and its weight average (--ema): top-1 %s ensemble %.2f", averaged,
                 result["ema"]["ensemble"]["top1"])
    return result



def epoch_summary(record: dict[str, Any], epochs: int) -> str:
    """The one-line summary printed after each epoch."""
    exits = " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in record["exits"])
    averaged = ""
    if "ema" in record:
        ema = " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in record["ema"]["exits"])
        averaged = f" | EMA {ema} ensemble {record['ema']['ensemble']['top1']:.2f}"
    return (f"epoch {record['epoch']}/{epochs} lr {record['lr']:.4g} loss {record['losses'].get('loss', 0.0):.4f}"
            f" | {record['eval_split']} top-1 {exits} ensemble {record['ensemble']['top1']:.2f}{averaged}"
            f" | {record['train_images_per_s']:.0f} img/s, {record['epoch_seconds']:.1f} s")
