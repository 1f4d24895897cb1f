"""Fixtures the adapter tests share. A module that needs a base without a tokenizer defines its own `base`."""

from __future__ import annotations

import pytest

from tests.adapters.support import write_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base checkpoint with its tokenizer, as `seekstack train` writes one."""
    return write_base(tmp_path_factory.mktemp("base") / "base", with_tokenizer=True)
