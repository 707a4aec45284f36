"""Checkpoints of the published reference script (luanyunteng/pytorch-be-your-own-teacher, ``train.py``),
read as byot checkpoints.

The reference saves ``{"epoch", "arch", "state_dict", "best_prec1"}`` every epoch, its model wrapped in
DataParallel (every key starts with ``module.``), and its multi-exit ResNet builds three ``downsample*_1``
modules that its forward never uses. Its other tensors map one to one onto byot's ResNet of the same name:

    conv1 / bn1             -> stem.0 / stem.1         layerN.*         -> stages.{N-1}.*
    bottleneckK_1.*         -> heads.{K-1}.body.*      middle_fcK.*     -> heads.{K-1}.fc.*
    fc.*                    -> heads.3.fc.*            downsampleK_1.*  -> dropped (never used)

It trained on CIFAR-100 at 32 px with the 3x3 stem and normalised with CIFAR-10's mean and std, which the
converted checkpoint carries (``normalization``) so that it tests to the accuracy it was trained to.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from byot.errors import ByotError

log = logging.getLogger("byot")

REFERENCE = "reference"  # the converted checkpoint's "version" (and "reference" names its source)
REFERENCE_ARCHS = ("multi_resnet18_kd", "multi_resnet34_kd", "multi_resnet50_kd", "multi_resnet101_kd",
                   "multi_resnet152_kd")
# the reference's data loader: CIFAR-10's statistics, for CIFAR-100 too
REFERENCE_NORMALIZATION = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
# CIFAR-100's fine labels in label order (the data set's meta file): the reference trained on CIFAR-100 only
# and stores no class names
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo",
    "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree",
    "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree",
    "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit",
    "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe",
    "whale", "willow_tree", "wolf", "woman", "worm",
)
_RENAMES = [
    (re.compile(r"conv1\.(.+)"), r"stem.0.\1"),
    (re.compile(r"bn1\.(.+)"), r"stem.1.\1"),
    (re.compile(r"layer([1-4])\.(.+)"), lambda m: f"stages.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"bottleneck([1-3])_1\.(.+)"), lambda m: f"heads.{int(m[1]) - 1}.body.{m[2]}"),
    (re.compile(r"middle_fc([1-3])\.(.+)"), lambda m: f"heads.{int(m[1]) - 1}.fc.{m[2]}"),
    (re.compile(r"fc\.(.+)"), r"heads.3.fc.\1"),
]
_UNUSED = re.compile(r"downsample[1-3]_1\.")


def is_reference_checkpoint(state: Any) -> bool:
    return (isinstance(state, dict) and "format" not in state and isinstance(state.get("state_dict"), dict)
            and isinstance(state.get("arch"), str) and "epoch" in state)


def byot_key(key: str) -> str | None:
    """The byot name of one reference tensor (``module.`` already dropped); None for the unused ones."""
    if _UNUSED.match(key):
        return None
    for pattern, target in _RENAMES:
        m = pattern.fullmatch(key)
        if m:
            return m.expand(target) if isinstance(target, str) else target(m)
    raise ByotError(f"tensor {key!r} has no place in byot's {REFERENCE_ARCHS[0]}-style ResNet")


def convert_reference(state: dict[str, Any], source: str) -> dict[str, Any]:
    """A byot checkpoint (without optimizer, scaler and RNG state) of a reference checkpoint ``state``."""
    arch = state["arch"]
    if arch not in REFERENCE_ARCHS:
        raise ByotError(f"{source} is a reference-script checkpoint of {arch!r}; byot reads those of "
                        f"{', '.join(REFERENCE_ARCHS)}")
    tensors = {k: v for k, v in state["state_dict"].items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    model, dropped = {}, []
    for key, tensor in tensors.items():
        target = byot_key(key)
        if target is None:
            dropped.append(key)
        else:
            model[target] = tensor
    if "heads.3.fc.weight" not in model or "stem.0.weight" not in model:
        raise ByotError(f"{source} has no 'conv1.weight' or 'fc.weight': not a reference multi-exit ResNet's state dict")
    prefixes = sorted({k.split(".")[0] for k in dropped})
    log.info("%s: a reference-script checkpoint (epoch %s of %s); mapped %d tensors one to one, dropped %d of the "
             "never-used %s", source, state["epoch"], arch, len(model), len(dropped), ", ".join(prefixes) or "-")
    num_classes = int(model["heads.3.fc.weight"].shape[0])
    best = state.get("best_prec1", 0.0)
    epoch = int(state["epoch"])
    return {
        "version": REFERENCE, "reference": {"dropped": dropped, "epoch_index": epoch},
        "arch": arch, "num_classes": num_classes,
        "classes": list(CIFAR100_CLASSES) if num_classes == 100 else [str(i) for i in range(num_classes)],
        "image_size": 32,
        # the reference's width is 64; read from the file, a narrower network of the same structure loads too
        "config": {"arch": arch, "dataset": "cifar100", "image_size": 32, "width": int(model["stem.0.weight"].shape[0]),
                   "stem": "cifar",
                   "head": "bottleneck", "distill": True},
        # the reference saves after training its 0-based epoch ``epoch``: epoch + 1 epochs are done
        "epoch": epoch + 1,
        "best_top1": float(best.item() if isinstance(best, torch.Tensor) else best),
        "model": model, "normalization": [list(m) for m in REFERENCE_NORMALIZATION],
    }
