"""Graceful stops: the first SIGINT or SIGTERM asks the work to stop at the next safe point (the
training loop: after the step in flight, with a checkpoint; a store build: between batches,
removing what it wrote); a second one stops at once.

SIGTERM is what `ray job stop`, Kubernetes and spot preemption send, SIGINT is Ctrl-C. Ray's
core worker installs its own SIGTERM handler (a native stack dump, then exit) when it connects,
so `install()` is called again once Ray is up; it is idempotent, and does nothing outside
`handling()`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None
_active = False  # inside handling()


class Stopped(BaseException):  # noqa: N818 - a control-flow signal like KeyboardInterrupt, not an error
    """Raised at a safe point after a signal. BaseException: no `except Exception` swallows it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _handle(signum: int, frame: FrameType | None) -> None:
    global _requested
    if _requested is not None:  # the second signal: stop now, wherever we are
        raise Stopped(signum, f"stopped at once by a second {_name(signum)}; the last checkpoint is intact")
    _requested = signum


@contextmanager
def handling() -> Iterator[None]:
    """SIGINT/SIGTERM ask for a stop while inside (the CLI's writing commands); the previous
    handlers come back after. Library calls outside it keep Python's defaults."""
    global _active
    if threading.current_thread() is not threading.main_thread():  # only the main thread may
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _active = True
    install()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _active = False
        reset()


def install() -> None:
    """(Re)routes SIGINT/SIGTERM to the flag inside `handling()`; called again once Ray is up."""
    if _active and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handle)


def requested() -> int | None:
    """The signal that asked for a stop, if any."""
    return _requested


def check(what: str) -> None:
    """A safe point: raises Stopped if a stop was asked for (`what` says what was stopped)."""
    if _requested is not None:
        raise Stopped(_requested, f"{_name(_requested)}: stopped {what}")


def reset() -> None:
    """Forgets a request (tests, and library users running several commands in one process)."""
    global _requested
    _requested = None
