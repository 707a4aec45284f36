"""The ``byot`` argument parser: every subcommand and its flags, with the defaults shown in --help."""

from __future__ import annotations

import argparse
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from byot import __version__

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
    g.add_argument("--no-final-test", dest="final_test", action="store_false",
                   help="with --val-split: do not evaluate the test split at the end (byot tune's trials; "
                        "evaluate model_best later with byot test)")
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
    g.add_argument("--feature-loss", choices=_choices("feature_loss"),
                   help="the feature term: hint (default: masked squared distance of the pooled features, ICCV) or adapted (L2 "
                        "distance of a learned linear adaptation of each shallow feature to the deepest's, journal)")
    g.add_argument("--feature-skip", choices=_choices("feature_skip"),
                   help="exits without a feature term: none (default) or second-deepest (the journal code's, "
                        "whose comment says it meant the shallowest)")
    g.add_argument("--pretrained", nargs="?", const="imagenet", metavar="PATH",
                   help="start the backbone from a local weights file PATH (a torch state dict or .safetensors of "
                        "the torchvision ResNet, timm/ or tv/ model), or without PATH from the library's own "
                        "ImageNet weights (needs them cached or internet); the exits and classifier start fresh")
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
    g.add_argument("--optimizer", choices=_choices("optimizer"),
                   help="sgd (default, the reference's) or adamw (decoupled weight decay, none on norms, biases "
                        "and tokens; the usual choice for fine-tuning transformers)")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {D.momentum})")
    g.add_argument("--weight-decay", type=float, help=f"weight decay (default {D.weight_decay}; SGD: L2 on every "
                   "parameter, as the reference)")
    g.add_argument("--backbone-lr-scale", type=float, metavar="FACTOR",
                   help="learning rate of the stem and stages relative to the heads' (default 1; e.g. 0.1 when "
                        "fine-tuning a pretrained backbone)")
    g.add_argument("--schedule", choices=_choices("schedule"),
                   help="step (default): lr x0.1 at 75/130/180 of 200 epochs, scaled; journal: lr /10 at E // 3, "
                        "2E // 3 and E - 10 (the journal code's); cosine")
    g.add_argument("--warmup-epochs", type=int, metavar="N",
                   help="epochs of linearly rising learning rate before the schedule (default 0)")
    g.add_argument("--class-weights", choices=_choices("class_weights"),
                   help="balanced: label terms weighted by N / (K * n_class) for imbalanced classes")
    g.add_argument("--accum-steps", type=int, help="batches per optimizer step (effective batch = N x batch)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each stage's activations in backward: less memory, more time")
    g.add_argument("--skip-nonfinite", type=int, metavar="N",
                   help="skip the update of up to N steps whose loss is NaN or infinite (default 0: stop at the "
                        "first, keeping the last good checkpoint)")
    g = p.add_argument_group("augmentation (training batches, per image, on the training device)")
    g.add_argument("--augment", choices=_choices("augment"),
                   help="none (default: crop and flip only), autoaugment (the CIFAR-10 policy at 32 px, the "
                        "ImageNet one on image folders), randaugment (2 ops, magnitude 9), trivialaugment")
    g.add_argument("--cutout", type=int, metavar="PX", help="one square hole of PX px per image (default 0: none)")
    g.add_argument("--mixup", type=float, metavar="ALPHA", help="mix each image with another, ratio ~ Beta(ALPHA, "
                   "ALPHA) (default 0: off)")
    g.add_argument("--cutmix", type=float, metavar="ALPHA", help="paste a box of another image, area ~ Beta(ALPHA, "
                   "ALPHA) (default 0: off; with --mixup each image picks one of the two)")
    g.add_argument("--label-smoothing", type=float, metavar="EPS", help="label terms' targets smoothed by EPS "
                   "(default 0)")
    g.add_argument("--pad-fill", type=int, metavar="0-255", help="grey level of the crop's padding and of what "
                   "rotations, shears and translations bring in (default 0; the journal recipe's 128)")
    g = p.add_argument_group("self-distillation")
    g.add_argument("--recipe", choices=_choices("recipe"),
                   help="iccv (default: the ICCV 2019 paper's loss and 200-epoch schedule) or journal (the TPAMI "
                        "2021 code's: attention exits, AutoAugment + Cutout, CE 1 / 0.7, KD 0.3 without T^2, "
                        "adapted feature distance 0.03, 250 epochs; README, 'The loss'); options given beside it win")
    g.add_argument("--temperature", type=float, help=f"softens the teacher (default {D.temperature})")
    g.add_argument("--alpha", type=float, help=f"KD weight; the shallow exits' labels get 1 - alpha (default {D.alpha})")
    g.add_argument("--deepest-ce", type=float, metavar="WEIGHT",
                   help="the deepest exit's label weight (default: 1 - alpha, as the shallow exits'; journal: 1)")
    g.add_argument("--kd-t2", dest="kd_t2", action=argparse.BooleanOptionalAction,
                   help="scale the KD term by T^2 (default; --no-kd-t2: the journal code does not)")
    g.add_argument("--beta", "--feature-weight", dest="beta", type=float,
                   help=f"weight of the feature term (default {D.beta}, for the hint; journal: 0.03)")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999 per step), evaluated per "
                        "exit each epoch and saved beside the weights (default 0: off)")
    g = p.add_argument_group("output")
    g.add_argument("--print-freq", type=int, help=f"steps between log lines (default {D.print_freq})")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that holds a run")



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
