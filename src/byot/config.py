"""The run configuration: defaults -> YAML file -> command-line flags -> one frozen TrainConfig,
written to the run directory and into every checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from byot.errors import ByotError
from byot.models.exits import HEADS
from byot.models.registry import model_spec, parse_exits
from byot.models.resnet import STEMS
from byot.values import convert

# --- each option, defined once --------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """The values a numeric option may take: ``low`` to ``high``, each end included unless open.
    NaN and infinity never pass, whatever the bounds."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high != math.inf:
            return (f"lie in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low == 0 and self.low_open:
            return "be positive"
        return f"be {'>' if self.low_open else '>='} {self.low:g}"


# The sections of the options, in the order --help and docs/OPTIONS.md show them, with their titles.
SECTIONS = {
    "data": "data",
    "model": "model (taken from the checkpoint with --resume; must agree if given)",
    "run": "run",
    "optimisation": "optimisation",
    "augmentation": "augmentation (training batches, per image, on the training device)",
    "loss": "self-distillation",
    "output": "output",
}
DATASET_NAMES = ("cifar100", "cifar10", "imagefolder", "digits")  # byot.data.NORMALIZATION has one entry each


@dataclass(frozen=True)
class Option:
    """What the command line, the checks and the docs know of one option: its section, help text (``{default}``
    stands for the default), flags (default ``--name``), range or choices, and argparse extras."""

    section: str
    help: str
    flags: tuple[str, ...] = ()
    range: Range | None = None
    choices: tuple[str, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()  # argparse keywords: action, metavar, nargs, const, parse (a name)


def opt(default: Any, section: str, help: str, *, flags: tuple[str, ...] = (), range: Range | None = None,
        choices: tuple[str, ...] = (), **extra: Any) -> Any:
    """A TrainConfig field with its ``Option`` (a mutable default is given as a callable)."""
    meta = {"option": Option(section, help, flags, range, choices, tuple(extra.items()))}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    # model
    arch: str = opt("multi_resnet18_kd", "model", "a name from byot.list_models(), timm/NAME or tv/NAME",
                    flags=("arch",))  # the positional argument
    width: int | None = opt(None, "model", "base channels of the family (ResNets: 64, WRN/PyramidNet: 16, VGG/"
                            "ResNeXt: 64; 16 runs a ResNet well on a CPU)",
                            # The widest published ResNet (BiT's R152x4) has base width 256 (64 x 4); 1024 leaves
                            # 4x headroom and still refuses a typo such as 100000 (petabytes of weights)
                            range=Range(1, 1024))
    stem: str | None = opt(None, "model", "ResNets, MobileNetV2: cifar (stride 1), imagenet (7x7/2 + max-pool, or "
                           "stride 2), auto (default): imagenet from 64 px up", choices=STEMS)
    model_options: dict = opt(dict,  # noqa: RUF009 (a Field)
                              "model", "an option of the model's family, e.g. depth=28 widen=10 for the "
                              "WideResNets (the model table in the README lists each family's); repeat for several",
                              flags=("--model-option",), parse="model_option", action="append", metavar="KEY=VALUE")
    exits: str | None = opt(None, "model", "stages that get a shallow exit, e.g. 1,2,3 (default: the family's "
                            "natural stage boundaries); the deepest exit is always there", metavar="K,K,...")
    distill: bool = opt(True, "model", "the plain backbone trained with cross-entropy only: the baseline",
                        flags=("--no-distill",), action="store_false")
    head: str = opt("bottleneck", "model", "shallow classifiers: bottleneck (default; the ICCV 2019 paper's) or "
                    "attention (the TPAMI 2021 journal version's: a sigmoid attention mask, then depthwise-separable "
                    "conv blocks)", choices=HEADS)
    pretrained: str | None = opt(None, "model", "start the backbone from a local weights file PATH (a torch state "
                                 "dict or .safetensors of the torchvision ResNet, timm/ or tv/ model), or without PATH "
                                 "from the library's own ImageNet weights (needs them cached or internet); the exits "
                                 "and classifier start fresh", nargs="?", const="imagenet", metavar="PATH")
    # data
    dataset: str = opt("cifar100", "data", "data set (default {default}; digits: the demo's)", choices=DATASET_NAMES)
    data_dir: str | None = opt(None, "data", "folder with cifar-100-python/, cifar-10-batches-py/ or train/ + test/")
    download: bool = opt(False, "data", "download CIFAR with torchvision (needs internet)", action="store_true")
    image_size: int | None = opt(None, "data", "px; default 32 for CIFAR, 224 for image folders",
                                 range=Range(8, 4096))  # below 8 the stages' strides leave no pixel
    val_split: float = opt(0.0, "data", "hold out this share of every training class to select checkpoints; the "
                           "test split is then evaluated once, at the end (default 0: select on test, as the "
                           "reference)", metavar="FRACTION",
                           range=Range(0, 1, high_open=True))  # 1 would leave nothing to train on
    final_test: bool = opt(True, "data", "with --val-split: do not evaluate the test split at the end (byot tune's "
                           "trials; evaluate model_best later with byot test)", flags=("--no-final-test",),
                           action="store_false")
    workers: int = opt(4, "data", "image-folder decoding processes (default {default})",
                       range=Range(0, 256))  # more than any machine's cores is a typo
    skip_corrupt: bool = opt(False, "data", "leave unreadable image files out (counted in the log) instead of "
                             "stopping", action="store_true")
    class_weights: str = opt("none", "optimisation", "balanced: label terms weighted by N / (K * n_class) for "
                             "imbalanced classes", choices=("none", "balanced"))
    # augmentation of the training batches, per image, on the training device (byot.data.augment)
    augment: str = opt("none", "augmentation", "none (default: crop and flip only), autoaugment (the CIFAR-10 "
                       "policy at 32 px, the ImageNet one on image folders), randaugment (2 ops, magnitude 9), "
                       "trivialaugment", choices=("none", "autoaugment", "randaugment", "trivialaugment"))
    cutout: int = opt(0, "augmentation", "one square hole of PX px per image (default 0: none)", metavar="PX",
                      range=Range(0, 4096))
    mixup: float = opt(0.0, "augmentation", "mix each image with another, ratio ~ Beta(ALPHA, ALPHA) (default 0: "
                       "off)", metavar="ALPHA",
                       range=Range(0, 1000))  # beyond a few hundred every ratio is 0.5; 1e308 made numpy draw 0
    cutmix: float = opt(0.0, "augmentation", "paste a box of another image, area ~ Beta(ALPHA, ALPHA) (default 0: "
                        "off; with --mixup each image picks one of the two)", metavar="ALPHA", range=Range(0, 1000))
    label_smoothing: float = opt(0.0, "augmentation", "label terms' targets smoothed by EPS (default 0)",
                                 metavar="EPS", range=Range(0, 1, high_open=True))
    pad_fill: int = opt(0, "augmentation", "grey level of the crop's padding and of what rotations, shears and "
                        "translations bring in (default 0; the journal recipe's 128)", metavar="0-255",
                        range=Range(0, 255))
    # optimisation
    epochs: int = opt(200, "optimisation", "epochs (default {default})", flags=("--epoch", "--epochs"),
                      range=Range(1, 100_000))
    batch_size: int = opt(128, "run", "images per step (default {default}); under torchrun the global batch, split "
                          "over the processes, so a recipe means the same on 1 or N of them",
                          range=Range(1, 65_536))  # the largest published ImageNet batches are 64k
    lr: float = opt(0.1, "optimisation", "initial learning rate (default {default})", range=Range(0, low_open=True))
    optimizer: str = opt("sgd", "optimisation", "sgd (default, the reference's) or adamw (decoupled weight decay, "
                         "none on norms, biases and tokens; the usual choice for fine-tuning transformers)",
                         choices=("sgd", "adamw"))
    momentum: float = opt(0.9, "optimisation", "SGD momentum (default {default})",
                          # at 1 no gradient is ever forgotten and the step grows unbounded
                          range=Range(0, 1, high_open=True))
    weight_decay: float = opt(5e-4, "optimisation", "weight decay (default {default}; SGD: L2 on every parameter, as "
                              "the reference)", range=Range(0))
    backbone_lr_scale: float = opt(1.0, "optimisation", "learning rate of the stem and stages relative to the heads' "
                                   "(default 1; e.g. 0.1 when fine-tuning a pretrained backbone)", metavar="FACTOR",
                                   range=Range(0))  # 0 freezes the backbone's weights (BatchNorm statistics move)
    schedule: str = opt("step", "optimisation", "step (default): lr x0.1 at 75/130/180 of 200 epochs, scaled; "
                        "journal: lr /10 at E // 3, 2E // 3 and E - 10 (the journal code's); cosine",
                        choices=("step", "journal", "cosine"))
    warmup_epochs: int = opt(0, "optimisation", "epochs of linearly rising learning rate before the schedule "
                             "(default 0)", metavar="N", range=Range(0, 100_000))
    accum_steps: int = opt(1, "optimisation", "batches per optimizer step (effective batch = N x batch)",
                           range=Range(1, 1024))
    grad_checkpoint: bool = opt(False, "optimisation", "recompute each stage's activations in backward: less memory, "
                                "more time", action="store_true")
    skip_nonfinite: int = opt(0, "optimisation", "skip the update of up to N steps whose loss is NaN or infinite "
                              "(default 0: stop at the first, keeping the last good checkpoint)", metavar="N",
                              range=Range(0))
    # speed (none of these changes what is learned beyond rounding)
    amp: str = opt("auto", "run", "mixed precision (default auto: bf16 on GPUs and CPUs that run it natively, fp16 "
                   "on older GPUs, else off)", choices=("auto", "bf16", "fp16", "off"))  # byot.training.runtime
    channels_last: bool = opt(True, "run", "keep NCHW memory format (channels-last is faster on oneDNN CPUs and "
                              "tensor-core GPUs)", flags=("--no-channels-last",), action="store_false")
    compile: bool = opt(False, "run", "torch.compile the model (eager if it fails)", action="store_true")
    sync_bn: bool = opt(False, "run", "under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm), "
                        "not per process", action="store_true")
    # self-distillation loss
    recipe: str = opt("iccv", "loss", "iccv (default: the ICCV 2019 paper's loss and 200-epoch schedule) or journal "
                      "(the TPAMI 2021 code's: attention exits, AutoAugment + Cutout, CE 1 / 0.7, KD 0.3 without T^2, "
                      "adapted feature distance 0.03, 250 epochs; README, 'The loss'); options given beside it win",
                      choices=("iccv", "journal"))
    temperature: float = opt(3.0, "loss", "softens the teacher (default {default})",
                             range=Range(0, low_open=True))  # the KD term is scaled by T**2 unless kd_t2 is off
    alpha: float = opt(0.1, "loss", "KD weight; the shallow exits' labels get 1 - alpha (default {default})",
                       range=Range(0, 1))
    deepest_ce: float | None = opt(None, "loss", "the deepest exit's label weight (default: 1 - alpha, as the shallow "
                                   "exits'; journal: 1)", metavar="WEIGHT", range=Range(0))
    kd_t2: bool = opt(True, "loss", "scale the KD term by T^2 (default; --no-kd-t2: the journal code does not)",
                      action="boolean_optional")
    beta: float = opt(1e-6, "loss", "weight of the feature term (default {default}, for the hint; journal: 0.03)",
                      flags=("--beta", "--feature-weight"), range=Range(0))  # the hint sums batch and channels
    feature_loss: str = opt("hint", "model", "the feature term: hint (default: masked squared distance of the pooled "
                            "features, ICCV) or adapted (L2 distance of a learned linear adaptation of each shallow "
                            "feature to the deepest's, journal)", choices=("hint", "adapted"))
    feature_skip: str = opt("none", "model", "exits without a feature term: none (default) or second-deepest (the "
                            "journal code's, whose comment says it meant the shallowest)",
                            choices=("none", "second-deepest"))
    ema: float = opt(0.0, "loss", "keep an exponential moving average of the weights (e.g. 0.999 per step), "
                     "evaluated per exit each epoch and saved beside the weights (default 0: off)", metavar="DECAY",
                     range=Range(0, 1, high_open=True))
    # run
    seed: int = opt(0, "run", "seeds weights, order and augmentation (default {default})",
                    # numpy's bound; it also keeps the data order's generator seed (seed * 1_000_003 + epoch, see
                    # byot.data.batches) inside torch's 64 bits, which a seed near 2**63 would overflow
                    range=Range(0, 2**32 - 1))
    device: str | None = opt(None, "run", "cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    save_folder: str = opt("save_checkpoints", "run", "run directory = SAVE_FOLDER/ARCH (default {default})")
    resume: str | None = opt(None, "run", "checkpoint to continue from (train) or to evaluate (test); 'auto': the "
                             "newest readable checkpoint of the run directory (latest, else previous), or a new run")
    print_freq: int = opt(10, "output", "steps between log lines (default {default})", range=Range(1))
    progress: bool = opt(True, "output", "no progress bar", flags=("--no-progress",), action="store_false")

    @property
    def run_dir(self) -> Path:
        return Path(self.save_folder) / self.arch


def options() -> dict[str, tuple[dataclasses.Field, Option]]:
    """Every option with its definition, in TrainConfig's order."""
    return {f.name: (f, f.metadata["option"]) for f in fields(TrainConfig)}


def default_of(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


# The tables other modules read, derived from the definitions above: every numeric option's range (bench
# checks its own flags of the same name with check_range) and every named option's choices.
RANGES: dict[str, Range] = {name: o.range for name, (_, o) in options().items() if o.range is not None}
CHOICES: dict[str, tuple[str, ...]] = {name: o.choices for name, (_, o) in options().items() if o.choices}


# Options that fix the weights' shapes: a checkpoint's values win, and a different value is an error.
# Options that fix the weights' shapes (compared through ``model_identity``, not as spelled)
MODEL_FIELDS = ("arch", "width", "stem", "model_options", "exits", "distill", "head", "dataset", "image_size",
                "feature_loss", "feature_skip")
FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
# Options that change neither what a run learns nor what it measures beyond rounding: where it runs and
# writes, where its data lies, how fast it goes, what it logs. A resume may change them freely; every other
# option (loss, recipe, augmentation, optimizer, schedule, data selection, seed) is a learning option.
RUN_ONLY = ("resume", "progress", "print_freq", "workers", "device", "save_folder", "download", "final_test",
            "data_dir", "amp", "channels_last", "compile", "sync_bn", "grad_checkpoint", "skip_nonfinite",
            "skip_corrupt")
# Learning options a resume may change without --allow-changes: more epochs is how a finished run goes on.
# The change is recorded all the same.
EXTENDABLE = ("epochs",)


def learning_changes(before: TrainConfig, after: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The learning options (not the model's, nor ``RUN_ONLY``) whose value differs: {name: (before, after)}."""
    return {name: (getattr(before, name), getattr(after, name)) for name in FIELD_NAMES
            if name not in (*RUN_ONLY, *MODEL_FIELDS) and getattr(before, name) != getattr(after, name)}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"--{k.replace('_', '-')} {new!r} (checkpoint: {old!r})" for k, (old, new) in changes.items())


# The TPAMI 2021 journal version's training, as its official code has it (ArchipLab-LinfengZhang/
# pytorch-self-distillation-final, train.py and resnet.py): attention exits; crop padded with grey 128, flip,
# AutoAugment's CIFAR-10 policy, one 16 px Cutout hole; the deepest exit learns from the labels with weight 1,
# each shallow one with 0.7 and from the deepest's softened logits (T = 3, no T**2) with 0.3; the feature
# term is the L2 distance of a learned linear adaptation of a shallow feature to the deepest's, weight 0.03,
# left out for the second-deepest exit (index 1 of the code's deepest-first list); 250 epochs of SGD at 0.1,
# /10 at E // 3, 2E // 3 and E - 10. Any option given beside --recipe journal replaces its value here.
JOURNAL_RECIPE: dict[str, Any] = {
    "head": "attention", "augment": "autoaugment", "cutout": 16, "pad_fill": 128,
    "alpha": 0.3, "temperature": 3.0, "deepest_ce": 1.0, "kd_t2": False,
    "feature_loss": "adapted", "beta": 0.03, "feature_skip": "second-deepest",
    "epochs": 250, "schedule": "journal", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
}
RECIPES: dict[str, dict[str, Any]] = {"iccv": {}, "journal": JOURNAL_RECIPE}

DEFAULT_IMAGE_SIZE = {"imagefolder": 224}  # px of an unset --image-size; 32 for the others (CIFAR, digits)
YAML_NODE_LIMIT = 100_000  # values a YAML file may expand to; a config holds ~50 and a sweep a few hundred


def load_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Read a YAML mapping of options (hyphens or underscores) with the safe loader.

    The file must be UTF-8 text, and its aliases may not expand to more than ``YAML_NODE_LIMIT`` values:
    a few hundred bytes of nested aliases (a "billion laughs" file) otherwise expand to billions of values
    in whatever walks the result. ``what`` names the file in errors ("config", "sweep").
    """
    if Path(path).exists() and not Path(path).is_file():  # a FIFO would block the read forever
        raise ByotError(f"{what} {path} is not a regular file (a folder, a pipe or a device); give a YAML file")
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ByotError(f"cannot read {what} {path}: {e.strerror}") from e
    data = _parse_yaml(_utf8_text(raw, f"{what} {path}"), f"{what} {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ByotError(f"{what} {path} must hold a mapping of options, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _utf8_text(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: a byte-order mark some Windows editors write is no error
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ByotError(f"{source} is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column {column}; "
                        "save it as UTF-8") from e


def _parse_yaml(text: str, source: str) -> Any:
    """Compose the node graph (aliases stay shared references), bound its expanded size, then construct."""
    loader = yaml.SafeLoader(text)  # the safe loader: a !!python/object tag is an error, never a call
    try:
        node = loader.get_single_node()
        if node is not None:
            _expanded_size(node, {}, set(), source)
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ByotError(f"{source} is not valid YAML: {detail}") from e
    except RecursionError as e:  # the composer and the walk recurse once per nesting level
        raise ByotError(f"{source} nests its values too deeply to be an options file") from e
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], source: str) -> int:
    """How many values ``node`` becomes once every alias is copied out; memoised by node, so the walk is
    linear in the file's node graph however far its aliases would expand."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ByotError(f"{source}: an alias refers to itself (a value inside its own anchor); remove the loop")
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    size = 1 + sum(_expanded_size(child, sizes, open_nodes, source) for child in children)
    open_nodes.discard(key)
    if size > YAML_NODE_LIMIT:
        raise ByotError(f"{source}: its aliases expand to more than {YAML_NODE_LIMIT:,} values (an alias bomb?); "
                        "write the values out or use fewer nested aliases")
    sizes[key] = size
    return size


@dataclass(frozen=True)
class Key:
    """One key of an options file (a sweep or tune file): what its value must be (said in the error, with an example) and the test."""

    must_be: str
    example: str
    valid: Callable[[Any], bool]
    required: bool = False


def check_shape(where: str, data: Any, schema: dict[str, Key]) -> None:
    """Raise one ByotError line for the first thing in ``data`` that ``schema`` does not allow."""
    if not isinstance(data, dict):
        raise ByotError(f"{where} must be a mapping of {', '.join(schema)}, not {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in schema)
    if unknown:
        raise ByotError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(schema)}")
    for key, spec in schema.items():
        if key not in data:
            if spec.required:
                raise ByotError(f"{where} needs {key}: {spec.must_be}, e.g. {spec.example}")
        elif not spec.valid(data[key]):
            raise ByotError(f"{where}: {key} must be {spec.must_be}, e.g. {spec.example}")


def build_config(base: dict[str, Any], *overrides: dict[str, Any]) -> TrainConfig:
    """Merge ``overrides`` (later wins) onto ``base``, check names and types, freeze."""
    merged: dict[str, Any] = dict(base)
    for layer in overrides:
        unknown = sorted(set(layer) - set(FIELD_NAMES))
        if unknown:
            raise ByotError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(FIELD_NAMES)}")
        for key, value in layer.items():  # the family's options add up over the layers, the others replace
            both = key == "model_options" and isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = {**merged[key], **value} if both else value
    if merged.get("recipe") in RECIPES:  # a recipe's values stand in for the defaults, never for a given option
        merged = {**RECIPES[merged["recipe"]], **merged}
    typed = {f.name: _coerce(f, merged[f.name]) for f in fields(TrainConfig) if f.name in merged}
    cfg = TrainConfig(**typed)
    _validate(cfg)
    return cfg


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field's type; a value of another kind (a list for a name, a word for a number,
    true for a width) is an error rather than something Python happens to convert."""
    kind = str(field.type)
    if field.name == "exits" and isinstance(value, (list, tuple)):  # YAML's [2, 3]: the flag's "2,3"
        value = ",".join(str(v) for v in value)
    if kind == "dict":
        if not isinstance(value, dict):
            raise ByotError(f"option {field.name} must be a mapping of names to values, not {_short(value)}")
        return {str(k).replace("-", "_"): v for k, v in value.items()}
    if value is None:
        if "None" in kind:
            return None
        raise ByotError(f"option {field.name} cannot be empty")
    try:
        return convert(kind.split(" |")[0], value)
    except (TypeError, ValueError) as e:
        # YAML reads an unquoted on/off/yes/no as a boolean: `amp: off` arrives as False
        hint = "; YAML reads on/off/yes/no/true/false as a boolean: quote the word" if isinstance(value, bool) else ""
        raise ByotError(f"option {field.name}: cannot use {_short(value)} as {kind}{hint}") from e


def _short(value: Any) -> str:
    text = repr(value)  # bounded: a value from a file may be long
    return text if len(text) <= 60 else text[:57] + "..."


def check_range(name: str, value: float | None) -> None:
    """Raise a ByotError naming the flag (``--batch-size``) when ``value`` lies outside ``RANGES[name]``;
    None (an option left to its data set's default) passes."""
    if value is None or RANGES[name].holds(value):
        return
    flag = "--" + name.replace("_", "-")
    if isinstance(value, float) and not math.isfinite(value):
        raise ByotError(f"{flag} must be a finite number, not {value}")
    raise ByotError(f"{flag} must {RANGES[name].describe()}, not {value!r}")


def _validate(cfg: TrainConfig) -> None:
    for name in RANGES:
        check_range(name, getattr(cfg, name))
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) is not None and getattr(cfg, name) not in allowed:
            listed = ", ".join(allowed[:-1]) + " or " + allowed[-1]
            raise ByotError(f"--{name.replace('_', '-')} must be {listed}, not {_short(getattr(cfg, name))}")
    size = cfg.image_size or DEFAULT_IMAGE_SIZE.get(cfg.dataset, 32)
    if cfg.cutout > size:
        raise ByotError(f"--cutout {cfg.cutout} is larger than the {size} px images: its hole would blank whole "
                        f"training images; give at most {size} (the journal recipe's is 16 at 32 px)")
    if cfg.exits is not None and not cfg.distill:
        raise ByotError("--exits places shallow exits, which the plain backbone (--no-distill) does not have; "
                        "drop one of them")
    spec = model_spec(cfg.arch, family_arguments(cfg))  # the family's options: names, types, ranges (one line)
    if cfg.exits is not None:
        _exit_stages(cfg.arch, spec, parse_exits(cfg.exits))  # stages the network has (a shapes-only build)


def family_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """The options the model family gets: --model-option's, with --width and --stem where given."""
    given = {"width": cfg.width, "stem": cfg.stem}
    return {**cfg.model_options, **{k: v for k, v in given.items() if v is not None}}


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def model_identity(cfg: TrainConfig, image_size: int | None = None) -> dict[str, Any]:
    """What fixes a run's weights and their meaning, in canonical form: two configs with the same identity
    build the same model whatever way their options were spelled (``--width 64`` or the family's default,
    ``--exits 1,2,3`` or the natural exits, ``--model-option widen=4`` on a name that fixes it).
    ``image_size``: the size an unset ``--image-size`` resolved to (a checkpoint's)."""
    spec = model_spec(cfg.arch, family_arguments(cfg))
    identity: dict[str, Any] = {"arch": cfg.arch}
    identity.update({f"option {k}": v for k, v in dataclasses.asdict(spec).items()})
    size = cfg.image_size or image_size or 32
    identity["exits"] = _exit_stages(cfg.arch, spec, parse_exits(cfg.exits), size) if cfg.distill else ()
    identity.update(distill=cfg.distill, head=cfg.head if cfg.distill else None, dataset=cfg.dataset,
                    image_size=cfg.image_size or image_size)
    # adaptation layers are weights of their own, and a skipped exit has none
    identity.update(feature_loss=cfg.feature_loss if cfg.distill else None,
                    feature_skip=cfg.feature_skip if cfg.distill else None)
    return identity


@functools.lru_cache(maxsize=64)
def _exit_stages(arch: str, spec: Any, exits: bool | tuple[int, ...], image_size: int = 32) -> tuple[int, ...]:
    """The stages that get a shallow exit, resolved on the family's real stage count (a shapes-only build)."""
    import torch

    from byot.models.registry import build_from_spec

    with torch.device("meta"):
        return tuple(build_from_spec(arch, spec, exits, image_size=image_size).exit_stages[:-1])


def _flag(key: str, value: Any) -> str:
    if key.startswith("option "):
        name = key[len("option "):]
        return f"--{name} {value!r}" if name in ("width", "stem") else f"--model-option {name}={value!r}"
    return f"--{key.replace('_', '-')} {value!r}"


def check_same_model(saved: TrainConfig, wanted: TrainConfig, source: str, image_size: int | None = None) -> None:
    """Raise when ``wanted`` (a checkpoint's config with the command's flags over it) builds another model
    than the checkpoint's ``saved`` config, naming each option that differs."""
    before, after = model_identity(saved, image_size), model_identity(wanted, image_size)
    clashes = [f"{_flag(k, after[k])} (checkpoint: {before[k]!r})" for k in after if before.get(k) != after[k]]
    if clashes:
        raise ByotError(f"{source} was trained with other model options: {'; '.join(clashes)}; "
                        "drop these flags (the model is rebuilt from the checkpoint) or start a new run")


def save_yaml(cfg: TrainConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    data = {**config_to_dict(cfg), **(extra or {})}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
