"""The ``byot`` command: argparse subcommands, each a short list of calls. The only place that prints."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from byot import __version__
from byot.errors import ByotError

if TYPE_CHECKING:
    from byot.config import TrainConfig

# Nothing here imports torch at module level: a Ctrl-C during the seconds torch takes to import then
# arrives inside main(), which turns it into one line, not a traceback.
DEMO = {"arch": "multi_resnet18_kd", "dataset": "digits", "image_size": 32, "width": 16, "epochs": 15,
        "batch_size": 64, "lr": 0.05, "save_folder": "save_checkpoints/demo", "workers": 0}


@lru_cache(maxsize=1)
def _defaults() -> TrainConfig:
    """The defaults shown in --help."""
    from byot.config import TrainConfig

    return TrainConfig()


def _choices(name: str) -> tuple[str, ...]:
    """The choices of option ``name`` from the config's one table."""
    from byot.config import CHOICES

    return CHOICES[name]


def _export_formats() -> tuple[str, ...]:
    from byot.deploy.export import FORMATS

    return FORMATS


def _model_option(text: str) -> tuple[str, Any]:
    """--model-option KEY=VALUE -> (key, value); the value is read as YAML (28 -> int, 0.3 -> float)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE, e.g. depth=28")
    try:
        parsed = yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def _add_model_and_data(p: argparse.ArgumentParser) -> None:
    from byot.data import DATASETS

    D = _defaults()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help=f"data set (default {D.dataset}; digits: the demo's)")
    g.add_argument("--data-dir", help="folder with cifar-100-python/, cifar-10-batches-py/ or train/ + test/")
    g.add_argument("--download", action="store_true", help="download CIFAR with torchvision (needs internet)")
    g.add_argument("--image-size", type=int, help="px; default 32 for CIFAR, 224 for image folders")
    g.add_argument("--val-split", type=float, metavar="FRACTION",
                   help="hold out this share of every training class to select checkpoints; the test split is "
                        "then evaluated once, at the end (default 0: select on test, as the reference)")
    g.add_argument("--workers", type=int, help=f"image-folder decoding processes (default {D.workers})")
    g.add_argument("--skip-corrupt", action="store_true",
                   help="leave unreadable image files out (counted in the log) instead of stopping")
    g = p.add_argument_group("model (taken from the checkpoint with --resume; must agree if given)")
    g.add_argument("--width", type=int, help="base channels of the family (ResNets: 64, WRN/PyramidNet: 16, VGG/"
                   "ResNeXt: 64; 16 runs a ResNet well on a CPU)")
    g.add_argument("--stem", choices=_choices("stem"),
                   help="ResNets, MobileNetV2: cifar (stride 1), imagenet (7x7/2 + max-pool, or stride 2), auto "
                        "(default): imagenet from 64 px up")
    g.add_argument("--exits", metavar="K,K,...",
                   help="stages that get a shallow exit, e.g. 1,2,3 (default: the family's natural stage boundaries); "
                        "the deepest exit is always there")
    g.add_argument("--model-option", dest="model_options", type=_model_option, action="append",
                   metavar="KEY=VALUE", help="an option of the model's family, e.g. depth=28 widen=10 for the "
                   "WideResNets (the model table in the README lists each family's); repeat for several")
    g.add_argument("--no-distill", dest="distill", action="store_false",
                   help="the plain backbone trained with cross-entropy only: the baseline")
    g.add_argument("--head", choices=_choices("head"),
                   help="shallow classifiers: bottleneck (default; the ICCV 2019 paper's) or attention (the TPAMI "
                        "2021 journal version's: a sigmoid attention mask, then depthwise-separable conv blocks)")
    g.add_argument("--pretrained", nargs="?", const="imagenet", metavar="PATH",
                   help="start the backbone from torchvision's ImageNet weights (needs them cached or internet), "
                        "or from a local torchvision ResNet state dict PATH; the exits start fresh (width 64)")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, help=f"images per step (default {D.batch_size}); under torchrun the "
                   "global batch, split over the processes, so a recipe means the same on 1 or N of them")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--amp", choices=_choices("amp"),
                   help="mixed precision (default auto: bf16 on GPUs and CPUs that run it natively, fp16 on "
                        "older GPUs, else off)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW memory format (channels-last is faster on oneDNN CPUs and tensor-core GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (eager if it fails)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm), not per process")
    g.add_argument("--seed", type=int, help=f"seeds weights, order and augmentation (default {D.seed})")
    g.add_argument("--resume", help="checkpoint to continue from (train) or to evaluate (test); 'auto': the "
                   "newest readable checkpoint of the run directory (latest, else previous), or a new run")
    g.add_argument("--save-folder", help=f"run directory = SAVE_FOLDER/ARCH (default {D.save_folder})")
    g.add_argument("--config", dest="config_file", metavar="FILE.yaml",
                   help="YAML file of options (names as the flags); flags given here override it")


def _add_training(p: argparse.ArgumentParser) -> None:
    D = _defaults()
    g = p.add_argument_group("optimisation")
    g.add_argument("--epoch", "--epochs", dest="epochs", type=int, help=f"epochs (default {D.epochs})")
    g.add_argument("--lr", type=float, help=f"initial learning rate (default {D.lr})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {D.momentum})")
    g.add_argument("--weight-decay", type=float, help=f"L2 weight decay (default {D.weight_decay})")
    g.add_argument("--schedule", choices=_choices("schedule"),
                   help="step (default): lr x0.1 at 75/130/180 of 200 epochs, scaled; cosine")
    g.add_argument("--class-weights", choices=_choices("class_weights"),
                   help="balanced: label terms weighted by N / (K * n_class) for imbalanced classes")
    g.add_argument("--accum-steps", type=int, help="batches per optimizer step (effective batch = N x batch)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each stage's activations in backward: less memory, more time")
    g.add_argument("--skip-nonfinite", type=int, metavar="N",
                   help="skip the update of up to N steps whose loss is NaN or infinite (default 0: stop at the "
                        "first, keeping the last good checkpoint)")
    g = p.add_argument_group("self-distillation")
    g.add_argument("--temperature", type=float, help=f"softens the teacher (default {D.temperature})")
    g.add_argument("--alpha", type=float, help=f"KD weight; labels get 1 - alpha (default {D.alpha})")
    g.add_argument("--beta", type=float, help=f"feature-hint weight (default {D.beta})")
    g = p.add_argument_group("output")
    g.add_argument("--print-freq", type=int, help=f"steps between log lines (default {D.print_freq})")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that holds a run")


def build_parser() -> argparse.ArgumentParser:
    from byot.models import list_models

    D = _defaults()
    parser = argparse.ArgumentParser(prog="byot", description="Be Your Own Teacher: train and evaluate "
                                     "multi-exit ResNets with self-distillation.")
    parser.add_argument("--version", action="version", version=f"byot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    arch_help = f"architecture: {', '.join(list_models())}"
    train = sub.add_parser("train", help="train a network", argument_default=argparse.SUPPRESS)
    train.add_argument("arch", help=arch_help)
    _add_model_and_data(train)
    _add_training(train)
    test = sub.add_parser("test", help="evaluate a checkpoint on the test split",
                          argument_default=argparse.SUPPRESS)
    test.add_argument("arch", help=arch_help)
    _add_model_and_data(test)
    test.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    test.add_argument("--per-class", action="store_true",
                      help="per-class accuracy of every exit; confusion_exit<k>.png/.csv beside the checkpoint")
    demo = sub.add_parser("demo", help="train a narrow multi_resnet18_kd on the bundled digits (CPU, minutes)",
                          argument_default=argparse.SUPPRESS)
    demo.add_argument("--epoch", "--epochs", dest="epochs", type=int, help=f"epochs (default {DEMO['epochs']})")
    demo.add_argument("--save-folder", help=f"default {DEMO['save_folder']}")
    demo.add_argument("--device", help="default: cuda when available, else cpu")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    demo.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that holds a run")
    split = sub.add_parser("split", help="split a folder of class folders into train/ and test/ (stratified)")
    split.add_argument("src", help="folder holding one folder per class")
    split.add_argument("--out", required=True, help="destination: receives train/<class>/ and test/<class>/")
    split.add_argument("--test-ratio", type=float, default=0.2, help="share of each class for test (default 0.2)")
    split.add_argument("--seed", type=int, default=0, help="the same seed gives the same split anywhere (default 0)")
    split.add_argument("--mode", choices=("copy", "hardlink", "symlink"), default="copy",
                       help="how files reach DST (default copy)")
    split.add_argument("--force", action="store_true", help="replace DST/train, DST/test and DST/split.json")
    check = sub.add_parser("check-data", help="decode every image of an image folder; list unreadable files")
    check.add_argument("dir", help="a data root with train/ and test/ (or val/), or one folder of class folders")
    check.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this one)")
    bench = sub.add_parser("bench", help="training and per-exit inference speed on synthetic input")
    bench.add_argument("arch", help=arch_help)
    bench.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda if any)")
    bench.add_argument("--batch-size", type=int, default=128)
    bench.add_argument("--image-size", type=int, default=32, help="px (default 32)")
    bench.add_argument("--width", type=int, help="base channels (default: the family's)")
    bench.add_argument("--head", choices=_choices("head"), default=D.head, help="shallow classifiers")
    bench.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (default 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    bench.add_argument("--amp", choices=_choices("amp"), default="auto")
    bench.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    bench.add_argument("--compile", action="store_true")
    bench.add_argument("--variants", action="store_true",
                       help="fp32 eager, + channels_last, + autocast, + compile, each with its ratio to the first")
    bench.add_argument("--json", action="store_true", help="print one JSON object (a list with --variants)")
    _add_deployment(sub, arch_help)
    sweep = sub.add_parser("sweep", help="train a list of configurations x seeds (resumable); one results table")
    sweep.add_argument("config", metavar="SWEEP.yaml", help="name, seeds, base options, rows (see docs/RESULTS.md)")
    sweep.add_argument("--data-dir", help="replaces the sweep file's base data_dir")
    sweep.add_argument("--runs-dir", help="replaces the sweep file's runs_dir (run directories, checkpoints)")
    sweep.add_argument("--out", help="replaces the sweep file's out (results.md, results.json)")
    sweep.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    sweep.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return parser


def _add_policy(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("early-exit policy")
    g.add_argument("--threshold", type=float, nargs="+", metavar="T",
                   help="leave at a shallow exit when its (calibrated) max softmax >= T: one value for every "
                        "shallow exit or one each; default: the thresholds early-exit fitted, else none")
    g.add_argument("--final", choices=("deepest", "ensemble"),
                   help="who answers what no shallow exit takes: the deepest exit (default) or the mean of all")
    g.add_argument("--no-calibration", dest="calibration", action="store_false",
                   help="ignore the temperatures byot calibrate stored in the checkpoint")


def _add_deployment(sub: argparse._SubParsersAction, arch_help: str) -> None:
    cal = sub.add_parser("calibrate", help="fit one temperature per exit on the validation split",
                         argument_default=argparse.SUPPRESS)
    cal.add_argument("arch", help=arch_help)
    _add_model_and_data(cal)
    cal.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ee = sub.add_parser("early-exit", help="accuracy vs FLOPs of confidence-based early exit; fit thresholds",
                        argument_default=argparse.SUPPRESS)
    ee.add_argument("arch", help=arch_help)
    _add_model_and_data(ee)
    _add_policy(ee)
    fit = ee.add_mutually_exclusive_group()
    fit.add_argument("--budget-flops", type=float, metavar="F",
                     help="fit thresholds on validation: the most accurate policy within F FLOPs per image")
    fit.add_argument("--max-drop", type=float, metavar="POINTS",
                     help="fit thresholds on validation: the cheapest policy at most POINTS top-1 below the "
                          "final exit")
    ee.add_argument("--time", action="store_true",
                    help="also time the real early-exit cascade against the full network at batch 1 and 64")
    ee.add_argument("--out", help="folder for curve.json/.csv/.png (default: early_exit/ beside the checkpoint)")
    ee.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    exp = sub.add_parser("export", help="the network up to one exit (or all) as ONNX, TorchScript or safetensors",
                         argument_default=argparse.SUPPRESS)
    exp.add_argument("arch", help=arch_help)
    exp.add_argument("--resume", required=True, help="the checkpoint to export")
    exp.add_argument("--exit", dest="exit_number", default="deepest",
                     help="an exit's number (the stage it reads: 1-4 for the ResNets), 'deepest' (default) or 'all'")
    exp.add_argument("--format", dest="fmt", choices=_export_formats(), default="onnx")
    exp.add_argument("--out", required=True, help="file to write (an existing file is refused without --force)")
    exp.add_argument("--force", action="store_true", help="replace an existing --out file (never the checkpoint)")
    exp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    pred = sub.add_parser("predict", help="classify image files with the early-exit model",
                          argument_default=argparse.SUPPRESS)
    pred.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    pred.add_argument("--resume", required=True, help="the checkpoint to predict with")
    pred.add_argument("--batch-size", type=int, help="images per forward pass (default: the checkpoint's)")
    pred.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    _add_policy(pred)
    pred.add_argument("--json", action="store_true", help="print one JSON list on stdout")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _given(args: argparse.Namespace, *drop: str) -> dict[str, Any]:
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config_file", *drop)}
    if "model_options" in given:  # [(key, value), ...] from repeated --model-option
        given["model_options"] = dict(given["model_options"])
    return given


def _setup_logging(progress_bar: bool, quiet: bool = False) -> None:
    """Log lines on stderr (step lines too, unless a progress bar shows them); ``quiet``: warnings only."""
    root = logging.getLogger("byot")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO if progress_bar else logging.DEBUG)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    root.propagate = False


def _run_training(given: dict[str, Any], config_file: str | None, overwrite: bool) -> int:
    from byot.engine.distributed import launched_by_torchrun
    from byot.engine.run import LATEST, fit, resolve_config
    from byot.engine.signals import Interrupted, handle_signals

    main_process = launched_by_torchrun().is_main  # under torchrun only rank 0 logs, prints and writes
    show_bar = given.get("progress", True) and sys.stderr.isatty() and main_process
    _setup_logging(show_bar, quiet=not main_process)
    cfg, checkpoint = resolve_config(given, config_file)
    show_bar = cfg.progress and show_bar
    cfg = dataclasses.replace(cfg, progress=show_bar)
    try:
        with handle_signals():
            records = fit(cfg, checkpoint, overwrite=overwrite)
    except (KeyboardInterrupt, Interrupted) as e:
        code = e.exit_code if isinstance(e, Interrupted) else 130
        if not main_process:
            return code
        latest = cfg.run_dir / LATEST
        where = (f"continue with --resume {latest} (or --resume auto)" if latest.exists()
                 else "no epoch had finished, so there is nothing to resume")
        name = "SIGTERM" if isinstance(e, Interrupted) and e.signum == signal.SIGTERM else "Ctrl-C"
        print(f"byot: interrupted ({name}); every finished epoch is saved: {where}", file=sys.stderr)
        return code
    if not main_process:
        return 0
    if records and "final_test" in records[-1]:
        final = records[-1]["final_test"]
        print(f"test split, evaluated once with model_best (epoch {final['epoch']}, selected on validation):")
        print(format_table(final["exits"], final["ensemble"], None))
    elif records:
        print(f"last epoch, {records[-1]['eval_split']} split:")
        print(format_table(records[-1]["exits"], records[-1]["ensemble"], None))
    if records:
        print(f"run directory: {cfg.run_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    overwrite = getattr(args, "overwrite", False)
    return _run_training(_given(args, "overwrite"), getattr(args, "config_file", None), overwrite)


def cmd_demo(args: argparse.Namespace) -> int:
    print("byot demo: multi_resnet18_kd (width 16) with self-distillation on scikit-learn's 8x8 digits, "
          "upscaled to 32 px", file=sys.stderr)
    return _run_training({**DEMO, **_given(args, "overwrite")}, None, getattr(args, "overwrite", False))


def cmd_test(args: argparse.Namespace) -> int:
    from byot.engine.run import resolve_config, test_checkpoint

    given = _given(args, "json", "per_class")
    _setup_logging(False)
    cfg, checkpoint = resolve_config(given, getattr(args, "config_file", None))
    if checkpoint is None:
        raise ByotError("byot test needs --resume CHECKPOINT (a .pth.tar file a byot run wrote)")
    per_class = getattr(args, "per_class", False)
    result = test_checkpoint(cfg, checkpoint, per_class)
    if getattr(args, "json", False):
        print(json.dumps(result))
        return 0
    print(f"{cfg.arch} on {cfg.dataset} test split ({result['num_images']} images), "
          f"checkpoint epoch {result['epoch']}, evaluated in {result['precision']}")
    print(format_table(result["exits"], result["ensemble"], result["exits"]))
    if per_class:
        from byot.engine.reports import format_per_class

        print(format_per_class(result["per_class"], [e["exit"] for e in result["exits"]], result["class_counts"]))
        print("wrote " + ", ".join(result["confusion_files"]))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Exit 0 when every run finished, 1 when some failed (their logs are named)."""
    from byot.sweep import format_results, load_sweep, run_sweep, summarise, write_results

    _setup_logging(False)
    sweep = load_sweep(args.config, {"data_dir": args.data_dir} if args.data_dir else None)
    sweep = dataclasses.replace(sweep, runs_dir=Path(args.runs_dir or sweep.runs_dir), out=Path(args.out or sweep.out))
    statuses = run_sweep(sweep, dry_run=args.dry_run)
    if args.dry_run:
        for st in statuses:
            print(f"{st.row}, seed {st.seed}: {'finished' if st.state == 'done' else st.detail}")
        return 0
    summary = summarise(sweep, statuses)
    paths = write_results(summary, sweep.out)
    print(json.dumps(summary) if args.json else format_results(summary) + "\nwrote " + ", ".join(map(str, paths)))
    failed = [st for st in statuses if st.state == "failed"]
    for st in failed:
        print(f"byot: {st.row}, seed {st.seed} failed: {st.detail} (see {st.run_dir.parent / 'sweep.log'})",
              file=sys.stderr)
    return 1 if failed else 0


POLICY_OPTIONS = ("threshold", "final", "calibration")


def _trained(args: argparse.Namespace, *drop: str) -> tuple[TrainConfig, dict]:
    """The run configuration and checkpoint of a command that works on a trained model."""
    from byot.engine.run import resolve_config

    _setup_logging(False)
    cfg, checkpoint = resolve_config(_given(args, *drop), getattr(args, "config_file", None))
    if checkpoint is None:
        raise ByotError(f"byot {args.command} needs --resume CHECKPOINT (a .pth.tar file a byot run wrote)")
    return cfg, checkpoint


def cmd_calibrate(args: argparse.Namespace) -> int:
    from byot.deploy.run import calibrate
    from byot.deploy.tables import format_calibration

    cfg, checkpoint = _trained(args, "json")
    result = calibrate(cfg, checkpoint)
    print(json.dumps(result) if getattr(args, "json", False) else format_calibration(result))
    return 0


def cmd_early_exit(args: argparse.Namespace) -> int:
    from byot.deploy.run import early_exit
    from byot.deploy.tables import format_early_exit

    options = ("json", "budget_flops", "max_drop", "time", "out", *POLICY_OPTIONS)
    cfg, checkpoint = _trained(args, *options)
    o = {k: getattr(args, k, None) for k in options}
    out = Path(o["out"]) if o["out"] else None
    result = early_exit(cfg, checkpoint, out, o["final"] or "deepest", o["budget_flops"], o["max_drop"],
                        o["threshold"], getattr(args, "calibration", True), bool(o["time"]))
    print(json.dumps(result) if o["json"] else format_early_exit(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from byot.deploy.run import export_checkpoint
    from byot.deploy.tables import format_export

    cfg, checkpoint = _trained(args, "exit_number", "fmt", "out", "json", "force")
    result = export_checkpoint(cfg, checkpoint, args.exit_number, args.fmt, Path(args.out),
                               getattr(args, "force", False))
    print(json.dumps(result) if getattr(args, "json", False) else format_export(result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Exit 0 when every file was classified, 1 when some could not be read (listed on stderr)."""
    from byot.deploy.predict import predict_paths
    from byot.deploy.tables import format_predictions

    cfg, checkpoint = _trained(args, "paths", "json", *POLICY_OPTIONS)
    rows, errors = predict_paths(cfg, checkpoint, args.paths, getattr(args, "threshold", None),
                                 getattr(args, "final", None), getattr(args, "calibration", True))
    for line in errors:
        print(f"byot: {line}", file=sys.stderr)
    if not rows:
        raise ByotError(f"none of the {len(errors)} file(s) could be read as an image")
    print(json.dumps(rows) if getattr(args, "json", False) else format_predictions(rows))
    return 1 if errors else 0


def format_table(exits: list[dict], ensemble: dict, costs: list[dict] | None) -> str:
    """Per-exit accuracy table; with ``costs`` a column of each exit's share of the full compute."""
    head = f"{'exit':<9}{'top-1':>8}{'top-5':>8}" + (f"{'compute':>10}{'MFLOPs':>10}" if costs else "")
    rows = [head]
    for e in exits:
        row = f"{e['exit']:<9}{e['top1']:>8.2f}{e['top5']:>8.2f}"
        if costs:
            row += f"{e['compute_share'] * 100:>9.0f}%{e['flops'] / 1e6:>10.1f}"
        rows.append(row)
    rows.append(f"{'ensemble':<9}{ensemble['top1']:>8.2f}{ensemble['top5']:>8.2f}")
    return "\n".join(rows)


def cmd_split(args: argparse.Namespace) -> int:
    from byot.data.split import format_split_table, split_folder

    _setup_logging(False)
    report = split_folder(Path(args.src), Path(args.out), args.test_ratio, args.seed, args.mode, args.force)
    print(format_split_table(report))
    print(f"wrote {args.out}/train, {args.out}/test and {report.manifest}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    """Exit 0 when every image decodes, 1 when some do not (for scripts), 2 for a bad folder."""
    from byot.data.scan import format_scan, scan_folder

    _setup_logging(False)
    reports = scan_folder(Path(args.dir), args.workers)
    print(format_scan(reports))
    return 1 if any(r.corrupt for r in reports.values()) else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from byot.config import check_range
    from byot.engine.bench import BenchSpec, run_bench, run_variants

    for name in ("batch_size", "width", "image_size"):  # the ranges byot train checks, from the same table
        check_range(name, getattr(args, name))
    if args.steps < 1 or args.warmup < 0:
        raise ByotError("--steps must be at least 1 and --warmup at least 0")
    spec = BenchSpec(args.arch, args.device, args.batch_size, args.image_size, args.steps, args.warmup, args.amp,
                     args.channels_last, args.compile, args.width, head=args.head)
    if args.variants:
        rows = run_variants(spec)
        print(json.dumps(rows) if args.json else format_variants(rows))
        return 0
    result = run_bench(spec)
    print(json.dumps(result) if args.json else format_bench(result))
    return 0


def format_bench(r: dict) -> str:
    full = r["exits"][-1]["flops"]
    lines = [(f"{r['arch']} (width {r['width']}) on {r['device']}, batch {r['batch_size']}, {r['image_size']} px, "
              f"amp {r['amp']}, channels_last {r['channels_last']}, compile {r['compile']}"),
             f"training: {r['train_images_per_s']:.1f} images/s, peak memory {r['peak_memory_mb']:.0f} MB",
             f"{'exit':<6}{'infer img/s':>13}{'MFLOPs':>10}{'compute':>9}"]
    for e in r["exits"]:
        lines.append(f"{e['exit']:<6}{e['infer_images_per_s']:>13.1f}{e['flops'] / 1e6:>10.1f}"
                     f"{e['flops'] / full * 100:>8.0f}%")
    return "\n".join(lines)


def format_variants(rows: list[dict]) -> str:
    base = rows[0]["train_images_per_s"]
    r0 = rows[0]
    lines = [f"{r0['arch']} (width {r0['width']}) on {r0['device']}, batch {r0['batch_size']}, {r0['image_size']} px",
             f"{'variant':<18}{'amp':>6}{'train img/s':>13}{'x fp32':>8}{'peak MB':>9}{'infer img/s (deepest)':>22}"]
    for r in rows:
        lines.append(f"{r['variant']:<18}{r['amp']:>6}{r['train_images_per_s']:>13.1f}"
                     f"{r['train_images_per_s'] / base:>8.2f}{r['peak_memory_mb']:>9.0f}"
                     f"{r['exits'][-1]['infer_images_per_s']:>22.1f}")
    return "\n".join(lines)


COMMANDS = {"train": cmd_train, "test": cmd_test, "demo": cmd_demo, "bench": cmd_bench, "split": cmd_split,
            "check-data": cmd_check_data, "calibrate": cmd_calibrate, "early-exit": cmd_early_exit,
            "export": cmd_export, "predict": cmd_predict, "sweep": cmd_sweep}


def main(argv: Sequence[str] | None = None) -> int:
    from byot.engine.signals import stop_with_parent_if_asked

    _tolerant_output()
    stop_with_parent_if_asked()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except ByotError as e:
        print(f"byot: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # training says how to resume itself; elsewhere nothing is left half-done
        print("byot: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def _tolerant_output() -> None:
    """Names that are not valid UTF-8 (a class folder named in Latin-1) reach the terminal escaped
    (``\\xe9``) instead of stopping the command with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


def _one_line(error: Exception) -> str:
    """The message; errors raised in DataLoader workers arrive wrapped in a traceback: keep the user's line.
    A message may continue on indented lines (a list of files)."""
    text = str(error).strip()
    if "Traceback" in text:
        return [line for line in text.splitlines() if line.strip()][-1].split("ByotError: ", 1)[-1]
    return text
