"""The ``byot`` argument parser: every subcommand and its flags, with the defaults shown in --help."""

from __future__ import annotations

import argparse
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from byot.version import __version__

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



PARSERS = {"model_option": _model_option}  # option values the command line reads with a function of its own
ACTIONS = {"boolean_optional": argparse.BooleanOptionalAction}


def add_options(p: argparse.ArgumentParser, sections: tuple[str, ...],
                extra: dict[str, Any] | None = None) -> None:
    """The flags of ``sections``' options, generated from their one definition (``byot.config``); ``extra``:
    {section: function} adding a command's own flags to a section's group (--config, --overwrite)."""
    from byot.config import SECTIONS, default_of, options

    for section in sections:
        group = p.add_argument_group(SECTIONS[section])
        for name, (field, option) in options().items():
            if option.section == section and option.flags != ("arch",):
                group.add_argument(*(option.flags or ("--" + name.replace("_", "-"),)), dest=name,
                                   **_argparse_keywords(field, option, default_of(field)))
        if extra and section in extra:
            extra[section](group)


def _argparse_keywords(field: Any, option: Any, default: Any) -> dict[str, Any]:
    keywords: dict[str, Any] = dict(option.extra)
    parse = keywords.pop("parse", None)
    if keywords.get("action") in ACTIONS:
        keywords["action"] = ACTIONS[keywords["action"]]
    if parse is not None:
        keywords["type"] = PARSERS[parse]
    elif "action" not in keywords:
        keywords["type"] = {"int": int, "float": float}.get(str(field.type).split(" |")[0], str)
    if option.choices:
        keywords["choices"] = option.choices
    keywords["help"] = option.help.format(default=default)
    return keywords


def _config_flag(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--config", dest="config_file", metavar="FILE.yaml",
                       help="YAML file of options (names as the flags); flags given here override it")


def _overwrite_flag(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that holds a run")


def _add_model_and_data(p: argparse.ArgumentParser) -> None:
    add_options(p, ("data", "model", "run"), {"run": _config_flag})


def _add_training(p: argparse.ArgumentParser) -> None:
    add_options(p, ("optimisation", "augmentation", "loss", "output"), {"output": _overwrite_flag})



def build_parser() -> argparse.ArgumentParser:
    from byot.models import list_models

    D = _defaults()
    parser = argparse.ArgumentParser(prog="byot", description="Be Your Own Teacher: train and evaluate "
                                     "multi-exit networks with self-distillation.")
    parser.add_argument("--version", action="version", version=f"byot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    arch_help = f"architecture: {', '.join(list_models())}; or timm/NAME (any timm model) or tv/NAME (torchvision)"
    train = sub.add_parser("train", help="train a network", argument_default=argparse.SUPPRESS)
    train.add_argument("arch", nargs="?", help=arch_help + " (may come from --config FILE, e.g. byot tune's best.yaml)")
    _add_model_and_data(train)
    _add_training(train)
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: continue although options that change what is learned (loss, "
                            "recipe, augmentation, optimizer, schedule, data) differ from the checkpoint's; "
                            "the change and its epoch are recorded in config.yaml and metrics.jsonl")
    test = sub.add_parser("test", help="evaluate a checkpoint on the test split",
                          argument_default=argparse.SUPPRESS)
    test.add_argument("arch", help=arch_help)
    _add_model_and_data(test)
    _add_ema(test)
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
    bench.add_argument("--model-option", dest="model_options", type=_model_option, action="append", default=[],
                       metavar="KEY=VALUE", help="an option of the model's family (as byot train's)")
    bench.add_argument("--head", choices=_choices("head"), default=D.head, help="shallow classifiers")
    bench.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (default 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    bench.add_argument("--amp", choices=_choices("amp"), default="auto")
    bench.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    bench.add_argument("--compile", action="store_true")
    bench.add_argument("--augment", choices=_choices("augment"), default="none",
                       help="also time training with this per-image augmentation, in rounds alternating with "
                            "plain crop/flip (the cost as a ratio within one run)")
    bench.add_argument("--cutout", type=int, default=0, metavar="PX", help="... and this Cutout (with --augment)")
    bench.add_argument("--variants", action="store_true",
                       help="fp32 eager, + channels_last, + autocast, + compile, each with its ratio to the first")
    bench.add_argument("--json", action="store_true", help="print one JSON object (a list with --variants)")
    _add_deployment(sub, arch_help)
    models = sub.add_parser("models", help="every registered model: family options, parameters, FLOPs per exit")
    models.add_argument("names", nargs="*", metavar="ARCH",
                        help="only these (also timm/NAME, tv/NAME); default every registered model")
    models.add_argument("--num-classes", type=int, default=100, help="classes of the heads (default 100)")
    models.add_argument("--image-size", type=int, default=32, help="px (default 32)")
    models.add_argument("--head", choices=_choices("head"), default=D.head, help="shallow classifiers")
    models.add_argument("--markdown", action="store_true", help="a markdown table (the README's)")
    models.add_argument("--json", action="store_true", help="print one JSON list")
    sweep = sub.add_parser("sweep", help="train a list of configurations x seeds (resumable); one results table")
    sweep.add_argument("config", metavar="SWEEP.yaml", help="name, seeds, base options, rows (see docs/RESULTS.md)")
    sweep.add_argument("--data-dir", help="replaces the sweep file's base data_dir")
    sweep.add_argument("--runs-dir", help="replaces the sweep file's runs_dir (run directories, checkpoints)")
    sweep.add_argument("--out", help="replaces the sweep file's out (results.md, results.json)")
    sweep.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    sweep.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _add_tune(sub)
    return parser



def _add_tune(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser("tune", help="hyper-parameter search with Optuna on the validation split (resumable, "
                          "pruned, parallel)", argument_default=argparse.SUPPRESS)
    tune.add_argument("config", nargs="?", metavar="TUNE.yaml",
                      help="name, base options, search space (see docs/TUNING.md); not needed with --summary")
    g = tune.add_argument_group("study")
    g.add_argument("--trials", type=int, help="trials the study should have, counting complete, pruned and failed "
                   "ones (default: the file's trials, else 20)")
    g.add_argument("--storage", help="Optuna storage: a file (.db: SQLite; another name: a journal file) or an "
                   "SQLAlchemy URL (sqlite:///F.db, postgresql://..., mysql+pymysql://...); default "
                   "runs/tune/NAME.db")
    g.add_argument("--study-name", help="the study in the storage (default: the file's name)")
    g.add_argument("--out", help="study folder: trials' run directories, best.yaml, trials.csv, plots (default: "
                   "a folder named after the study beside the storage file)")
    g.add_argument("--jobs", type=int, default=1, help="trials trained at once on this machine, the cores divided "
                   "between them (default 1)")
    g.add_argument("--objective", help="deepest (default), exit:N, ensemble (validation top-1), or early-exit "
                   "(validation top-1 and mean FLOPs of a fitted early-exit policy: two objectives)")
    g.add_argument("--budget-flops", type=float, metavar="F",
                   help="early-exit objective: fit thresholds within F FLOPs per image")
    g.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="early-exit objective: fit the cheapest thresholds at most POINTS below the deepest exit "
                        "(default 1)")
    g.add_argument("--pruner", help="median (default), hyperband, successive-halving or none")
    g.add_argument("--sampler", help="tpe (default), random or nsga2")
    g.add_argument("--sampler-seed", type=int, help="seeds the sampler (default 0)")
    g.add_argument("--summary", action="store_true",
                   help="train nothing: the study's table, best.yaml, trials.csv and plots")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _add_model_and_data(tune)
    _add_training(tune)



def _add_policy(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("early-exit policy")
    g.add_argument("--threshold", type=float, nargs="+", metavar="T",
                   help="leave at a shallow exit when its (calibrated) max softmax >= T: one value for every "
                        "shallow exit or one each; default: the thresholds in the checkpoint's policy file "
                        "(fitted by early-exit), else none")
    g.add_argument("--final", choices=("deepest", "ensemble"),
                   help="who answers what no shallow exit takes: the deepest exit (default) or the mean of all")
    g.add_argument("--no-calibration", dest="calibration", action="store_false",
                   help="ignore the temperatures in the checkpoint's policy file (fitted by byot calibrate)")



def _add_ema(p: argparse.ArgumentParser) -> None:
    # a switch, not train's --ema DECAY: it picks the weights the command runs; the training option is untouched
    p.add_argument("--ema", action="store_true",
                   help="use the weight average (EMA) that byot train --ema saved in the checkpoint, instead of "
                        "the raw weights")



def _add_deployment(sub: argparse._SubParsersAction, arch_help: str) -> None:
    cal = sub.add_parser("calibrate", help="fit one temperature per exit on the validation split (stored in the "
                         "policy file CHECKPOINT.policy.json)",
                         argument_default=argparse.SUPPRESS)
    cal.add_argument("arch", help=arch_help)
    _add_model_and_data(cal)
    _add_ema(cal)
    cal.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ee = sub.add_parser("early-exit", help="accuracy vs FLOPs of confidence-based early exit; fit thresholds "
                        "(stored in the policy file CHECKPOINT.policy.json)",
                        argument_default=argparse.SUPPRESS)
    ee.add_argument("arch", help=arch_help)
    _add_model_and_data(ee)
    _add_ema(ee)
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
                     help="an exit's number (the stage it reads: one of the model's exits, e.g. 1-4 for a ResNet with "
                          "its natural exits), 'deepest' (default) or 'all'")
    exp.add_argument("--format", dest="fmt", choices=_export_formats(), default="onnx")
    exp.add_argument("--out", required=True, help="file to write (an existing file is refused without --force)")
    exp.add_argument("--force", action="store_true", help="replace an existing --out file (never the checkpoint)")
    _add_ema(exp)
    exp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    pred = sub.add_parser("predict", help="classify image files with the early-exit model",
                          argument_default=argparse.SUPPRESS)
    pred.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    pred.add_argument("--resume", required=True, help="the checkpoint to predict with")
    pred.add_argument("--batch-size", type=int, help="images per forward pass (default: the checkpoint's)")
    pred.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    _add_ema(pred)
    _add_policy(pred)
    pred.add_argument("--json", action="store_true", help="print one JSON list on stdout")



def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
