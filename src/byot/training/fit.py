"""``fit``: one training run, from a configuration (and a checkpoint to continue) to its epochs' records:
the session it holds, the epoch loop, what each epoch saves, and the one final test with a validation split."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import logging.handlers
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from byot.config import (
    EXTENDABLE,
    TrainConfig,
    config_to_dict,
    save_yaml,
)
from byot.data import DataBundle
from byot.data.augment import describe as describe_augment
from byot.errors import ByotError, describe_os_error
from byot.losses import SelfDistillLoss, describe_loss
from byot.models import MultiExitNet
from byot.models.pretrained import describe_load, load_pretrained
from byot.models.registry import spec_record
from byot.runs.atomic import write_text_atomic
from byot.runs.faults import fault_point, with_loss_faults
from byot.runs.rundir import BEST, LATEST, METRICS, PREVIOUS, TEST_RESULT, clear_run, run_lock
from byot.runs.runfiles import (
    RunLog,
    open_tensorboard,
    prepare_run_dir,
    read_test_result,
    reset_metrics,
    write_tensorboard,
)
from byot.runs.signals import critical_section
from byot.training.build import (
    augment_spec,
    build_loss,
    build_model,
    check_checkpoint_fits,
    check_single_sample_batches,
    load_data,
    load_model_state,
)
from byot.training.checkpoint import (
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from byot.training.distributed import (
    SINGLE,
    DistContext,
    barrier,
    convert_sync_batchnorm,
    init_distributed,
    launched_by_torchrun,
    per_process_batch_note,
    shutdown,
    wrap_ddp,
)
from byot.training.ema import WeightAverage
from byot.training.evaluate import evaluate
from byot.training.resolve import recorded_changes
from byot.training.runtime import (
    Runtime,
    build_optimizer,
    compile_model,
    evaluation_runtime,
    make_runtime,
    precision_name,
    resolve_device,
)
from byot.training.train import NonFiniteGuard, lr_at, train_one_epoch
from byot.version import __version__

log = logging.getLogger("byot")


@dataclass
class Session:
    """Everything one training run holds."""

    cfg: TrainConfig
    data: DataBundle
    model: MultiExitNet  # the module whose state is saved
    forward: nn.Module  # ``model`` or its torch.compile wrapper
    runtime: Runtime
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: SelfDistillLoss
    nonfinite_steps: int = 0  # optimizer steps skipped so far for a non-finite loss (--skip-nonfinite)
    ctx: DistContext = SINGLE  # this process's rank under torchrun
    normalization: list | None = None  # [mean, std] a checkpoint trained with, where not the data set's
    ema: WeightAverage | None = None  # --ema: the average of the weights, evaluated beside them
    # learning options a resume changed (--allow-changes): [{"epoch": first epoch trained so, "changes": ...}]
    config_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def eval_runtime(self) -> Runtime:
        """Accuracies are scored in fp32 unless --amp names a half precision (training keeps its own)."""
        return evaluation_runtime(self.runtime, self.cfg.amp)



def build_session(cfg: TrainConfig, checkpoint: dict | None, ctx: DistContext = SINGLE) -> Session:
    """Data, model, runtime and optimizer for ``cfg``, restored from ``checkpoint`` when given; under
    torchrun (``ctx``) this process's shard of the data and the model wrapped in DistributedDataParallel."""
    device = init_distributed(ctx, resolve_device(cfg.device), cfg.batch_size)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, device, ctx.shard)
    model = build_model(cfg, len(data.classes), data.image_size, checkpoint)
    if cfg.sync_bn and ctx.active:
        model = convert_sync_batchnorm(model, device)  # same keys: checkpoints stay interchangeable
    normalization = checkpoint.get("normalization") if checkpoint else None
    if cfg.pretrained and checkpoint is None:
        source = None if cfg.pretrained == "imagenet" else cfg.pretrained
        log.info("pretrained backbone: %s", describe_load(load_pretrained(model, source)))
        if getattr(model, "normalization", None):  # a library model's weights expect its own normalisation
            normalization = [list(v) for v in model.normalization]
            log.info("images normalised as %s's pretrained weights expect: mean %s, std %s", cfg.arch,
                     *normalization)
    mean, std = (tuple(normalization[0]), tuple(normalization[1])) if normalization else (data.mean, data.std)
    runtime = make_runtime(device, mean, std, cfg.amp, cfg.channels_last, model)
    model = runtime.place(model)
    check_single_sample_batches(model, data)
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.optimizer,
                                cfg.backbone_lr_scale)
    scaler = runtime.grad_scaler()
    if checkpoint is not None:
        check_checkpoint_fits(checkpoint, data, cfg.resume or "the checkpoint")
        load_model_state(model, checkpoint["model"], cfg.resume or "the checkpoint")
        _restore_training_state(checkpoint, optimizer, scaler, cfg.resume or "the checkpoint")
        _warn_world_size_change(checkpoint, ctx, cfg)
    forward: nn.Module = model
    if cfg.compile:
        example = next(iter(data.test))[0][:2]
        forward = compile_model(model, example, runtime)
    forward = wrap_ddp(forward, ctx, device)
    model.grad_checkpoint = cfg.grad_checkpoint
    skipped = checkpoint.get("nonfinite_steps", 0) if checkpoint else 0
    loss_fn = with_loss_faults(build_loss(cfg, data, device, model.exit_stages))  # the loss itself outside the fault-injection tests
    return Session(cfg, data, model, forward, runtime, optimizer, scaler, loss_fn, skipped, ctx, normalization,
                   _weight_average(cfg, model, checkpoint))


def _weight_average(cfg: TrainConfig, model: MultiExitNet, checkpoint: dict | None) -> WeightAverage | None:
    """--ema's average: the checkpoint's where it has one, else a new one from the weights as they are."""
    if cfg.ema <= 0:
        return None
    ema = WeightAverage(model, cfg.ema)
    if checkpoint is not None and checkpoint.get("ema") is not None:
        try:
            ema.load_state_dict(checkpoint["ema"])
        except (KeyError, RuntimeError) as e:
            raise ByotError(f"{cfg.resume or 'the checkpoint'}: its weight average does not fit the model ({e})") from e
    elif checkpoint is not None:
        log.info("the checkpoint holds no weight average: --ema %g starts one from its weights", cfg.ema)
    return ema



def _restore_training_state(checkpoint: dict, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                            source: str) -> None:
    """Optimizer, scaler and RNG state of a resume; contents that do not fit (a hand-edited or damaged
    file that kept the right field types) are one clear error, not torch's traceback. A reference-script
    checkpoint has none: training goes on with a fresh optimizer at the schedule's rate for its epoch."""
    if checkpoint.get("reference") is not None:
        log.warning("%s is a reference-script checkpoint: it holds no optimizer state, so training continues "
                    "after epoch %d with a fresh SGD optimizer (no momentum yet) at the schedule's learning rate",
                    source, checkpoint["epoch"])
        return
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"{source}: its optimizer, scaler or RNG state does not fit this model ({first}); was it "
                        "edited by hand? Test it with byot test, or start a new run") from e



def _warn_world_size_change(checkpoint: dict, ctx: DistContext, cfg: TrainConfig) -> None:
    before = checkpoint.get("world_size", 1)
    if before == ctx.world_size:
        return
    log.warning("resuming a run of %d process(es) on %d: the global batch stays %d (now %s per process); "
                "%s; the rest of the run will differ from an uninterrupted one in rounding", before,
                ctx.world_size, cfg.batch_size, per_process_batch_note(cfg.batch_size, ctx),
                "BatchNorm statistics stay those of the global batch (--sync-bn)" if cfg.sync_bn or ctx.world_size == 1
                else "BatchNorm statistics are now per process (add --sync-bn to keep the global batch's)")



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
    cfg, main = s.cfg, s.ctx.is_main
    start_epoch, best = (checkpoint["epoch"], checkpoint["best_top1"]) if checkpoint else (0, 0.0)
    run_dir = cfg.run_dir
    s.config_history, changes = _config_history(cfg, checkpoint, start_epoch)
    if main:
        for stale in remove_stale_temporaries(run_dir):
            log.warning("removed %s, a checkpoint write that a crash cut short", stale)
        try:
            save_yaml(cfg, run_dir / "config.yaml", {"num_classes": len(s.data.classes),
                                                     "byot_version": __version__, "world_size": s.ctx.world_size,
                                                     **({"history": s.config_history} if s.config_history else {})})
        except OSError as e:
            raise ByotError(f"cannot write {run_dir / 'config.yaml'}: {describe_os_error(e)}") from e
        reset_metrics(run_dir / METRICS, start_epoch)
        if start_epoch < cfg.epochs and (run_dir / TEST_RESULT).exists():  # a resume that extends a finished run:
            (run_dir / TEST_RESULT).unlink()  # its one test result is of the shorter run; the new one comes at the end
            log.info("removed %s of the run's earlier end; it is redone after epoch %d", TEST_RESULT, cfg.epochs)
    _log_start(s, start_epoch, best)
    writer, records = open_tensorboard(run_dir) if main else None, []
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
            if main:
                _save_epoch(run_dir, record, _checkpoint_state(s, epoch + 1, best), improved)
                write_tensorboard(writer, record)
            log.info(epoch_summary(record, cfg.epochs))
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        if writer is not None:
            writer.close()
    completed = start_epoch + len(records) == cfg.epochs
    # the one test evaluation: after the last epoch, or on a resume of a run that ended before writing it
    if s.data.val is not None and cfg.final_test and completed and (records or read_test_result(run_dir) is None):
        final = _final_test(s, run_dir)
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



def _save_epoch(run_dir: Path, record: dict[str, Any], state: dict[str, Any], improved: bool) -> None:
    """Metrics line, then model_best (if it improved), then checkpoint_latest (the old one kept as
    checkpoint_previous), with signals deferred until all three are on disk.

    The order makes a crash between any two writes harmless: a resume starts from checkpoint_latest's
    epoch, drops metrics lines after it, and redoes the lost epoch exactly, rewriting model_best if needed.
    """
    with critical_section():
        try:
            with open(run_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise ByotError(f"could not append to {run_dir / METRICS}: {describe_os_error(e)}; the checkpoints of "
                            "finished epochs are intact") from e
        fault_point("after_metrics")
        if improved:
            save_checkpoint(state, run_dir / BEST)
        save_checkpoint(state, run_dir / LATEST, previous=run_dir / PREVIOUS)



def _final_test(s: Session, run_dir: Path) -> dict[str, Any]:
    """With a validation split, the test split is seen once: by model_best, after training."""
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
    if s.ctx.is_main:
        write_text_atomic(run_dir / TEST_RESULT, json.dumps(result, indent=1) + "\n")
    exits = " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in result["exits"])
    log.info("test split, evaluated once with model_best (epoch %d, selected on validation): top-1 %s "
             "ensemble %.2f", best["epoch"], exits, result["ensemble"]["top1"])
    if "ema" in result:
        averaged = " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in result["ema"]["exits"])
        log.info("... and its weight average (--ema): top-1 %s ensemble %.2f", averaged,
                 result["ema"]["ensemble"]["top1"])
    return result



def _checkpoint_state(s: Session, epoch: int, best: float) -> dict[str, Any]:
    cfg = s.cfg
    return {"version": __version__, "arch": cfg.arch, "num_classes": len(s.data.classes), "classes": s.data.classes,
            "image_size": s.data.image_size, "config": config_to_dict(cfg), "epoch": epoch, "best_top1": best,
            "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict(), "model_spec": spec_record(s.model),
            **({"normalization": s.normalization} if s.normalization else {}),
            "rng": rng_state(), "nonfinite_steps": s.nonfinite_steps, "world_size": s.ctx.world_size,
            **({"ema": s.ema.state_dict()} if s.ema is not None else {}),
            **({"config_history": s.config_history} if s.config_history else {})}



def _config_history(cfg: TrainConfig, checkpoint: dict | None,
                    start_epoch: int) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """The run's option changes so far (the checkpoint's), with this resume's added: the learning options
    that differ from the checkpoint's, {name: [before, after]}, in effect from epoch ``start_epoch + 1``."""
    if checkpoint is None:
        return [], {}
    history = list(checkpoint.get("config_history", []))
    changes = {k: [old, new] for k, (old, new) in recorded_changes(checkpoint, cfg).items()}
    if changes:
        history.append({"epoch": start_epoch + 1, "changes": changes})
        extended = set(changes) <= set(EXTENDABLE)  # more epochs: how a finished run goes on
        (log.info if extended else log.warning)("options changed from epoch %d on: %s (recorded in config.yaml's history and metrics.jsonl)",
                    start_epoch + 1, ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    return history, changes



def _log_start(s: Session, start_epoch: int, best: float) -> None:
    cfg, model, data = s.cfg, s.model, s.data
    params = sum(p.numel() for p in model.parameters())
    if start_epoch:
        log.info("resumed from %s after epoch %d (best deepest-exit top-1 %.2f)", cfg.resume, start_epoch, best)
    options = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(model.spec).items())
    log.info("%s (%s; exits after stages %s, %.2fM parameters) on %s, amp %s, channels_last %s, compile %s; "
             "%s: %d train / %d test images, %d classes, %d px; run directory %s", cfg.arch, options,
             ",".join(map(str, model.exit_stages)), params / 1e6, s.runtime.device, _precisions(s), s.runtime.channels_last,
             cfg.compile, cfg.dataset, data.train.num_samples, data.test.num_samples, len(data.classes),
             data.image_size, cfg.run_dir)
    log.info("recipe %s: augmentation %s; loss %s", cfg.recipe, describe_augment(augment_spec(cfg)),
             describe_loss(s.loss_fn))
    counts = ", ".join(f"{name} {n}" for name, n in zip(data.classes, data.train_counts))
    log.info("training images per class: %s", counts if len(counts) < 2000 else counts[:2000] + " ...")
    if data.val is not None:
        log.info("checkpoints are selected on a validation hold-out of %d training images (--val-split %g); "
                 "the test split is evaluated once, at the end, with model_best", data.val.num_samples,
                 cfg.val_split)
    else:
        log.info("test-set evaluation every epoch selects model_best.pth.tar: its accuracy is an optimistic "
                 "estimate of performance on unseen data (use --val-split to keep the test split unseen)")



def _precisions(s: Session) -> str:
    train, scored = s.runtime.amp, precision_name(s.eval_runtime)
    return f"{train} (evaluation in {scored})" if train != "off" else "off"



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
