"""Moved to byot.runs.rundir (this name stays while the engine is split up)."""

import sys

from byot.runs import rundir as _moved

sys.modules[__name__] = _moved
