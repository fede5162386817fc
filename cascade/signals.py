"""SIGTERM handled as Ctrl-C by the command lines that run for long: `ray job stop`, a batch scheduler, `kill` and a
container's shutdown send it, and the command then stops as on Ctrl-C (it keeps what it finished, stops the processes
it started, says how to resume and exits 130) instead of dying at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

NOT_SET = object()  # what interrupt_on_sigterm() returns where it set nothing


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_sigterm():
    """SIGTERM raises KeyboardInterrupt in the main thread from now on. Returns the handler it replaced (None where
    that was set outside Python), or NOT_SET off the main thread, where Python cannot set one."""
    if threading.current_thread() is not threading.main_thread():
        return NOT_SET
    return signal.signal(signal.SIGTERM, _interrupt)


def restore_sigterm(previous) -> None:
    """Put back what interrupt_on_sigterm() replaced."""
    if previous is not NOT_SET:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM as Ctrl-C within the block (a command's main(), which tests also call in-process)."""
    previous = interrupt_on_sigterm()
    try:
        yield
    finally:
        restore_sigterm(previous)
