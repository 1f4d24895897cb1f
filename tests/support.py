"""Helpers the tests of several packages share."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def edited_json(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON object in `path` (a checkpoint's config.json, its safetensors index) as a dict, written back as the
    with block leaves it."""
    edited = json.loads(path.read_text())
    yield edited
    path.write_text(json.dumps(edited))


def fp8_block_warnings(action: Callable[[], T]) -> tuple[T, list[str]]:
    """What `action()` returns, and the fp8 block warnings (`warn_fp8_blocks_transformers_misreads`'s, naming
    weight_block_size) it gave, each given however often the same one was given before."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = action()
    return value, [str(warning.message) for warning in caught if "weight_block_size" in str(warning.message)]
