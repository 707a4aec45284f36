"""Multi-exit backbones on one contract (``base.MultiExitNet``) and the registry that names them."""

from byot.models import (  # noqa: F401  (register)  # noqa: F401  (timm/NAME, tv/NAME; the libraries load when one is built)
    mobilenet,
    pyramidnet,
    resnet,
    resnext,
    timm_family,
    torchvision_family,
    vgg,
    wide_resnet,
)
from byot.models.attach import AttachedNet, HookedExits, attach_exits
from byot.models.base import MultiExitNet, MultiExitOutput, StageShape
from byot.models.factory import create_model
from byot.models.registry import family_options, list_models, model_spec, register_model
from byot.models.resnet import MultiExitResNet, resolve_stem

__all__ = [
    "AttachedNet",
    "HookedExits",
    "MultiExitNet",
    "MultiExitOutput",
    "MultiExitResNet",
    "StageShape",
    "attach_exits",
    "create_model",
    "family_options",
    "list_models",
    "model_spec",
    "register_model",
    "resolve_stem",
]
