"""Whole runs: resolve the config (with a checkpoint's), build model and data, fit, test."""

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

from byot import __version__
from byot.config import (
    TrainConfig,
    build_config,
    check_model_options,
    config_to_dict,
    family_arguments,
    load_yaml,
    save_yaml,
)
from byot.data import NORMALIZATION, DataBundle, Shard, build_data
from byot.data.batches import ONE_PROCESS
from byot.engine.checkpoint import (
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    write_text_atomic,
)
from byot.engine.cost import exit_costs
from byot.engine.distributed import (
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
from byot.engine.evaluate import evaluate
from byot.engine.faults import fault_point, with_loss_faults
from byot.engine.reports import class_counts, per_class_table, write_confusion
from byot.engine.rundir import BEST, LATEST, METRICS, PREVIOUS, TEST_RESULT, clear_run, run_lock
from byot.engine.runtime import (
    Runtime,
    build_optimizer,
    compile_model,
    evaluation_runtime,
    make_runtime,
    precision_name,
    resolve_device,
)
from byot.engine.signals import critical_section
from byot.engine.train import NonFiniteGuard, lr_at, train_one_epoch
from byot.errors import ByotError, describe_os_error
from byot.losses import SelfDistillLoss
from byot.models import MultiExitNet, create_model
from byot.models.pretrained import describe_load, load_pretrained
from byot.models.registry import parse_exits, spec_record

log = logging.getLogger("byot")



def resolve_config(given: dict[str, Any], config_file: str | None = None) -> tuple[TrainConfig, dict | None]:
    """defaults -> checkpoint's config (with --resume) -> YAML file -> flags; returns (config, checkpoint)."""
    explicit = {**(load_yaml(config_file) if config_file else {}), **given}
    checkpoint = None
    if explicit.get("resume") == "auto":
        explicit["resume"], checkpoint = find_resumable(build_config({}, {**explicit, "resume": None}).run_dir)
    if not explicit.get("resume"):
        return build_config({}, explicit), None
    checkpoint = checkpoint or load_checkpoint(explicit["resume"])
    saved = dict(checkpoint.get("config", {}))
    # None meant "the data set's own size"; compare a given --image-size with the size it became
    effective = {**saved, "image_size": saved.get("image_size") or checkpoint.get("image_size")}
    check_model_options(effective, explicit, explicit["resume"])
    saved.pop("device", None)  # where it ran before says nothing about where it runs now
    # where it wrote before neither: the run directory comes from the command line, or from where the
    # checkpoint lies (continue the run it belongs to), never from the file's contents, so a checkpoint
    # received from elsewhere cannot make this run write into a path of its choosing
    saved.pop("save_folder", None)
    own = own_save_folder(Path(explicit["resume"]), saved.get("arch", ""))
    if own is not None and "save_folder" not in explicit:
        explicit["save_folder"] = own
    return build_config(saved, explicit), checkpoint


def own_save_folder(checkpoint_path: Path, arch: str) -> str | None:
    """SAVE_FOLDER of the run directory a checkpoint lies in (SAVE_FOLDER/ARCH/file), else None."""
    folder = checkpoint_path.expanduser().parent
    return str(folder.parent) if arch and folder.name == arch else None


def find_resumable(run_dir: Path) -> tuple[str | None, dict | None]:
    """The newest readable checkpoint of ``run_dir`` (latest, else previous) and its contents, read once;
    (None, None) for a new run."""
    for name in (LATEST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path)
        except ByotError as e:
            log.warning("--resume auto: skipping %s: %s", path, e)
            continue
        log.info("--resume auto: continuing from %s", path)
        return str(path), state
    log.info("--resume auto: no checkpoint in %s; starting a new run", run_dir)
    return None, None


def build_model(cfg: TrainConfig, num_classes: int, image_size: int, checkpoint: dict | None = None) -> MultiExitNet:
    """The model ``cfg`` names; a checkpoint written before the multi-exit contract (no "model_spec") keeps
    the attention mask it was trained with."""
    legacy = checkpoint is not None and "model_spec" not in checkpoint and cfg.head == "attention"
    if legacy:
        log.info("this checkpoint predates byot 0.2: its attention exits keep their old ReLU -> sigmoid mask")
    exits = parse_exits(cfg.exits) if cfg.distill else False
    return create_model(cfg.arch, num_classes, image_size, exits, cfg.head, legacy, **family_arguments(cfg))


def load_data(cfg: TrainConfig, device: torch.device, shard: Shard = ONE_PROCESS) -> DataBundle:
    return build_data(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.image_size, cfg.seed, device,
                      cfg.workers, cfg.download, skip_corrupt=cfg.skip_corrupt, val_split=cfg.val_split,
                      shard=shard)


def build_loss(cfg: TrainConfig, data: DataBundle, device: torch.device) -> SelfDistillLoss:
    weights = balanced_class_weights(data.train_counts, device) if cfg.class_weights == "balanced" else None
    # the plain backbone has one exit: no teacher, no KD, no hint, cross-entropy only
    if not cfg.distill:
        return SelfDistillLoss(alpha=0.0, beta=0.0, temperature=cfg.temperature, class_weights=weights)
    return SelfDistillLoss(alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature, class_weights=weights)


def balanced_class_weights(counts: list[int], device: torch.device) -> torch.Tensor:
    """w_c = N / (K * n_c): every class weighs the same in the label terms (sklearn's "balanced");
    a class with no training image gets weight 0."""
    n = torch.tensor(counts, dtype=torch.float32, device=device)
    return torch.where(n > 0, n.sum() / (len(counts) * n.clamp(min=1)), torch.zeros_like(n))


def check_checkpoint_fits(checkpoint: dict, data: DataBundle, source: str) -> None:
    """The data's classes are the checkpoint's (a reference-script checkpoint, which names none, takes the
    data's names once the count agrees)."""
    if checkpoint["num_classes"] != len(data.classes):
        raise ByotError(f"{source} has {checkpoint['num_classes']} classes but the data has {len(data.classes)}; "
                        "use the data set it was trained on")
    if checkpoint["classes"] is None:
        checkpoint["classes"] = list(data.classes)
    saved = list(checkpoint["classes"])
    if saved != list(data.classes):  # same count, other names or order: every label would mean another class
        pairs = [f"{i}: {a!r} (checkpoint) vs {b!r} (data)" for i, (a, b) in enumerate(zip(saved, data.classes))
                 if a != b]
        raise ByotError(f"{source} was trained on other classes than the data's: {len(pairs)} differ "
                        f"({'; '.join(pairs[:3])}{'; ...' if len(pairs) > 3 else ''}); use the data set it was "
                        "trained on")


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's weights into ``model``; a checkpoint of another shape (architecture, width,
    head, class count) is refused with what differs, before anything is copied."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                 for items, label in ((missing, "tensors missing"), (unexpected, "unexpected tensors"),
                                      (shapes, "shape mismatches (checkpoint vs model)")) if items]
        raise ByotError(f"{source} does not fit the model built from its config: {'; '.join(parts)}; was it "
                        "written by another byot version or edited by hand?")
    model.load_state_dict(state)


def _check_single_sample_batches(model: MultiExitNet, data: DataBundle) -> None:
    # BatchNorm cannot train on one value per channel: a 1-image batch needs maps larger than 1x1.
    if min(data.train.batch_size, data.train.num_samples) > 1:
        return
    last = model.stage_shapes[-1]
    if last.height * last.width < 2:
        raise ByotError(f"training batches of one image at {data.image_size} px leave 1x1 feature maps, which "
                        "BatchNorm cannot normalise; use --batch-size 2 or more, or a larger --image-size")


def _prepare_run_dir(cfg: TrainConfig, resume_path: str | None, overwrite: bool, main: bool = True) -> None:
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


def _reset_metrics(path: Path, last_epoch: int) -> None:
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


def _open_tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no event files are written (pip install tensorboard)")
        return None
    return SummaryWriter(str(run_dir))


def _write_tensorboard(writer: Any, record: dict[str, Any]) -> None:
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


def epoch_summary(record: dict[str, Any], epochs: int) -> str:
    """The one-line summary printed after each epoch."""
    exits = " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in record["exits"])
    return (f"epoch {record['epoch']}/{epochs} lr {record['lr']:.4g} loss {record['losses'].get('loss', 0.0):.4f}"
            f" | {record['eval_split']} top-1 {exits} ensemble {record['ensemble']['top1']:.2f}"
            f" | {record['train_images_per_s']:.0f} img/s, {record['epoch_seconds']:.1f} s")


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
    if cfg.pretrained and checkpoint is None:
        source = None if cfg.pretrained == "imagenet" else cfg.pretrained
        log.info("pretrained backbone: %s", describe_load(load_pretrained(model, source)))
    mean, std = checkpoint_normalization(checkpoint, (data.mean, data.std))
    runtime = make_runtime(device, mean, std, cfg.amp, cfg.channels_last, model)
    model = runtime.place(model)
    _check_single_sample_batches(model, data)
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
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
    loss_fn = with_loss_faults(build_loss(cfg, data, device))  # the loss itself outside the fault-injection tests
    return Session(cfg, data, model, forward, runtime, optimizer, scaler, loss_fn, skipped,
                   ctx, checkpoint.get("normalization") if checkpoint else None)


def checkpoint_normalization(checkpoint: dict | None, default: tuple) -> tuple:
    """The (mean, std) a checkpoint's model was trained with: its own where it says (a reference-script
    checkpoint), else ``default`` (the data set's)."""
    stored = checkpoint.get("normalization") if checkpoint else None
    return (tuple(stored[0]), tuple(stored[1])) if stored else default


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
        _prepare_run_dir(cfg, cfg.resume if checkpoint is not None else None, overwrite, ctx.is_main)
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
    if main:
        for stale in remove_stale_temporaries(run_dir):
            log.warning("removed %s, a checkpoint write that a crash cut short", stale)
        try:
            save_yaml(cfg, run_dir / "config.yaml", {"num_classes": len(s.data.classes),
                                                     "byot_version": __version__, "world_size": s.ctx.world_size})
        except OSError as e:
            raise ByotError(f"cannot write {run_dir / 'config.yaml'}: {describe_os_error(e)}") from e
        _reset_metrics(run_dir / METRICS, start_epoch)
        if start_epoch < cfg.epochs and (run_dir / TEST_RESULT).exists():  # a resume that extends a finished run:
            (run_dir / TEST_RESULT).unlink()  # its one test result is of the shorter run; the new one comes at the end
            log.info("removed %s of the run's earlier end; it is redone after epoch %d", TEST_RESULT, cfg.epochs)
    _log_start(s, start_epoch, best)
    writer, records = _open_tensorboard(run_dir) if main else None, []
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if stop_after is not None and len(records) >= stop_after:
                break
            record = _run_epoch(s, epoch)
            improved = record["exits"][-1]["top1"] >= best
            best = max(best, record["exits"][-1]["top1"])
            record["best_top1"] = best
            if main:
                _save_epoch(run_dir, record, _checkpoint_state(s, epoch + 1, best), improved)
                _write_tensorboard(writer, record)
            log.info(epoch_summary(record, cfg.epochs))
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        if writer is not None:
            writer.close()
    completed = start_epoch + len(records) == cfg.epochs
    # the one test evaluation: after the last epoch, or on a resume of a run that ended before writing it
    if s.data.val is not None and completed and (records or read_test_result(run_dir) is None):
        final = _final_test(s, run_dir)
        if records:
            records[-1]["final_test"] = final
    return records


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
    if s.ctx.is_main:
        write_text_atomic(run_dir / TEST_RESULT, json.dumps(result, indent=1) + "\n")
    exits = " ".join(f"exit{e['exit']} {e['top1']:.2f}" for e in result["exits"])
    log.info("test split, evaluated once with model_best (epoch %d, selected on validation): top-1 %s "
             "ensemble %.2f", best["epoch"], exits, result["ensemble"]["top1"])
    return result


def _run_epoch(s: Session, epoch: int) -> dict[str, Any]:
    start = time.perf_counter()
    lr = lr_at(epoch, s.cfg.lr, s.cfg.epochs, s.cfg.schedule)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    s.data.train.set_epoch(epoch)
    guard = NonFiniteGuard(s.cfg.skip_nonfinite, s.cfg.lr, s.nonfinite_steps)
    stats = train_one_epoch(s.forward, s.data.train, s.optimizer, s.loss_fn, s.runtime, s.scaler,
                            s.model.exit_stages, epoch, s.cfg.print_freq, s.cfg.progress, s.cfg.accum_steps, guard)
    s.nonfinite_steps = stats["nonfinite_steps"]
    split = "val" if s.data.val is not None else "test"
    held_out = s.data.val if s.data.val is not None else s.data.test  # (an empty split is refused when loading)
    result = evaluate(s.forward, held_out, s.eval_runtime, s.model.exit_stages)
    return {"epoch": epoch + 1, "lr": lr, "losses": stats["losses"], "train_top1": stats["train_top1"],
            "eval_split": split, "exits": result["exits"], "ensemble": result["ensemble"],
            "epoch_seconds": time.perf_counter() - start, "train_seconds": stats["seconds"],
            "train_images_per_s": stats["images"] / max(stats["seconds"], 1e-9),
            "nonfinite_steps": s.nonfinite_steps}


def _checkpoint_state(s: Session, epoch: int, best: float) -> dict[str, Any]:
    cfg = s.cfg
    return {"version": __version__, "arch": cfg.arch, "num_classes": len(s.data.classes), "classes": s.data.classes,
            "image_size": s.data.image_size, "config": config_to_dict(cfg), "epoch": epoch, "best_top1": best,
            "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict(), "model_spec": spec_record(s.model),
            **({"normalization": s.normalization} if s.normalization else {}),
            "rng": rng_state(), "nonfinite_steps": s.nonfinite_steps, "world_size": s.ctx.world_size}


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


def build_trained(cfg: TrainConfig, checkpoint: dict, device: torch.device) -> tuple[MultiExitNet, Runtime]:
    """The checkpoint's model, in eval mode on ``device``, and the runtime (amp, memory format) to run it."""
    model = build_model(cfg, checkpoint["num_classes"], checkpoint["image_size"], checkpoint)
    mean, std = checkpoint_normalization(checkpoint, NORMALIZATION[cfg.dataset])
    runtime = make_runtime(device, mean, std, cfg.amp, cfg.channels_last, model, training=False)
    load_model_state(model, checkpoint["model"], cfg.resume or "the checkpoint")
    return runtime.place(model).eval(), evaluation_runtime(runtime, cfg.amp)


def test_checkpoint(cfg: TrainConfig, checkpoint: dict, per_class: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint on the test split: per-exit and ensemble accuracy plus per-exit cost.

    ``per_class`` adds "per_class" ({class: [accuracy per exit]}) and writes confusion_exit<k>.png/.csv
    beside the checkpoint ("confusion_files" lists them).
    """
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    check_checkpoint_fits(checkpoint, data, cfg.resume or "the checkpoint")
    model, runtime = build_trained(cfg, checkpoint, device)
    result = evaluate(model, data.test, runtime, model.exit_stages, confusion=per_class)
    confusions = result.pop("confusion", None)
    if confusions is not None:
        result["per_class"] = per_class_table(data.classes, confusions, model.exit_stages)
        out_dir = Path(cfg.resume).expanduser().parent if cfg.resume else cfg.run_dir
        result["confusion_files"] = [str(p) for k, m in zip(model.exit_stages, confusions)
                                     for p in write_confusion(m, data.classes, k, out_dir)]
        result["class_counts"] = class_counts(confusions[0])
    costs = exit_costs(model, data.image_size)
    full = costs[-1]["flops"]
    for e, c in zip(result["exits"], costs):
        e.update(flops=c["flops"], params=c["params"], compute_share=c["flops"] / full)
    return {"arch": cfg.arch, "dataset": cfg.dataset, "epoch": checkpoint.get("epoch"),
            "precision": precision_name(runtime), **result}
