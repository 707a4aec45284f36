"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, DistributedDataParallel
all-reduces gradients, byot shards every batch and gathers every count.

One process is rank 0 of world 1 and runs exactly the single-process code: every function here is then a
no-op. Under torchrun (WORLD_SIZE > 1) each process joins the group on its own device (cuda:LOCAL_RANK, or
the CPU with the gloo backend); ``--batch-size`` stays the global batch.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from byot.data.batches import Shard
from byot.errors import ByotError

log = logging.getLogger("byot")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, metrics, TensorBoard and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)


SINGLE = DistContext()


def launched_by_torchrun() -> DistContext:
    """The rank, world size and local rank torchrun put in the environment (rank 0 of 1 without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ByotError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them): {e}") from e
    return DistContext(rank, world, local) if world > 1 else SINGLE


def init_distributed(ctx: DistContext, device: torch.device, batch_size: int = 0) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs); returns this process's device.

    ``batch_size`` (global) must give every process at least 2 images of the smallest batch (half a batch,
    see ``batch_bounds``): at least 4 per process."""
    if not ctx.active:
        return device
    if batch_size and batch_size < 4 * ctx.world_size:
        raise ByotError(f"--batch-size {batch_size} is the global batch: with {ctx.world_size} processes it must "
                        f"be at least {4 * ctx.world_size} (4 images per process)")
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size)
        except Exception as e:
            raise ByotError(f"could not join the torchrun process group ({backend}): {e}") from e
    if device.type == "cpu":
        # processes on one machine share its cores; torchrun sets OMP_NUM_THREADS=1, respect a larger choice
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(ctx.world_size)))
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1) // local_world
        torch.set_num_threads(max(1, threads))
    log.debug("rank %d of %d on %s", ctx.rank, ctx.world_size, device)
    return device


def distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (in place; returned); itself in one process."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The maximum of ``tensor`` over all processes (in place; returned); itself in one process."""
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group while the interpreter is fully alive.

    DistributedDataParallel holds reference cycles (its hooks), so its reducer, and through it the
    process group, would otherwise be freed by the garbage collector during interpreter shutdown, where
    gloo's worker threads releasing their tensors abort the process ("terminate called without an active
    exception"; seen intermittently at the end of 2-process CPU runs). Collect first, then destroy.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch, on any device.

    torch's nn.SyncBatchNorm runs only on GPUs; this one all-reduces each channel's sum, sum of squares
    and count with a differentiable all-reduce (so gradients flow through the global statistics too),
    which works with gloo on CPUs. Outside training or in one process it is plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()  # statistics in fp32 whatever the autocast dtype
        count = torch.full((1,), xf.numel() / c, device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n  # (C,)
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0.0)  # biased, as BatchNorm normalises with
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=momentum)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d -> global-batch statistics: torch's SyncBatchNorm on GPUs, ours on CPUs."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _swap_batchnorm(model)


def _swap_batchnorm(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        sync = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        return sync.to(module.weight.device if module.affine else module.running_mean.device)
    for name, child in module.named_children():
        setattr(module, name, _swap_batchnorm(child))
    return module


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (which must already be on ``device``)."""
    if not ctx.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def per_process_batch_note(batch_size: int, ctx: DistContext) -> str:
    lo = batch_size // ctx.world_size
    hi = -(-batch_size // ctx.world_size)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"

