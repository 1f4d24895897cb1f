"""Whether a peer the benchmarks time ours against can run here: its packages are optional (`.[bench]`)."""

from __future__ import annotations

import importlib.util


def peer_missing(peer: str, packages: tuple[str, ...], install: str) -> str | None:
    """'PEER: skipped, PACKAGE not installed (INSTALL)' when one of `packages` does not import here, else None."""
    missing = [package for package in packages if importlib.util.find_spec(package) is None]
    if missing:
        return f"{peer}: skipped, {' and '.join(missing)} not installed ({install})"
    return None
