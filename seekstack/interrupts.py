"""Ctrl-C (SIGINT) held back around work that must run whole, and SIGTERM taken as Ctrl-C.

  sigint_handled_by(handler)  SIGINT goes to `handler` meanwhile (signal.SIG_IGN to ignore it)
  sigint_noted()              SIGINT only noted in a list meanwhile, for the caller to act on where it chooses
  interrupts_deferred()       Ctrl-C inside the block interrupts at its end, so the block runs whole
  sigterm_as_ctrl_c()         SIGTERM (`kill`, a scheduler's preemption, torchrun passing its own on) does meanwhile
                              what Ctrl-C does, noted or deferred alike, instead of ending the process on the spot
  sigterm_cleaned_up()        SIGTERM left to the system does meanwhile what Ctrl-C does, and ends the process once
                              the block's cleanup ran (a write's temporaries deleted)
  interruptible(work)         work() in a thread, so that Ctrl-C lands at once where it runs native code for long
Python delivers signals to the main thread only, and only there may a handler be set: elsewhere each of these leaves
SIGINT and SIGTERM as they are (nothing is noted, and Ctrl-C lands wherever the main thread is).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TypeVar

Handler = Callable[[int, FrameType | None], object] | signal.Handlers
Result = TypeVar("Result")
INTERRUPTED = 130  # the exit code of a command ended by Ctrl-C (SIGINT), as shells give it


@contextlib.contextmanager
def _handled_by(signum: signal.Signals, handler: Handler) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def sigint_handled_by(handler: Handler) -> contextlib.AbstractContextManager[None]:
    return _handled_by(signal.SIGINT, handler)


@contextlib.contextmanager
def sigint_noted() -> Iterator[list[int]]:
    noted: list[int] = []
    with sigint_handled_by(lambda signum, frame: noted.append(signum)):
        yield noted


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    with sigint_noted() as noted:
        yield
    if noted:  # to the handler the block had held back (KeyboardInterrupt by default), as the signal that came
        signal.raise_signal(noted[0])


def _as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    """SIGTERM to the SIGINT handler of the moment; KeyboardInterrupt where SIGINT is ignored (a job started in the
    background by a shell) or left to the system."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signum, frame)


def sigterm_as_ctrl_c() -> contextlib.AbstractContextManager[None]:
    return _handled_by(signal.SIGTERM, _as_ctrl_c)


@contextlib.contextmanager
def sigterm_cleaned_up() -> Iterator[None]:
    """Where SIGTERM would end the process on the spot (no handler set), it does what Ctrl-C does inside the block,
    so that the block's `finally` and `with` exits run (deleting what it was writing), and then ends the process as
    SIGTERM does (exit status 143). Where SIGTERM has a handler (`sigterm_as_ctrl_c`, a server's) or is ignored,
    that stays as it is."""
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    received: list[int] = []

    def noted_as_ctrl_c(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        _as_ctrl_c(signum, frame)

    try:
        with _handled_by(signal.SIGTERM, noted_as_ctrl_c):
            yield
    finally:
        if received:  # SIGTERM is the system's again: it ends the process here
            signal.raise_signal(signal.SIGTERM)


def interruptible(work: Callable[[], Result]) -> Result:
    """`work()`, run in a thread while the main thread waits for it: Python runs a signal's handler only once the main
    thread is back in Python, so Ctrl-C (KeyboardInterrupt) waited for the end of native code that does not come back
    for long (tokenizers' BPE training, minutes on a large corpus). Interrupted, the work is left to end with the
    process (a daemon thread). Off the main thread, `work()` runs there."""
    if threading.current_thread() is not threading.main_thread():
        return work()
    outcome: list[Result] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # raised again in the main thread
            failure.append(error)

    worker = threading.Thread(target=run, name="interruptible-work", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=0.1)  # a wait the signal's handler runs between
    if failure:
        raise failure[0]
    return outcome[0]
