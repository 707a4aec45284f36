"""Moved to byot.runs.runfiles (this name stays while the engine is split up)."""

import sys

from byot.runs import runfiles as _moved

sys.modules[__name__] = _moved
