"""Train a multi-exit CNN with byot's self-distillation loss in your own loop: a PyTorch Lightning module.

    pip install "byot[lightning]"
    python examples/lightning_byot.py --data-dir DIR --epochs 3          # CIFAR-10 under DIR, 2 CPU processes
    python examples/lightning_byot.py --dataset digits --epochs 3       # scikit-learn's digits: no download

byot.attach_exits puts shallow exits on a plain CNN; byot.SelfDistillLoss turns the exits' outputs into named
loss terms (ce/exitK, kd/exitK, hint/exitK) and their weighted total, "loss". Lightning runs the loop: here
2 processes on the CPU (DDP over gloo). Every term is a mean over images and every process reads an equal share
of each step's global batch, so the mean over processes is the global batch's value: the logged terms and the
gradients are those of one process training on the whole batch. The loss is built as `byot train` builds it
(`--alpha`, `--beta`, `--temperature` mean the same here); byot train's crop-and-flip augmentation is left out.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import byot
from byot.data import NORMALIZATION
from byot.data.cifar import load_cifar
from byot.data.digits import load_digits
from byot.data.images import ImageSet
from byot.data.transforms import normalize
from byot.losses import mean_feature_weight
from byot.training.distributed import convert_sync_batchnorm


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Options:
    dataset: str = opt("cifar10", "digits (ships with scikit-learn), cifar10 or cifar100")
    data_dir: str = opt("", "the folder holding cifar-10-batches-py or cifar-100-python (not read for digits)")
    download: bool = opt(False, "download CIFAR into --data-dir first")
    image_size: int = opt(32, "px: the side of the square images (digits are upscaled from 8 px)")
    width: int = opt(32, "channels of the first block; each later block doubles them")
    epochs: int = opt(3, "passes over the training images")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: after --epochs)")
    batch_size: int = opt(128, "images per optimizer step over all processes, as byot train's --batch-size")
    lr: float = opt(0.1, "SGD learning rate, decayed to 0 along a cosine over --epochs")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "L2 penalty on every weight")
    alpha: float = opt(0.1, "KD weight; the exits' label terms get 1 - alpha")
    beta: float = opt(1e-6, "feature (hint) weight on the hint summed over a step's images, as byot train's --beta")
    temperature: float = opt(3.0, "softens the teacher; the KD term is scaled by T**2")
    devices: int = opt(2, "processes (one per device)")
    accelerator: str = opt("cpu", "cpu or gpu")
    seed: int = opt(0, "seeds the weights and the order of the images")
    out_dir: str = opt("lightning_runs", "where Lightning writes metrics.csv and checkpoints")
    log_every: int = opt(10, "optimizer steps between logged rows")


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Options):
        flag, help = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help)
    return Options(**vars(parser.parse_args(argv)))


# ---- the network: any nn.Module would do; byot adds the exits -------------------------------------------------

def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """(B, c_in, H, W) -> (B, c_out, H/2, W/2)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    """Three blocks, each halving the map, then global pooling and a linear classifier."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.block1 = conv_block(3, width)  # (B, w, S/2, S/2)
        self.block2 = conv_block(width, 2 * width)  # (B, 2w, S/4, S/4)
        self.block3 = conv_block(2 * width, 4 * width)  # (B, 4w, S/8, S/8)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.block3(self.block2(self.block1(x))))))  # (B, K)


def build_model(options: Options, num_classes: int) -> nn.Module:
    """SmallCNN with byot's exits after block1 and block2; its own classifier is the deepest exit, the teacher.
    Seeded, so every process (and a test) builds the same weights."""
    torch.manual_seed(options.seed)
    cnn = SmallCNN(num_classes, options.width)
    return byot.attach_exits(cnn, at=["block1", "block2"], input_size=(1, 3, options.image_size, options.image_size))


def build_loss(options: Options) -> byot.SelfDistillLoss:
    """The loss `byot train --alpha A --beta B --temperature T --batch-size N` trains with. byot's hint is a mean
    over images, so that its value does not depend on how the batch is split; --beta weighs the reference's
    hint summed over a step's images, hence the conversion to the per-image weight beta * N."""
    beta = mean_feature_weight(options.beta, "hint", options.batch_size)
    return byot.SelfDistillLoss(alpha=options.alpha, beta=beta, temperature=options.temperature)


# ---- the data: each process reads its share of one global order -----------------------------------------------

class GlobalBatchShare(Sampler[int]):
    """This process's share of each step's global batch: one shuffled order per epoch, cut into global batches
    of ``global_batch`` images (the last partial one dropped, so that every step has the size --beta was
    converted for and every process the same share), process ``rank`` reading the rank-th slice of each. The
    order does not depend on the number of processes: 1 or 2 of them train on the same global batches."""

    def __init__(self, num_images: int, global_batch: int, rank: int, world: int, seed: int) -> None:
        if global_batch % world:
            raise ValueError(f"--batch-size {global_batch} must split evenly over {world} processes")
        self.num_images, self.global_batch, self.rank, self.world = num_images, global_batch, rank, world
        self.share, self.seed, self.epoch = global_batch // world, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_images // self.global_batch * self.share

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_images, generator=g)[: len(self) * self.world]
        steps = order.view(-1, self.world, self.share)  # (steps, processes, images per process)
        return iter(steps[:, self.rank].flatten().tolist())


def load_data(options: Options) -> tuple[ImageSet, ImageSet]:
    """(train, test) uint8 images (N, 3, S, S) with labels; normalised later, in the step."""
    if options.dataset == "digits":
        return load_digits(options.image_size, options.seed)
    return load_cifar(options.data_dir, options.dataset, options.download)


# ---- the Lightning module ---------------------------------------------------------------------------------------

class SelfDistillModule(L.LightningModule):
    """Every exit learns the labels; the shallow ones also learn the deepest exit's softened outputs (KD) and
    pooled features (hint)."""

    def __init__(self, model: nn.Module, loss_fn: byot.SelfDistillLoss, train_set: ImageSet,
                 options: Options) -> None:
        super().__init__()
        self.model, self.loss_fn, self.train_set, self.options = model, loss_fn, train_set, options
        mean, std = NORMALIZATION[options.dataset]
        self.register_buffer("mean", torch.tensor(mean), persistent=False)  # (3,)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def loss_terms(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """uint8 images (B, 3, S, S) and labels (B,) -> {"loss": total, "ce/exit1": ..., "kd/exit1": ...,
        "hint/exit1": ...}: each term a mean over the B images."""
        images, labels = batch
        output = self.model(normalize(images, self.mean, self.std))  # logits (B, K) and features per exit
        return self.loss_fn(output, labels, self.model.exit_stages)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        # sync_dist averages each term over the processes; their shares are equal, so the average is the
        # global batch's mean. DDP averages the gradients the same way.
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, on_step=True,
                      on_epoch=True, sync_dist=True, batch_size=len(batch[1]))
        return terms["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.options
        optimizer = torch.optim.SGD(self.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, o.epochs)}

    def train_dataloader(self) -> DataLoader:
        sampler = GlobalBatchShare(len(self.train_set.labels), self.options.batch_size, self.global_rank,
                                   self.trainer.world_size, self.options.seed)
        return DataLoader(TensorDataset(self.train_set.images, self.train_set.labels), sampler.share, sampler=sampler)


def main(options: Options) -> None:
    L.seed_everything(options.seed, verbose=False)
    train_set, test_set = load_data(options)
    model = build_model(options, len(train_set.classes))
    # BatchNorm over the global batch, not each process's share: the steps stay those of one process. Lightning's
    # sync_batchnorm=True uses torch's SyncBatchNorm, which runs on GPUs only; byot's runs on CPUs too.
    device = torch.device("cuda" if options.accelerator == "gpu" else "cpu")
    model = convert_sync_batchnorm(model, device)
    module = SelfDistillModule(model, build_loss(options), train_set, options)
    trainer = L.Trainer(
        accelerator=options.accelerator, devices=options.devices, strategy=DDPStrategy(
            process_group_backend="gloo" if options.accelerator == "cpu" else "nccl"),
        max_epochs=options.epochs, max_steps=options.max_steps, logger=CSVLogger(options.out_dir, name="byot"),
        log_every_n_steps=options.log_every, use_distributed_sampler=False,  # GlobalBatchShare shards the data
        enable_progress_bar=False)
    trainer.fit(module)
    if trainer.is_global_zero:  # the test split scored once, in one process
        mean, std = module.mean.cpu(), module.std.cpu()
        loader = [(normalize(test_set.images[i:i + 256], mean, std), test_set.labels[i:i + 256])
                  for i in range(0, len(test_set.labels), 256)]
        scores = byot.evaluate_exits(module.model, loader, device=device)
        print("test top-1 %: " + ", ".join(f"exit {k} {top1:.1f}" for k, top1 in scores.top1.items())
              + f", ensemble {scores.ensemble_top1:.1f}")


if __name__ == "__main__":
    main(parse_options())
