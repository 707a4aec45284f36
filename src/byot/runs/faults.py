"""Named points where the fault-injection tests make a real training process fail, and nothing else.

``BYOT_FAULT=POINT:N`` makes the process SIGKILL itself the N-th time it reaches POINT (a crash nothing can
catch), ``BYOT_FAULT=POINT:N:TERM`` (or ``INT``) sends it that signal instead, and the point
``nonfinite_loss`` turns one loss term into NaN at that batch (``with_loss_faults`` wraps the loss), ``disk_full`` makes the N-th write of a
checkpoint's bytes fail with ENOSPC. Unset (always, outside tests), every call
is one comparison.
"""

from __future__ import annotations

import os
import signal
from typing import Any

POINTS = ("train_step", "evaluate", "checkpoint_write", "after_metrics", "nonfinite_loss", "disk_full")
_SPEC = os.environ.get("BYOT_FAULT", "")
_counts: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int, str]:
    point, _, rest = spec.partition(":")
    count, _, sig = rest.partition(":")
    return point, int(count or 1), sig or "KILL"


def reached(name: str) -> bool:
    """True the N-th time ``name`` is reached when BYOT_FAULT names it (for faults that are not signals)."""
    if not _SPEC:
        return False
    point, count, _ = _parse(_SPEC)
    if point != name:
        return False
    _counts[name] = _counts.get(name, 0) + 1
    return _counts[name] == count


def fault_point(name: str) -> None:
    """Kill or signal this process here, if BYOT_FAULT asks for it."""
    if reached(name):
        os.kill(os.getpid(), getattr(signal, f"SIG{_parse(_SPEC)[2]}"))


class _PoisonedLoss:
    """The loss, with one KD term (the second shallow exit's, or the only one) NaN the N-th time it runs."""

    def __init__(self, loss_fn: Any) -> None:
        self.loss_fn = loss_fn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loss_fn, name)

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        terms = self.loss_fn(*args, **kwargs)
        if reached("nonfinite_loss"):
            kd = [n for n in terms if n.startswith("kd/")]
            if kd:
                name = kd[min(1, len(kd) - 1)]
                terms[name] = terms[name] * float("nan")
                terms["loss"] = self.loss_fn.total(terms)
        return terms


def with_loss_faults(loss_fn: Any) -> Any:
    """``loss_fn`` itself, unless BYOT_FAULT names ``nonfinite_loss``: then the loss that fault poisons."""
    return _PoisonedLoss(loss_fn) if _SPEC and _parse(_SPEC)[0] == "nonfinite_loss" else loss_fn
