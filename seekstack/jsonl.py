"""JSON Lines files read line by line, each error naming the file and line at fault."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def jsonl_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON value) of each non-blank line of `path`; a ValueError naming `path:line` for a
    line that is not UTF-8 or not JSON."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
