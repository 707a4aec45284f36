"""``byot bench``: training and per-exit inference throughput on synthetic input, plus peak memory.

Training goes through the same path as ``byot train`` (batched crop/flip, normalisation, forward,
every loss term, backward, optimizer step) so the numbers are what a run gets.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from byot.data import NORMALIZATION, Batches
from byot.data.augment import AugmentedBatches, AugmentSpec
from byot.data.batches import TensorBatches
from byot.data.images import ImageSet
from byot.errors import ByotError
from byot.losses import SelfDistillLoss
from byot.models import MultiExitNet, create_model
from byot.models.cost import exit_costs
from byot.models.library import LibraryNet
from byot.training.runtime import Runtime, build_optimizer, compile_model, make_runtime, resolve_device
from byot.training.train import train_step


@dataclass(frozen=True)
class BenchSpec:
    arch: str = "multi_resnet18_kd"
    device: str = "cpu"
    batch_size: int = 128
    image_size: int = 32
    steps: int = 10  # timed steps after warm-up
    warmup: int = 3  # untimed steps (allocator, oneDNN/cuDNN algorithm choice, compilation)
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    width: int | None = None  # the family's base channels; None: its default
    num_classes: int = 100
    head: str = "bottleneck"  # shallow classifiers
    model_options: tuple = ()  # the family's other options, (key, value) pairs
    rounds: int = 3  # library models: alternating timed rounds of the library's forward and byot's
    augment: str = "none"  # training also timed with this per-image augmentation (--augment), alternating
    cutout: int = 0  # ... and this Cutout (--cutout)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _synthetic_batches(spec: BenchSpec, device: torch.device, augment: AugmentSpec | None = None) -> Batches:
    g = torch.Generator().manual_seed(0)
    n = spec.batch_size * 2
    images = torch.randint(0, 256, (n, 3, spec.image_size, spec.image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, spec.num_classes, (n,), generator=g)
    data = ImageSet(images, labels, [str(i) for i in range(spec.num_classes)])
    batches = TensorBatches(data, spec.batch_size, True, seed=0, device=device)
    return AugmentedBatches(batches, augment, seed=0) if augment is not None and augment.active else batches


def _augment_spec(spec: BenchSpec) -> AugmentSpec:
    return AugmentSpec(spec.augment, "cifar10" if spec.image_size <= 32 else "imagenet", 128, spec.cutout)


def _time_training(model: MultiExitNet, forward: torch.nn.Module, spec: BenchSpec, runtime: Runtime,
                   augment: AugmentSpec | None = None) -> float:
    batches = _synthetic_batches(spec, runtime.device, augment)
    optimizer = build_optimizer(model, 0.01, 0.9, 5e-4)
    scaler, loss_fn = runtime.grad_scaler(), SelfDistillLoss()
    model.train()

    def run(steps: int) -> None:
        done = 0
        while done < steps:
            for images, targets in batches:
                if done == steps:
                    break
                train_step(forward, [(images, targets)], optimizer, loss_fn, runtime, scaler, model.exit_stages)
                done += 1

    run(spec.warmup)
    _sync(runtime.device)
    start = time.perf_counter()
    run(spec.steps)
    _sync(runtime.device)
    return spec.steps * spec.batch_size / (time.perf_counter() - start)


@torch.inference_mode()
def _time_inference(forward: torch.nn.Module, model: MultiExitNet, spec: BenchSpec, runtime: Runtime,
                    depth: int) -> float:
    model.eval()
    images = torch.randint(0, 256, (spec.batch_size, 3, spec.image_size, spec.image_size), dtype=torch.uint8,
                           device=runtime.device)
    steps = max(spec.steps, 3)
    for i in range(spec.warmup + steps):
        if i == spec.warmup:
            _sync(runtime.device)
            start = time.perf_counter()
        with runtime.autocast():
            forward(runtime.inputs(images), depth=depth)
    _sync(runtime.device)
    return steps * spec.batch_size / (time.perf_counter() - start)


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Measure one configuration; returns the ``byot bench --json`` object."""
    device = resolve_device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ByotError("--device cuda asked for, but torch sees no CUDA GPU here")
    mean, std = NORMALIZATION["cifar100"]
    torch.manual_seed(0)
    options = {**dict(spec.model_options), **({} if spec.width is None else {"width": spec.width})}
    model = create_model(spec.arch, spec.num_classes, spec.image_size, head=spec.head, **options)
    runtime = make_runtime(device, mean, std, spec.amp, spec.channels_last, model)
    model = runtime.place(model)
    costs = exit_costs(model, spec.image_size)
    forward: torch.nn.Module = model
    if spec.compile:
        example = torch.zeros(2, 3, spec.image_size, spec.image_size, dtype=torch.uint8, device=device)
        forward = compile_model(model, example, runtime)
    train_ips = _time_training(model, forward, spec, runtime)
    augmented = {}
    if _augment_spec(spec).active:  # alternating rounds with and without: the ratio within one run
        plain, strong = [train_ips], []
        for i in range(spec.rounds):
            strong.append(_time_training(model, forward, spec, runtime, _augment_spec(spec)))
            if i < spec.rounds - 1:
                plain.append(_time_training(model, forward, spec, runtime))
        train_ips, with_aug = sorted(plain)[len(plain) // 2], sorted(strong)[len(strong) // 2]
        augmented = {"augment": spec.augment, "cutout": spec.cutout, "train_augmented_images_per_s": with_aug,
                     "augment_cost": train_ips / with_aug - 1.0}
    exits = [{"exit": c["exit"], "infer_images_per_s": _time_inference(forward, model, spec, runtime, c["exit"]),
              "flops": c["flops"]} for c in costs]
    library = _library_check(spec, options, runtime) if isinstance(model, LibraryNet) else None
    return {**({"library_check": library} if library else {}),"arch": spec.arch, "device": str(device), "batch_size": spec.batch_size, "image_size": spec.image_size,
            "amp": runtime.amp, "channels_last": runtime.channels_last, "compile": spec.compile,
            "train_images_per_s": train_ips, **augmented, "peak_memory_mb": _peak_memory_mb(device), "exits": exits,
            "width": getattr(model.spec, "width", spec.width), "head": spec.head, "model_options": dict(spec.model_options),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


@torch.inference_mode()
def _library_check(spec: BenchSpec, options: dict, runtime: Runtime) -> dict[str, float]:
    """Inference img/s of the library model's own forward and of byot's staged forward of the same plain
    backbone (the same modules, weights, batch and runtime), in alternating rounds: what the split costs."""
    torch.manual_seed(0)
    plain = runtime.place(create_model(spec.arch, spec.num_classes, spec.image_size, exits=False, **options)).eval()
    owner = plain.__dict__["_library_model"].eval()
    images = torch.randint(0, 256, (spec.batch_size, 3, spec.image_size, spec.image_size), dtype=torch.uint8,
                           device=runtime.device)
    steps = max(spec.steps, 3)

    def rate(forward: Any) -> float:
        for _ in range(spec.warmup):
            with runtime.autocast():
                forward(runtime.inputs(images))
        _sync(runtime.device)
        start = time.perf_counter()
        for _ in range(steps):
            with runtime.autocast():
                forward(runtime.inputs(images))
        _sync(runtime.device)
        return steps * spec.batch_size / (time.perf_counter() - start)

    library, staged = [], []
    for _ in range(spec.rounds):
        library.append(rate(owner))
        staged.append(rate(plain))
    lib, own = sorted(library)[len(library) // 2], sorted(staged)[len(staged) // 2]
    return {"library_images_per_s": lib, "staged_images_per_s": own, "staged_over_library": own / lib}


VARIANTS = [  # (name, amp, channels_last, compile): each adds one thing to the row before
    ("fp32 eager", "off", False, False),
    ("+ channels_last", "off", True, False),
    ("+ autocast", "auto", True, False),  # auto: bf16 on GPUs and bf16-capable CPUs, fp32 elsewhere
    ("+ compile", "auto", True, True),
]


def run_variants(spec: BenchSpec) -> list[dict[str, Any]]:
    """Each variant in its own process, so that peak memory (RSS on a CPU) is its own."""
    results = []
    for name, amp, channels_last, compiled in VARIANTS:
        args = [sys.executable, "-m", "byot", "bench", spec.arch, "--device", spec.device, "--batch-size",
                str(spec.batch_size), "--image-size", str(spec.image_size), "--steps", str(spec.steps),
                "--warmup", str(spec.warmup), "--head", spec.head, "--amp", amp, "--json",
                *(["--width", str(spec.width)] if spec.width is not None else []),
                *[a for k, v in spec.model_options for a in ("--model-option", f"{k}={v}")]]
        args += ([] if channels_last else ["--no-channels-last"]) + (["--compile"] if compiled else [])
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ByotError(f"bench variant '{name}' failed: {proc.stderr.strip().splitlines()[-1:]}")
        results.append({"variant": name, **json.loads(proc.stdout)})
    return results
