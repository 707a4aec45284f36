"""Multi-exit backbones on one contract (``base.MultiExitNet``) and the registry that names them."""

from byot.models import mobilenet, pyramidnet, resnet, resnext, vgg, wide_resnet  # noqa: F401  (register)
from byot.models.base import MultiExitNet, MultiExitOutput, StageShape
from byot.models.registry import create_model, family_options, list_models, model_spec, register_model
from byot.models.resnet import MultiExitResNet, resolve_stem

__all__ = [
    "MultiExitNet",
    "MultiExitOutput",
    "MultiExitResNet",
    "StageShape",
    "create_model",
    "family_options",
    "list_models",
    "model_spec",
    "register_model",
    "resolve_stem",
]
