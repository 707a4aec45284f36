"""byot: multi-exit networks trained with "Be Your Own Teacher" self-distillation (Zhang et al., ICCV 2019)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.5.0"

# torch is imported on first use of these names, not by ``import byot``: the command line stays able to
# turn a Ctrl-C during that import into one line
_LAZY = {"SelfDistillLoss": "byot.losses", "MultiExitOutput": "byot.models", "MultiExitNet": "byot.models",
         "create_model": "byot.models",
         "list_models": "byot.models", "register_model": "byot.models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'byot' has no attribute {name!r}")


__all__ = ["MultiExitNet", "MultiExitOutput", "SelfDistillLoss", "__version__", "create_model", "list_models", "register_model"]
