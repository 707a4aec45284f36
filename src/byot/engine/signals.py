"""Ctrl-C and SIGTERM during training: stop within seconds, never in the middle of a checkpoint write.

A checkpoint is written after every epoch, so stopping loses at most the epoch in progress. The first
signal raises ``Interrupted`` where the program is (a checkpoint write in progress finishes first); a
second one ends the process at once, whatever it is doing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``exit_code`` is the shell's 128 + signal number (130, 143).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` clauses do not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


_state = {"critical": 0, "pending": 0, "received": 0, "pid": os.getpid()}


def ignore_handled_signals(*_: object) -> None:
    """In a helper process (a DataLoader worker, a decoding pool's worker): ignore SIGINT and SIGTERM.

    A terminal's Ctrl-C, ``timeout`` or a batch scheduler signal the whole process group; the main
    process alone decides how to stop, and ends its workers itself. Takes and ignores any arguments so
    that it serves as a ``worker_init_fn`` or a pool ``initializer``.
    """
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _state["pid"]:  # a forked worker that inherited the handler: the main process stops it
        return
    _state["received"] += 1
    if _state["received"] > 1:
        os._exit(128 + signum)  # the second signal: at once, no cleanup
    if _state["critical"]:
        _state["pending"] = signum  # raised when the write in progress is complete
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Install the handlers for the duration of a run (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in HANDLED}
    _state.update(critical=0, pending=0, received=0, pid=os.getpid())
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def critical_section() -> Iterator[None]:
    """Defer a first signal until the block (a checkpoint and metrics write) is complete."""
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
        if not _state["critical"] and _state["pending"]:
            signum, _state["pending"] = _state["pending"], 0
            raise Interrupted(signum)
