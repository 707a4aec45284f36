"""The session of one training run, built in one place: device, data, model, weights, optimizer, DDP, loss and
weight average, restored from a checkpoint when the run continues; what a checkpoint of it holds; and how it
describes itself in the log."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from byot.config import EXTENDABLE, TrainConfig, config_to_dict
from byot.data import DataBundle
from byot.data.augment import describe as describe_augment
from byot.errors import ByotError
from byot.losses import SelfDistillLoss, describe_loss
from byot.models import MultiExitNet
from byot.models.pretrained import describe_load, load_pretrained
from byot.models.registry import spec_record
from byot.runs.faults import with_loss_faults
from byot.training.build import (
    augment_spec,
    build_loss,
    build_model,
    check_checkpoint_fits,
    check_single_sample_batches,
    load_data,
    load_model_state,
)
from byot.training.checkpoint import restore_rng_state, rng_state
from byot.training.distributed import (
    SINGLE,
    DistContext,
    convert_sync_batchnorm,
    init_distributed,
    per_process_batch_note,
    wrap_ddp,
)
from byot.training.ema import WeightAverage
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


def checkpoint_state(s: Session, epoch: int, best: float) -> dict[str, Any]:
    cfg = s.cfg
    return {"version": __version__, "arch": cfg.arch, "num_classes": len(s.data.classes), "classes": s.data.classes,
            "image_size": s.data.image_size, "config": config_to_dict(cfg), "epoch": epoch, "best_top1": best,
            "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict(), "model_spec": spec_record(s.model),
            **({"normalization": s.normalization} if s.normalization else {}),
            "rng": rng_state(), "nonfinite_steps": s.nonfinite_steps, "world_size": s.ctx.world_size,
            **({"ema": s.ema.state_dict()} if s.ema is not None else {}),
            **({"config_history": s.config_history} if s.config_history else {})}


def config_history(cfg: TrainConfig, checkpoint: dict | None,
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


def log_start(s: Session, start_epoch: int, best: float) -> None:
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
