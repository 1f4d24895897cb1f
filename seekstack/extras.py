"""Optional dependencies (pyproject's extras): imported where a command needs them, with an error that names the extra
installing them instead of a bare ModuleNotFoundError."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the `pip install 'seekstack[extra]'` that adds it."""


def import_extra(module: str, extra: str, needed_by: str) -> ModuleType:
    """`module` imported; MissingExtra naming `needed_by` (what needs it) and the extra to install when the module's
    package is absent (an import error inside an installed package is raised as it is)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module.split(".")[0]:
            raise
        raise MissingExtra(
            f"{needed_by} needs {error.name}, which is not installed: pip install 'seekstack[{extra}]'"
        ) from None
