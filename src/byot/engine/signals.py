"""Moved to byot.runs.signals (this name stays while the engine is split up)."""

import sys

from byot.runs import signals as _moved

sys.modules[__name__] = _moved
