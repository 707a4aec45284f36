"""byot: multi-exit ResNets trained with "Be Your Own Teacher" self-distillation (Zhang et al., ICCV 2019)."""

__version__ = "0.1.0"

from byot.losses import SelfDistillLoss  # noqa: E402
from byot.models import MultiExitOutput, create_model, list_models, register_model  # noqa: E402

__all__ = ["MultiExitOutput", "SelfDistillLoss", "__version__", "create_model", "list_models", "register_model"]
