"""How Ctrl-C ends a bench run as a script: a line, not KeyboardInterrupt's traceback. Every bench imports it, most
through options.py; the data benches, which need no torch, import it alone (options.py's readers import torch, ~3 s)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import TracebackType


def interrupted_in_one_line(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    """sys.excepthook of a bench run as a script: Ctrl-C that ends it says so in one line and ends the process by
    SIGINT, as Python ends one it was interrupted in (exit status 130 in a shell), but at once: Python's own exit
    is status 1 once torch._dynamo is imported (its atexit dump_compile_times forgets the interrupt). Other errors
    keep their traceback."""
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    print(f"{Path(sys.argv[0]).name}: interrupted (Ctrl-C)", file=sys.stderr)
    sys.stdout.flush()  # a table printed so far reaches a pipe or file; `with` blocks were left as the error rose
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


if Path(getattr(sys.modules["__main__"], "__file__", "")).resolve().parent == Path(__file__).resolve().parent:
    sys.excepthook = interrupted_in_one_line  # a bench run; one imported (a notebook, pytest) keeps the hook it has
