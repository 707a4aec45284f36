"""Moved to byot.models.cost (this name stays while the engine is split up)."""

import sys

from byot.models import cost as _moved

sys.modules[__name__] = _moved
