"""Multi-exit backbones and the registry that names them."""

from byot.models import resnet  # noqa: F401  (registers the ResNet family)
from byot.models.registry import create_model, list_models, register_model
from byot.models.resnet import MultiExitOutput, MultiExitResNet, resolve_stem, stage_sizes

__all__ = [
    "MultiExitOutput",
    "MultiExitResNet",
    "create_model",
    "list_models",
    "register_model",
    "resolve_stem",
    "stage_sizes",
]
