"""Moved to byot.runs.children (this name stays while the engine is split up)."""

import sys

from byot.runs import children as _moved

sys.modules[__name__] = _moved
