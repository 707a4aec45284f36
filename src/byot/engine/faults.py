"""Moved to byot.runs.faults (this name stays while the engine is split up)."""

import sys

from byot.runs import faults as _moved

sys.modules[__name__] = _moved
