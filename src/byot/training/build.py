"""What a configuration and a checkpoint build: the model (on the multi-exit contract), the data, the loss, a
trained model ready to evaluate; and the checks that a checkpoint fits them."""

from __future__ import annotations

import logging
import logging.handlers

import torch
from torch import nn

from byot.config import (
    TrainConfig,
    family_arguments,
)
from byot.data import NORMALIZATION, DataBundle, Shard, build_data
from byot.data.augment import AugmentedBatches, AugmentSpec
from byot.data.batches import ONE_PROCESS
from byot.errors import ByotError
from byot.losses import SelfDistillLoss, mean_feature_weight
from byot.models import MultiExitNet, create_model
from byot.models.registry import parse_exits
from byot.training.runtime import (
    Runtime,
    evaluation_runtime,
    make_runtime,
)

log = logging.getLogger("byot")


def build_model(cfg: TrainConfig, num_classes: int, image_size: int, checkpoint: dict | None = None) -> MultiExitNet:
    """The model ``cfg`` names; a checkpoint written before the multi-exit contract (no "model_spec") keeps
    the attention mask it was trained with."""
    legacy = False
    if checkpoint is not None and cfg.head == "attention":  # the record says; none at all: written before 0.2
        legacy = bool(checkpoint.get("model_spec", {}).get("legacy_attention", "model_spec" not in checkpoint))
    if legacy:
        log.info("this checkpoint's attention exits were trained with byot 0.1's ReLU -> sigmoid mask: rebuilt "
                 "with it")
    exits = parse_exits(cfg.exits) if cfg.distill else False
    model = create_model(cfg.arch, num_classes, image_size, exits, cfg.head, legacy, **family_arguments(cfg))
    skip = feature_skip(cfg, model.exit_stages) if cfg.distill else ()
    if cfg.distill and (cfg.feature_loss == "adapted" or skip):
        model.adapt_features(image_size, skip, adapt=cfg.feature_loss == "adapted")
    return model


def feature_skip(cfg: TrainConfig, exit_stages: list[int]) -> tuple[int, ...]:
    """The exits ``--feature-skip`` leaves without a feature term ("second-deepest": the journal code's)."""
    if cfg.feature_skip == "second-deepest" and len(exit_stages) >= 2:
        return (exit_stages[-2],)
    return ()



def load_data(cfg: TrainConfig, device: torch.device, shard: Shard = ONE_PROCESS) -> DataBundle:
    """The data set's batches; the training ones with ``cfg``'s strong augmentation where it asks for any."""
    data = build_data(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.image_size, cfg.seed, device,
                      cfg.workers, cfg.download, skip_corrupt=cfg.skip_corrupt, val_split=cfg.val_split,
                      shard=shard, pad_fill=cfg.pad_fill)
    spec = augment_spec(cfg)
    if spec.active:
        data.train = AugmentedBatches(data.train, spec, cfg.seed)
    return data


def augment_spec(cfg: TrainConfig) -> AugmentSpec:
    """The augmentation ``cfg`` asks for: AutoAugment's CIFAR-10 policy on the 32 px data sets, its ImageNet
    policy on image folders."""
    return AugmentSpec(cfg.augment, "imagenet" if cfg.dataset == "imagefolder" else "cifar10", cfg.pad_fill,
                       cfg.cutout, cfg.mixup, cfg.cutmix)



def build_loss(cfg: TrainConfig, data: DataBundle, device: torch.device,
               exit_stages: list[int]) -> SelfDistillLoss:
    """The loss ``cfg`` asks for, for a model whose heads read the stages ``exit_stages``.

    Its terms are means over images. --beta weighs the references' feature term, summed over a step's
    images (--batch-size x --accum-steps, over all processes): the loss gets the per-image weight of a full
    step, beta x images for the hint and beta x sqrt(images) for the journal's distance
    (``mean_feature_weight``); the training loop keeps --beta's weight on a last step of another size."""
    weights = balanced_class_weights(data.train_counts, device) if cfg.class_weights == "balanced" else None
    # the plain backbone has one exit: no teacher, no KD, no hint, cross-entropy only
    if not cfg.distill:
        return SelfDistillLoss(alpha=0.0, beta=0.0, temperature=cfg.temperature, class_weights=weights,
                               label_smoothing=cfg.label_smoothing)
    beta = mean_feature_weight(cfg.beta, cfg.feature_loss, cfg.batch_size * cfg.accum_steps)
    return SelfDistillLoss(alpha=cfg.alpha, beta=beta, temperature=cfg.temperature, class_weights=weights,
                           deepest_ce=cfg.deepest_ce, kd_t2=cfg.kd_t2, feature_loss=cfg.feature_loss,
                           feature_skip=feature_skip(cfg, exit_stages), label_smoothing=cfg.label_smoothing)



def balanced_class_weights(counts: list[int], device: torch.device) -> torch.Tensor:
    """w_c = N / (K * n_c): every class weighs the same in the label terms (sklearn's "balanced");
    a class with no training image gets weight 0."""
    n = torch.tensor(counts, dtype=torch.float32, device=device)
    return torch.where(n > 0, n.sum() / (len(counts) * n.clamp(min=1)), torch.zeros_like(n))



def check_checkpoint_fits(checkpoint: dict, data: DataBundle, source: str) -> None:
    """The data's classes are the checkpoint's, by count and by name."""
    if checkpoint["num_classes"] != len(data.classes):
        raise ByotError(f"{source} has {checkpoint['num_classes']} classes but the data has {len(data.classes)}; "
                        "use the data set it was trained on")
    saved = list(checkpoint["classes"])
    if saved != list(data.classes):  # same count, other names or order: every label would mean another class
        pairs = [f"{i}: {a!r} (checkpoint) vs {b!r} (data)" for i, (a, b) in enumerate(zip(saved, data.classes))
                 if a != b]
        raise ByotError(f"{source} was trained on other classes than the data's: {len(pairs)} differ "
                        f"({'; '.join(pairs[:3])}{'; ...' if len(pairs) > 3 else ''}); use the data set it was "
                        "trained on")



def checkpoint_normalization(checkpoint: dict | None, default: tuple) -> tuple:
    """The (mean, std) a checkpoint's model was trained with: its own where it says (a reference-script
    checkpoint), else ``default`` (the data set's)."""
    stored = checkpoint.get("normalization") if checkpoint else None
    return (tuple(stored[0]), tuple(stored[1])) if stored else default



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



def check_single_sample_batches(model: MultiExitNet, data: DataBundle) -> None:
    # BatchNorm cannot train on one value per channel: a 1-image batch needs maps larger than 1x1.
    if min(data.train.batch_size, data.train.num_samples) > 1:
        return
    last = model.stage_shapes[-1]
    if last.height * last.width < 2:
        raise ByotError(f"training batches of one image at {data.image_size} px leave 1x1 feature maps, which "
                        "BatchNorm cannot normalise; use --batch-size 2 or more, or a larger --image-size")



def trained_weights(checkpoint: dict, ema: bool, source: str) -> dict[str, torch.Tensor]:
    """The state a command runs: the checkpoint's weights, or with ``ema`` the average ``byot train --ema``
    saved beside them (BatchNorm's running statistics as the average holds them); refused where it has none."""
    if not ema:
        return checkpoint["model"]
    if checkpoint.get("ema") is None:
        raise ByotError(f"{source} holds no weight average (EMA): it was trained without --ema; drop --ema to "
                        "use its weights, or train with --ema DECAY")
    return checkpoint["ema"]


def weights_name(ema: bool) -> str:
    """How results name the weights a command ran: "ema" (the average) or "raw" (the trained weights)."""
    return "ema" if ema else "raw"


def build_trained(cfg: TrainConfig, checkpoint: dict, device: torch.device,
                  ema: bool = False) -> tuple[MultiExitNet, Runtime]:
    """The checkpoint's model, in eval mode on ``device``, and the runtime (amp, memory format) to run it;
    ``ema``: with the weight average the checkpoint holds instead of its weights."""
    source = cfg.resume or "the checkpoint"
    state = trained_weights(checkpoint, ema, source)
    model = build_model(cfg, checkpoint["num_classes"], checkpoint["image_size"], checkpoint)
    mean, std = checkpoint_normalization(checkpoint, NORMALIZATION[cfg.dataset])
    runtime = make_runtime(device, mean, std, cfg.amp, cfg.channels_last, model, training=False)
    load_model_state(model, state, source)
    if ema:
        log.info("running the weight average (EMA) that byot train --ema saved in %s", source)
    return runtime.place(model).eval(), evaluation_runtime(runtime, cfg.amp)
