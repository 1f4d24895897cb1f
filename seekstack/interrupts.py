"""Ctrl-C (SIGINT) held back around work that must run whole.

  sigint_handled_by(handler)  SIGINT goes to `handler` meanwhile (signal.SIG_IGN to ignore it)
  sigint_noted()              SIGINT only noted in a list meanwhile, for the caller to act on where it chooses
  interrupts_deferred()       Ctrl-C inside the block interrupts at its end, so the block runs whole
Python delivers signals to the main thread only, and only there may a handler be set: elsewhere each of these leaves
SIGINT as it is (nothing is noted, and Ctrl-C lands wherever the main thread is).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType


@contextlib.contextmanager
def sigint_handled_by(handler: Callable[[int, FrameType | None], object] | signal.Handlers) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def sigint_noted() -> Iterator[list[int]]:
    noted: list[int] = []
    with sigint_handled_by(lambda signum, frame: noted.append(signum)):
        yield noted


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    with sigint_noted() as noted:
        yield
    if noted:
        signal.raise_signal(signal.SIGINT)  # to the handler the block had held back: KeyboardInterrupt by default
