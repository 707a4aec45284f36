"""Ctrl-C, SIGTERM and SIGHUP during training: stop within seconds, never in the middle of a checkpoint write.

A checkpoint is written after every epoch, so stopping loses at most the epoch in progress. The first
signal raises ``Interrupted`` where the program is (a checkpoint write in progress finishes first); a
second SIGINT or SIGTERM ends the process at once, whatever it is doing.

SIGHUP (``PARENT_ENDED``) says that the terminal or the parent process is gone: a child of ``byot sweep`` or
``byot tune`` asks the kernel for it when its parent ends (``PR_SET_PDEATHSIG``). It stops the run like a
first signal, and never counts as a second one: the kernel sends it again each time the orphan passes to
another thread of its dying parent (up to seven times, measured, for a killed parent with eight idle threads
besides its main one and the one that started the child), and a second signal there would end the child in
the middle of the epoch it was saving.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType

PARENT_ENDED: int | None = getattr(signal, "SIGHUP", None)  # None on Windows
HANDLED = (signal.SIGINT, signal.SIGTERM, *((PARENT_ENDED,) if PARENT_ENDED is not None else ()))
PR_SET_PDEATHSIG = 1  # Linux prctl option: the signal a process gets when its parent ends
STOP_WITH_PARENT = "BYOT_STOP_WITH_PARENT"  # env: a PID; byot gets SIGHUP when that process ends (sweep, tune)


def signal_name(signum: int) -> str:
    """How a stop message names the signal."""
    if signum == signal.SIGINT:
        return "Ctrl-C"
    if signum == PARENT_ENDED:
        return "SIGHUP: its parent process or terminal ended"
    return signal.Signals(signum).name


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived; ``exit_code`` is the shell's 128 + signal number (130, 143, 129).

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


def die_with_parent(signum: int, parent: int) -> None:
    """In a child process (a pool worker, a sweep's ``byot train``): receive ``signum`` when the parent
    ``parent`` ends, however it ends (kill -9, a closed terminal), so that no child outlives it. Linux only;
    elsewhere a no-op (the parent's own teardown still runs)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):  # no prctl in this C library
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)


def stop_with_parent_if_asked() -> None:
    """At start-up of a process that ``byot sweep`` or ``byot tune`` launched: SIGHUP when the parent ends
    (set here, in the child itself, rather than between fork and exec, where a threaded parent makes ctypes
    unsafe). Before the handlers are installed, SIGHUP's default action ends the process, as SIGTERM's."""
    parent = os.environ.pop(STOP_WITH_PARENT, "")
    if parent.isdigit() and PARENT_ENDED is not None:
        die_with_parent(PARENT_ENDED, int(parent))
        _watch_parent(int(parent))


PARENT_POLL_SECONDS = 1.0


def _watch_parent(parent: int) -> None:
    """A second way to learn of the parent's death: a daemon thread that sends SIGHUP once this process's
    parent is no longer ``parent``. A full suite once saw a child train on for 30 s after its sweep was
    killed, with no SIGHUP; the kernel's signal and this one count as one stop."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), PARENT_ENDED)

    threading.Thread(target=watch, name="byot-parent-watch", daemon=True).start()


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _state["pid"]:  # a forked worker that inherited the handler: the main process stops it
        return
    if signum == PARENT_ENDED and _state["received"]:
        return  # stopping already; the kernel may announce the parent's death several times (see above)
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
    hook, sys_hook = threading.excepthook, sys.excepthook
    threading.excepthook = _quiet_after_stop(hook)
    sys.excepthook = _quiet_helper_after_stop(sys_hook)
    try:
        yield
    finally:
        threading.excepthook, sys.excepthook = hook, sys_hook
        for s, h in previous.items():
            signal.signal(s, h)


ThreadHook = Callable[[threading.ExceptHookArgs], object]


def _quiet_after_stop(hook: ThreadHook) -> ThreadHook:
    """Once a stop signal has arrived, a helper thread whose peer process is being stopped (the thread
    that hands DataLoader workers' tensors to this process, multiprocessing.resource_sharer) may lose its
    connection mid-transfer: expected then, and not worth a traceback under the one-line stop message."""
    def quiet(args: threading.ExceptHookArgs) -> None:
        if _state["received"] and issubclass(args.exc_type, (ConnectionError, EOFError)):
            return
        hook(args)
    return quiet


def _quiet_helper_after_stop(hook: Callable[..., object]) -> Callable[..., object]:
    """The same for a helper thread that reports its errors itself through ``sys.excepthook`` rather than
    raising them (multiprocessing.resource_sharer's serving thread does): after a stop signal, a lost
    connection in a thread other than the main one is not printed."""
    def quiet(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        thread = threading.current_thread()
        lost = issubclass(exc_type, (ConnectionError, EOFError, OSError, multiprocessing.AuthenticationError))
        if _state["received"] and thread is not threading.main_thread() and (lost or "_serve" in thread.name):
            return
        hook(exc_type, exc, tb)
    return quiet


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
