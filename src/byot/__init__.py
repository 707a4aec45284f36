"""byot: multi-exit networks trained with "Be Your Own Teacher" self-distillation (Zhang et al., ICCV 2019)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from byot.version import __version__

# torch is imported on first use of these names, not by ``import byot``: the command line stays able to
# turn a Ctrl-C during that import into one line
_LAZY = {"SelfDistillLoss": "byot.losses", "MultiExitOutput": "byot.models", "MultiExitNet": "byot.models",
         "create_model": "byot.models", "attach_exits": "byot.models", "AttachedNet": "byot.models",
         "HookedExits": "byot.models", "list_models": "byot.models", "register_model": "byot.models",
         "load": "byot.api", "Loaded": "byot.api", "ModelInfo": "byot.api", "evaluate_exits": "byot.api",
         "ExitScores": "byot.api", "EarlyExitNet": "byot.deploy", "ExitPolicy": "byot.deploy",
         "ByotError": "byot.errors"}

if TYPE_CHECKING:  # what type checkers and editors see; at run time the names load on first use (above)
    from byot.api import ExitScores, Loaded, ModelInfo, evaluate_exits, load
    from byot.deploy import EarlyExitNet, ExitPolicy
    from byot.errors import ByotError
    from byot.losses import SelfDistillLoss
    from byot.models import (
        AttachedNet,
        HookedExits,
        MultiExitNet,
        MultiExitOutput,
        attach_exits,
        create_model,
        list_models,
        register_model,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'byot' has no attribute {name!r}")


__all__ = ["AttachedNet", "ByotError", "EarlyExitNet", "ExitPolicy", "ExitScores", "HookedExits", "Loaded",
           "ModelInfo", "MultiExitNet", "MultiExitOutput", "SelfDistillLoss", "__version__", "attach_exits",
           "create_model", "evaluate_exits", "list_models", "load", "register_model"]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
