"""How a step runs on its device: input preparation (normalise, memory format) and mixed precision.

One object carries these choices so that training, evaluation and ``byot bench`` run the same path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from byot.config import CHOICES
from byot.data.transforms import normalize
from byot.errors import ByotError

log = logging.getLogger("byot")

AMP_CHOICES = CHOICES["amp"]  # one list: the config validates it, this module resolves it
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
NEVER_GROW = 2**31 - 1  # steps between scale increases: never, for bf16 and fp32


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where oneDNN runs bf16 convolutions natively.

    Elsewhere bf16 is emulated and much slower than fp32 (measured: 1.85 vs 29.5 images/s training
    multi_resnet18_kd on an AVX2-only EPYC, docs/PERFORMANCE.md), so "auto" keeps fp32 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


DEVICE_TYPES = ("cpu", "cuda")  # what byot trains and evaluates on (torch names more: meta, mps, xpu, ...)


def resolve_device(name: str | None) -> torch.device:
    """None -> cuda when available, else cpu; a named device must be one byot runs on, and exist."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ByotError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from e
    if device.type not in DEVICE_TYPES:
        raise ByotError(f"--device {name}: byot runs on {' or '.join(DEVICE_TYPES)} (cuda:N for one GPU), not "
                        f"{device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ByotError(f"--device {name} asked for, but torch sees no CUDA GPU here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ByotError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s) (cuda:0 ...)")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """"auto" -> bf16 on CUDA GPUs that support it and on CPUs with native bf16; fp16 on older GPUs;
    off elsewhere. An explicit choice is kept, except fp16 on a CPU (unsupported there)."""
    if amp not in AMP_CHOICES:
        raise ByotError(f"--amp {amp!r}: choose one of {', '.join(AMP_CHOICES)}")
    if device.type == "cuda":
        if amp == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return amp
    if amp == "fp16":
        raise ByotError("--amp fp16 needs a CUDA GPU; on a CPU use --amp bf16 or off")
    if amp == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "off"
    if amp == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning("this CPU has no native bf16 (AVX512-BF16/AMX): --amp bf16 will be slower than fp32")
    return amp


@dataclass(frozen=True)
class Runtime:
    """images (uint8, on the device) -> normalised model inputs; the autocast context for forward."""

    device: torch.device
    mean: torch.Tensor  # (3,)
    std: torch.Tensor  # (3,)
    amp: str = "off"  # resolved: bf16 | fp16 | off
    channels_last: bool = False

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 normalised (B, 3, H, W), channels-last in memory if chosen."""
        x = normalize(images, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass only: the loss is computed outside it, in fp32."""
        dtype = _DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 gradients underflow without loss scaling: dynamic scaling. bf16 and fp32 have the range
        and need none, so the scale starts at 1 and never grows; the scaler is there to skip, on the device,
        the update of a step whose gradients are not finite (--skip-nonfinite)."""
        if self.amp == "fp16":
            return torch.amp.GradScaler(self.device.type)
        return torch.amp.GradScaler(self.device.type, init_scale=1.0, growth_interval=NEVER_GROW)

    def update_scaler(self, scaler: torch.amp.GradScaler) -> None:
        """After a step: fp16 adapts its scale; bf16 and fp32 keep it at 1 (GradScaler would halve it at
        every skipped step, and after enough of them gradients would underflow)."""
        scaler.update(None if self.amp == "fp16" else 1.0)

    def place(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def evaluation_runtime(runtime: Runtime, amp: str) -> Runtime:
    """The runtime that scores accuracies: fp32 unless the user named a half precision (``--amp bf16`` or
    ``fp16``). "auto" speeds up training only: a reported top-1 or top-5 must not move with the CPU's
    features (bf16 logits tie and reorder: a user saw one top-5 hit differ from fp32 on one checkpoint)."""
    return runtime if amp in ("bf16", "fp16") else dataclasses.replace(runtime, amp="off")


def precision_name(runtime: Runtime) -> str:
    return "fp32" if runtime.amp == "off" else runtime.amp


CPU_CHANNELS_LAST_MIN_CHANNELS = 8  # output channels below this: unsafe in channels-last on CPUs
CPU_STRIDED_1X1_MIN_IN_CHANNELS = 16  # strided 1x1 convolutions reading fewer channels: unsafe likewise


def channels_last_is_safe(model: nn.Module, device: torch.device) -> bool:
    """False for CPU models with convolutions that torch 2.14.1's oneDNN mishandles in channels-last backward.

    Two patterns corrupted memory (segfaults, "double free or corruption", "free(): invalid next size")
    while NCHW ran cleanly:
    - convolutions with fewer than 8 output channels (width 4 or 6; seen on an AVX2-only EPYC);
    - strided 1x1 convolutions (the residual shortcuts) reading fewer than 16 channels, on batches of odd
      size (3, 33, 67, 127 crashed; 1, 2, 64, 100, 128 did not), in fp32 and bf16 (seen on an AVX-512 EPYC
      with widths 8 and 12; widths 16-64 ran cleanly). A last batch of odd size is common, so such nets
      keep NCHW whatever the batch size.
    """
    if device.type != "cpu":
        return True
    for m in model.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if m.out_channels < CPU_CHANNELS_LAST_MIN_CHANNELS:
            return False
        strided_1x1 = m.kernel_size == (1, 1) and m.stride != (1, 1)
        if strided_1x1 and m.in_channels < CPU_STRIDED_1X1_MIN_IN_CHANNELS:
            return False
    return True


def make_runtime(device: torch.device, mean: tuple, std: tuple, amp: str, channels_last: bool,
                 model: nn.Module, training: bool = True) -> Runtime:
    """The runtime for ``model`` on ``device``; for training, channels-last is dropped where it is unsafe
    (see above: only backward passes crashed, so inference keeps it)."""
    if channels_last and training and not channels_last_is_safe(model, device):
        log.info("channels_last off: this net's narrow layers crash torch's oneDNN in channels-last on CPUs "
                 "(see byot.training.runtime.channels_last_is_safe)")
        channels_last = False
    return Runtime(device, torch.tensor(mean, device=device), torch.tensor(std, device=device),
                   resolve_amp(amp, device), channels_last)


# tensors AdamW leaves undecayed besides norms and biases: tokens, position embeddings and tables
NO_DECAY_NAMES = ("pos_embed", "pos_embedding", "cls_token", "class_token", "reg_token", "dist_token",
                  "relative_position_bias_table", "absolute_pos_embed")


def parameter_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float = 1.0,
                     decay_everything: bool = True) -> list[dict]:
    """The optimizer's parameter groups: the backbone (stem and stages, ``lr_scale`` = ``backbone_lr_scale``)
    and the heads (scale 1); with ``decay_everything=False`` (AdamW) norms' weights, biases, tokens and
    position embeddings (every parameter of fewer than 2 dimensions, and ``NO_DECAY_NAMES``) get no weight
    decay. Empty groups are left out; the schedule multiplies each group's rate by its ``lr_scale``. A library
    model's pretrained layers in its own head (all but its classifier) count as backbone."""
    if decay_everything and backbone_lr_scale == 1.0:  # one group, in parameter order: the checkpoints before 0.3
        return [{"params": list(model.parameters()), "lr_scale": 1.0, "weight_decay": weight_decay}]
    trunk = {id(p) for part in (getattr(model, "stem", None), getattr(model, "stages", None)) if part is not None
             for p in part.parameters()}
    # a library model's own head may hold pretrained layers besides its classifier (timm's MobileNetV3
    # conv_head, ConvNeXt's head norm): they are backbone too
    own = {k for k in getattr(model, "library_keys", {}) if k not in getattr(model, "classifier_keys", set())}
    trunk |= {id(p) for name, p in model.named_parameters() if name in own}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        no_decay = not decay_everything and (p.dim() < 2 or name.endswith(NO_DECAY_NAMES))
        groups.setdefault((id(p) in trunk, no_decay), []).append(p)
    return [{"params": params, "lr_scale": backbone_lr_scale if in_trunk else 1.0,
             "weight_decay": 0.0 if no_decay else weight_decay}
            for (in_trunk, no_decay), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float, kind: str = "sgd",
                    backbone_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """SGD (L2 on every parameter, as the reference) or AdamW (decoupled decay on weights only), with one
    fused kernel where torch has it, else the foreach path; groups as ``parameter_groups``."""
    groups = parameter_groups(model, weight_decay, backbone_lr_scale, decay_everything=kind == "sgd")
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    make = (lambda **fast: torch.optim.SGD(groups, lr=lr, momentum=momentum, **fast)) if kind == "sgd" else (
        lambda **fast: torch.optim.AdamW(groups, lr=lr, **fast))
    try:
        return make(fused=True)
    except (RuntimeError, TypeError, ValueError):
        return make(foreach=True)


def compile_model(model: nn.Module, example: torch.Tensor, runtime: Runtime) -> nn.Module:
    """torch.compile ``model``, tried on ``example`` (forward + backward, train mode); on failure warn
    and return the eager model. The trial's BatchNorm statistics and gradients are undone."""
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model)
    try:
        with runtime.autocast():
            out = compiled(runtime.inputs(example))
        sum(z.float().sum() for z in out.logits).backward()
    except Exception as e:  # noqa: BLE001  compilers fail in many ways (no C compiler, unsupported op, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("torch.compile failed (%s); training runs eagerly", reason[:200])
        compiled = model
    model.load_state_dict(snapshot)
    model.zero_grad(set_to_none=True)
    return compiled
