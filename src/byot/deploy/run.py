"""Whole deployment jobs on a trained checkpoint: calibrate, early-exit curve and fit, timing, export, predict.

Each returns a plain dict that the CLI prints (as a table or as JSON). Fitting (temperatures,
thresholds) only ever reads the validation hold-out; the test split is only scored.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from byot.config import TrainConfig
from byot.data import NORMALIZATION, DataBundle
from byot.data.folder import RESIZE_RATIO
from byot.deploy.calibration import T_MAX, T_MIN, at_search_edge, calibration_report, fit_temperature
from byot.deploy.cascade import EarlyExitNet
from byot.deploy.export import ExitNetwork, export
from byot.deploy.plots import write_curve
from byot.deploy.policy import NEVER, ExitPolicy, exit_flops, fit_thresholds, policy_stats, sweep
from byot.deploy.policy_file import Fitted, read_fitted, store_fitted
from byot.errors import ByotError
from byot.models import MultiExitNet
from byot.models.cost import exit_costs
from byot.training.build import (
    build_trained,
    check_checkpoint_fits,
    checkpoint_normalization,
    load_data,
    weights_name,
)
from byot.training.evaluate import collect_logits
from byot.training.runtime import Runtime, resolve_device
from byot.version import __version__

log = logging.getLogger("byot")

TIMED_IMAGES = {1: 256, 64: 2048}  # batch size -> images timed (after an untimed pass over the same ones)
TIMING_MEMORY = 2**28  # bytes of normalised images held for timing (fewer images for large ones)


def _checkpoint_path(cfg: TrainConfig) -> Path:
    if not cfg.resume:
        raise ByotError("this command needs --resume CHECKPOINT (a .pth.tar file a byot run wrote)")
    return Path(cfg.resume).expanduser()


def _need_exits(model: MultiExitNet) -> None:
    if model.num_exits < 2:
        raise ByotError("this checkpoint is a plain backbone (--no-distill): it has one exit, nothing to exit early")


def _held_out(cfg: TrainConfig, checkpoint: dict, data: DataBundle, what: str) -> Any:
    """The validation batches, refusing a run that has none (fitting on test would leak it)."""
    if data.val is None:
        raise ByotError(f"{what} needs held-out training images: {cfg.resume} was trained without --val-split. "
                        "Retrain with --val-split 0.1, or pass --val-split F here to hold out images the model "
                        "trained on (fitted values are then biased toward overconfidence)")
    trained_with = checkpoint.get("config", {}).get("val_split", 0.0)
    if cfg.val_split != trained_with:
        log.warning("the checkpoint was trained with --val-split %g; a hold-out of %g includes images it trained on, "
                    "so what is fitted on it is biased toward overconfidence", trained_with, cfg.val_split)
    return data.val


def fitted_for(cfg: TrainConfig, checkpoint: dict) -> Fitted:
    """What calibrate and early-exit fitted for the checkpoint ``--resume`` names: its policy file, or the
    values a byot 0.5.0 checkpoint holds inside."""
    return read_fitted(_checkpoint_path(cfg), checkpoint)


def _temperatures(fitted: Fitted, use_calibration: bool, n_exits: int,
                  ema: bool | None = None) -> tuple[float, ...]:
    """The calibration's temperatures, one per exit; ``ema`` given (the weights run now: True the average),
    temperatures fitted on the other weights are named in a warning."""
    entry = fitted.get("calibration") if use_calibration else {}
    stored = entry.get("temperatures")
    if stored and len(stored) != n_exits:
        raise ByotError(f"the calibration in {fitted.source} has {len(stored)} temperatures for {n_exits} exits")
    if stored and ema is not None:
        _warn_other_weights(entry, ema, "temperatures (byot calibrate)")
    return tuple(stored) if stored else ()


def _warn_other_weights(entry: dict, ema: bool, what: str) -> None:
    """Stored fitted values were fitted on one set of weights (raw before --ema existed)."""
    fitted_on = entry.get("weights", "raw")
    if fitted_on != weights_name(ema):
        log.warning("the stored %s were fitted on the %s weights, not on the %s ones used now; fit them again "
                    "with%s --ema to match", what, fitted_on, weights_name(ema), "" if ema else "out")


def _check_writable(checkpoint: dict, path: Path) -> None:
    """Refuse, before any work, to fit values for a reference-script checkpoint."""
    if checkpoint.get("reference") is not None:
        raise ByotError(f"{path} is the reference script's checkpoint: byot does not write into it (the reference "
                        "could no longer read it); continue it into a byot run first (byot train ARCH --resume "
                        f"{path} --save-folder DIR), then run this command on DIR's checkpoint")


def calibrate(cfg: TrainConfig, checkpoint: dict, ema: bool = False) -> dict[str, Any]:
    """Fit one temperature per exit on the validation split, store them in the checkpoint's policy file, and report
    NLL and ECE before and after on the validation and the test split; ``ema``: of the weight average."""
    path = _checkpoint_path(cfg)
    _check_writable(checkpoint, path)
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    check_checkpoint_fits(checkpoint, data, str(path))
    model, runtime = build_trained(cfg, checkpoint, device, ema)
    val_logits, val_targets = collect_logits(model, _held_out(cfg, checkpoint, data, "calibration"), runtime)
    temperatures = [fit_temperature(z, val_targets) for z in val_logits]
    for exit_id, t in zip(model.exit_stages, temperatures):
        if at_search_edge(t):
            log.warning("exit %d: the fitted temperature %.3g is at the edge of the search range [%g, %g]; its "
                        "predictions are close to %s on the validation split, so this exit's confidences say "
                        "little (train longer, or check the data)", exit_id, t, T_MIN, T_MAX,
                        "chance" if t > 1 else "always right")
    test_logits, test_targets = collect_logits(model, data.test, runtime)
    entry = {"temperatures": temperatures, "split": "val", "val_split": cfg.val_split,
             "num_images": len(val_targets), "weights": weights_name(ema), "byot_version": __version__}
    stored_in = store_fitted(path, checkpoint, "calibration", entry)
    log.info("stored temperatures %s in %s", ", ".join(f"{t:.3f}" for t in temperatures), stored_in)
    return {"checkpoint": str(path), "policy_file": str(stored_in), "weights": weights_name(ema),
            "temperatures": temperatures,
            "num_val_images": len(val_targets), "num_test_images": len(test_targets),
            "val": calibration_report(val_logits, val_targets, temperatures, model.exit_stages),
            "test": calibration_report(test_logits, test_targets, temperatures, model.exit_stages)}


def resolve_policy(fitted: Fitted, n_exits: int, thresholds: Sequence[float] | None, final: str | None,
                   use_calibration: bool = True, ema: bool = False) -> ExitPolicy:
    """--threshold (one value for every shallow exit, or one each), else the fitted policy ``fitted`` holds
    (``fitted_for``: the policy file), else none (every sample answered by the final exit); calibration from
    ``fitted``. ``ema``: the weight average runs, so values fitted on the raw weights are named in a warning."""
    stored = {} if thresholds else fitted.get("early_exit")
    use_stored = bool(stored.get("thresholds"))
    temperatures = _temperatures(fitted, use_calibration, n_exits, None if use_stored else ema)
    if thresholds:
        if len(thresholds) == 1:
            thresholds = list(thresholds) * (n_exits - 1)
        if len(thresholds) != n_exits - 1:
            raise ByotError(f"--threshold takes 1 or {n_exits - 1} values (one per shallow exit), got "
                            f"{len(thresholds)}")
        chosen = tuple(float(t) for t in thresholds)
    elif use_stored:
        _warn_other_weights(stored, ema, "early-exit thresholds (byot early-exit)")
        # fitted thresholds only mean something at the temperatures they were fitted with
        chosen, fitted_with = tuple(stored["thresholds"]), tuple(stored.get("temperatures", ()))
        if len(chosen) != n_exits - 1 or len(fitted_with) not in (0, n_exits):
            raise ByotError(f"the fitted policy in {fitted.source} has {len(chosen)} thresholds and {len(fitted_with)} "
                            f"temperatures for a model of {n_exits} exits; was it edited by hand? Fit it again "
                            "with byot early-exit")
        if fitted_with != temperatures:
            log.info("using the temperatures the stored thresholds were fitted with (%s), not the current "
                     "calibration", ", ".join(f"{t:.3f}" for t in fitted_with) or "none")
        temperatures = fitted_with
        final = final or stored.get("final")
    else:
        chosen = tuple([NEVER] * (n_exits - 1))
    return ExitPolicy(chosen, temperatures, final or "deepest")


def early_exit(cfg: TrainConfig, checkpoint: dict, out_dir: Path | None, final: str,
               budget_flops: float | None = None, max_drop: float | None = None,
               thresholds: Sequence[float] | None = None, use_calibration: bool = True,
               timing: bool = False, ema: bool = False) -> dict[str, Any]:
    """The test split's accuracy-versus-FLOPs curve (JSON, CSV, PNG in ``out_dir``); with ``budget_flops``
    or ``max_drop`` thresholds fitted on the validation split, stored in the policy file, scored on test.
    ``ema``: of the weight average the checkpoint holds instead of its weights."""
    path = _checkpoint_path(cfg)
    if budget_flops is not None or max_drop is not None:
        _check_writable(checkpoint, path)
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    check_checkpoint_fits(checkpoint, data, str(path))
    model, runtime = build_trained(cfg, checkpoint, device, ema)
    _need_exits(model)
    costs = exit_costs(model, checkpoint["image_size"])
    fitted_values = fitted_for(cfg, checkpoint)
    temperatures = _temperatures(fitted_values, use_calibration, model.num_exits, ema)
    test_logits, test_targets = collect_logits(model, data.test, runtime)
    result: dict[str, Any] = {
        "split": "test", "num_images": len(test_targets), "weights": weights_name(ema), "final": final,
        "calibrated": bool(temperatures),
        "points": sweep(test_logits, test_targets, costs, temperatures, final),
        "exits": [{"exit": k, "top1": _top1(z, test_targets), "flops": c["flops"]}
                  for k, z, c in zip(model.exit_stages, test_logits, costs)],
        "ensemble": {"top1": _top1(torch.stack([z.softmax(dim=1) for z in test_logits]).mean(0), test_targets),
                     "flops": costs[-1]["flops"] + sum(c["head_flops"] for c in costs[:-1])},
        "full_flops": costs[-1]["flops"]}
    policy = None
    if budget_flops is not None or max_drop is not None:
        val_logits, val_targets = collect_logits(model, _held_out(cfg, checkpoint, data, "fitting thresholds"),
                                                 runtime)
        policy, fitted = _fit(val_logits, val_targets, costs, temperatures, final, budget_flops, max_drop)
        criterion = {"budget_flops": budget_flops} if budget_flops is not None else {"max_drop": max_drop}
        result["fitted"] = {**fitted, "criterion": criterion, "fitted_on": "val",
                            "test": _scored(test_logits, test_targets, policy, costs)}
        entry = {**policy.to_dict(), "criterion": criterion, "fitted_on": "val", "weights": weights_name(ema),
                 "num_images": len(val_targets), "val_split": cfg.val_split, "val": fitted["val"],
                 "val_reference_top1": fitted["val_reference_top1"], "byot_version": __version__}
        result["policy_file"] = str(store_fitted(path, checkpoint, "early_exit", entry))
        log.info("stored the fitted thresholds in %s (byot predict uses them)", result["policy_file"])
    elif thresholds:
        policy = resolve_policy(fitted_values, model.num_exits, thresholds, final, use_calibration, ema)
        result["given"] = {**policy.to_dict(), "test": _scored(test_logits, test_targets, policy, costs)}
    if timing:
        policy = policy or resolve_policy(fitted_values, model.num_exits, None, final, use_calibration, ema)
        result["timing"] = time_policy(model, policy, data, runtime)
    out_dir = out_dir or path.parent / "early_exit"
    result["files"] = [str(p) for p in write_curve(result, out_dir)]
    return result


def fit_on_validation(cfg: TrainConfig, checkpoint: dict, final: str = "deepest", budget_flops: float | None = None,
                      max_drop: float | None = None) -> dict[str, Any]:
    """Thresholds fitted on the validation split, as ``early_exit`` fits them, and the policy's top-1 and mean
    FLOPs on that same split; nothing is written and the test split is not evaluated (byot tune's early-exit
    objective scores every trial this way)."""
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    check_checkpoint_fits(checkpoint, data, cfg.resume or "the checkpoint")
    model, runtime = build_trained(cfg, checkpoint, device)
    _need_exits(model)
    costs = exit_costs(model, checkpoint["image_size"])
    logits, targets = collect_logits(model, _held_out(cfg, checkpoint, data, "fitting thresholds"), runtime)
    _, fitted = _fit(logits, targets, costs, (), final, budget_flops, max_drop)
    return {**fitted, "full_flops": costs[-1]["flops"], "num_images": len(targets)}


def _fit(logits: torch.Tensor, targets: torch.Tensor, costs: list[dict], temperatures: tuple[float, ...], final: str,
         budget_flops: float | None, max_drop: float | None) -> tuple[ExitPolicy, dict[str, Any]]:
    """Thresholds fitted on validation logits, with the policy's score there and the final exit's alone."""
    policy = fit_thresholds(logits, targets, costs, temperatures, final, budget_flops, max_drop)
    reference = ExitPolicy(tuple([NEVER] * len(policy.thresholds)), temperatures, final)
    return policy, {**policy.to_dict(), "val": policy_stats(logits, targets, costs, policy),
                    "val_reference_top1": policy_stats(logits, targets, costs, reference)["top1"]}


def _top1(scores: torch.Tensor, targets: torch.Tensor) -> float:
    return 100.0 * (scores.argmax(dim=1) == targets).double().mean().item()


def _scored(logits: torch.Tensor, targets: torch.Tensor, policy: ExitPolicy, costs: list[dict]) -> dict[str, Any]:
    stats = policy_stats(logits, targets, costs, policy)
    return {**stats, "speedup": costs[-1]["flops"] / stats["mean_flops"]}


def time_policy(model: MultiExitNet, policy: ExitPolicy, data: DataBundle, runtime: Runtime) -> list[dict]:
    """Wall-clock images/s of the full network (stem, stages, deepest head) and of the real early-exit
    cascade on test images spread over the split, at batch 1 and 64, plus the FLOP speed-up on the same images.

    Steady state, as a serving process would see it: each is timed on a second pass over the images,
    after a first pass has met every batch shape (the cascade's shrinking batches take many sizes, and
    oneDNN and cuDNN prepare a kernel the first time they meet a shape).
    """
    images = torch.cat([b for b, _ in data.test])  # (N, 3, S, S) uint8 on the device
    costs = exit_costs(model, images.shape[-1])
    flops = exit_flops(costs, torch.tensor([policy.thresholds], dtype=torch.float64), policy.final)[0]  # (E,)
    net = EarlyExitNet(model, policy)
    per_image = 3 * images.shape[-1] ** 2 * 4  # bytes of one normalised fp32 image
    rows = []
    for batch_size, wanted in TIMED_IMAGES.items():
        n = min(len(images), wanted, max(batch_size, TIMING_MEMORY // per_image // batch_size * batch_size))
        spread = images[torch.linspace(0, len(images) - 1, n).round().long()]  # test splits may be class-ordered
        chunks = [runtime.inputs(spread[i:i + batch_size]) for i in range(0, n, batch_size)]
        full = _images_per_s(lambda x: model.forward_exit(x, model.exit_stages[-1]), chunks, runtime)
        early = _images_per_s(net, chunks, runtime)
        with runtime.autocast():
            exits = torch.cat([net(x).exit for x in chunks])
        mean = sum(float(flops[model.exit_stages.index(int(k))]) for k in exits.tolist()) / len(exits)
        rows.append({"batch_size": batch_size, "images": len(exits), "full_images_per_s": full,
                     "early_exit_images_per_s": early, "wall_speedup": early / full,
                     "flops_speedup": costs[-1]["flops"] / mean})
    return rows


@torch.inference_mode()
def _images_per_s(fn: Any, chunks: list[torch.Tensor], runtime: Runtime) -> float:
    """Images/s of ``fn`` over ``chunks``, timed on a second pass after an untimed first one."""
    with runtime.autocast():
        for x in chunks:
            fn(x)
        _sync(runtime.device)
        start = time.perf_counter()
        for x in chunks:
            fn(x)
        _sync(runtime.device)
    return sum(len(x) for x in chunks) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resize_ratio(dataset: str) -> float:
    """Evaluation crop of the data set the model learned: image folders are centre-cropped at 0.875;
    CIFAR and digits images were whole, so predict keeps the whole short side."""
    return RESIZE_RATIO if dataset == "imagefolder" else 1.0


def export_checkpoint(cfg: TrainConfig, checkpoint: dict, exit_arg: str, fmt: str, out: Path,
                      force: bool = False, ema: bool = False) -> dict[str, Any]:
    """Write exit ``exit_arg`` (an exit's number, "deepest" or "all") of the checkpoint's model as one standalone file,
    with ``ema`` of the weight average the checkpoint holds. An existing ``out`` is refused unless ``force``; the
    checkpoint itself never."""
    check_output(out, force, _checkpoint_path(cfg))
    model, _ = build_trained(cfg, checkpoint, torch.device("cpu"), ema)
    exits = {"all": list(model.exit_stages), "deepest": model.exit_stages[-1:]}.get(exit_arg) or [_exit_number(exit_arg)]
    mean, std = checkpoint_normalization(checkpoint, NORMALIZATION[cfg.dataset])
    net = ExitNetwork(model, exits, mean, std)
    position = [model.exit_stages.index(k) for k in net.exit_numbers]
    temperatures = _temperatures(fitted_for(cfg, checkpoint), True, model.num_exits, ema)
    size = checkpoint["image_size"]
    metadata = {"byot_version": __version__, "arch": cfg.arch, "weights": weights_name(ema),
                "exits": net.exit_numbers,
                "outputs": [f"logits_exit{k}" for k in net.exit_numbers], "classes": checkpoint["classes"],
                "image_size": size, "resize_ratio": resize_ratio(cfg.dataset),
                "input": f"float32 RGB (B, 3, {size}, {size}) in [0, 1]: short side resized (bilinear) to "
                         f"{round(size / resize_ratio(cfg.dataset))} px, centre {size}x{size} crop, divided by 255",
                "temperatures": [temperatures[p] for p in position] if temperatures else None}
    return {**export(net, fmt, out, size, metadata), "exits": net.exit_numbers, "metadata": metadata}


def check_output(out: Path, force: bool, source: Path) -> None:
    """Refuse, before any work, an output path that would replace the input, an existing file without
    ``force``, a folder, or a place that cannot be created."""
    out = out.expanduser()
    if out.exists() and source.exists() and os.path.samefile(out, source):
        raise ByotError(f"--out {out} is the checkpoint being exported; choose another file name")
    if out.is_dir():
        raise ByotError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.onnx'}")
    if out.exists() and not force:
        raise ByotError(f"--out {out} exists; add --force to replace it, or choose another file name")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ByotError(f"cannot create --out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ByotError(f"cannot write --out {out}: no permission to write in {parent}")


def _exit_number(text: str) -> int:
    try:
        return int(text)
    except ValueError as e:
        raise ByotError(f"--exit {text!r}: give an exit's number, 'deepest' or 'all'") from e
