"""Helpers the tests of several packages share."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def edited_json(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON object in `path` (a checkpoint's config.json, its safetensors index) as a dict, written back as the
    with block leaves it."""
    edited = json.loads(path.read_text())
    yield edited
    path.write_text(json.dumps(edited))
