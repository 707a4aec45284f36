"""byot: multi-exit ResNets trained with "Be Your Own Teacher" self-distillation (Zhang et al., ICCV 2019)."""

__version__ = "0.1.0"

from byot.losses import SelfDistillLoss
from byot.models import MultiExitOutput, create_model, list_models, register_model

__all__ = ["MultiExitOutput", "SelfDistillLoss", "__version__", "create_model", "list_models", "register_model"]
