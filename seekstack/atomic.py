"""Atomic writes: every file and checkpoint folder the project writes appears whole or not at all.

A reader (or a crash) sees the old contents or the new ones, never a part: the new contents go to a temporary
name in the same folder, are flushed to disk, and are renamed over the target in one step.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write `data` (text as UTF-8, bytes, or a function that writes the file at the path it is given) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            if not callable(data):
                file.write(data.encode("utf-8") if isinstance(data, str) else data)
        if callable(data):
            data(temporary)
        with temporary.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
