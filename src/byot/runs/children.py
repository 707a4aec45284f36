"""``byot train`` children of a parent command (``byot sweep``, ``byot tune``): started in their own session,
stopped together on SIGINT or SIGTERM, never left behind.

The first signal to the parent (SIGINT, SIGTERM, or SIGHUP from a closed terminal) is forwarded once to
every child, which then has ``CHILD_STOP_SECONDS`` to save its epoch and stop; a second SIGINT or SIGTERM,
or the end of that time, kills each child's whole process group (its DataLoader workers too). A child also
gets SIGHUP when the parent dies without forwarding (kill -9), through ``STOP_WITH_PARENT``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from byot.runs.signals import HANDLED, PARENT_ENDED, STOP_WITH_PARENT

CHILD_STOP_SECONDS = 60.0  # after a first signal, how long a child may take to save and stop before it is killed
POLL_SECONDS = 0.2  # how often a wait looks at the deadline of a signal that came


class StoppedBySignal(SystemExit):
    """SIGINT or SIGTERM stopped the parent. A SystemExit whose code is the shell's 128 + signal number
    (130, 143), so that the process exits with it whether or not a caller catches it."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class ChildStopper:
    """SIGINT and SIGTERM handlers (in the main thread) for as long as children run; ``watch`` each child
    after starting it, ``wait`` for it (from any thread), and ``stop`` one on purpose (a pruned trial)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.deadlines: dict[subprocess.Popen, float] = {}  # child -> when it is killed (inf: not asked to stop)
        self.previous: dict[int, Any] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> ChildStopper:  # noqa: PYI034 (Self is Python 3.11+)
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self._on_signal) for s in HANDLED}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        with self.lock:
            left = [p for p in self.deadlines if p.poll() is None]
        for proc in left:  # an error in the parent: no orphan either
            kill_group(proc)
            proc.wait()

    @property
    def stopping(self) -> bool:
        return bool(self.received)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == PARENT_ENDED and self.received:
            return  # a hang-up never counts as a second signal (byot.runs.signals)
        self.received.append(signum)
        with self.lock:
            procs = list(self.deadlines)
        for proc in procs:
            self._act(proc)

    def _act(self, proc: subprocess.Popen) -> None:
        if not self.received:
            return
        if len(self.received) > 1:
            kill_group(proc)
        elif self.deadlines.get(proc, math.inf) == math.inf:
            self.stop(proc, self.received[0])

    def watch(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.deadlines[proc] = math.inf
        self._act(proc)  # a signal that came before the child started

    def stop(self, proc: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
        """Ask ``proc`` to save and stop; it is killed if it has not within ``CHILD_STOP_SECONDS``."""
        with self.lock:
            if self.deadlines.get(proc, math.inf) != math.inf:
                return  # asked once already
            self.deadlines[proc] = time.monotonic() + CHILD_STOP_SECONDS
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    def poll(self, proc: subprocess.Popen, timeout: float) -> int | None:
        """The child's exit code once it has ended within ``timeout`` seconds, else None (killing it when
        its time to stop has run out)."""
        end = time.monotonic() + timeout
        while True:
            try:
                code = proc.wait(timeout=max(0.0, min(POLL_SECONDS, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                with self.lock:
                    self.deadlines.pop(proc, None)
                return code
            if time.monotonic() > self.deadlines.get(proc, math.inf):
                import logging

                logging.getLogger("byot").warning("a byot train child did not stop within %.0f s; killing it",
                                                  CHILD_STOP_SECONDS)
                kill_group(proc)
                with self.lock:
                    self.deadlines[proc] = math.inf  # the kill is sent once; wait for it to take effect
            if time.monotonic() >= end:
                return None

    def wait(self, proc: subprocess.Popen) -> int:
        while True:
            code = self.poll(proc, 3600.0)
            if code is not None:
                return code


def kill_group(proc: subprocess.Popen) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own process group
        except (ProcessLookupError, PermissionError):
            pass


def start_child(command: list[str], logfile: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``command`` with its output into ``logfile``, in its own session: a terminal's Ctrl-C, sent to
    the foreground process group, reaches the parent alone, which forwards it once (the child never gets two
    signals from one keypress); and it stops (SIGHUP: saving its epoch) if the parent dies without
    forwarding."""
    env = {**os.environ, **(env or {}), STOP_WITH_PARENT: str(os.getpid())}
    return subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True, env=env)


@contextlib.contextmanager
def appended_log(path: os.PathLike, command: list[str]) -> Iterator[Any]:
    """``path`` opened for appending, headed by the command about to write to it."""
    with open(path, "a") as logfile:
        logfile.write(f"\n$ {' '.join(command)}\n")
        logfile.flush()
        yield logfile
