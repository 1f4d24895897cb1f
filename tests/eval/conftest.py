"""Shared by the eval tests: the inference tests' micro checkpoint (random weights, a stdlib-trained tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infer.support import model_dir


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One micro checkpoint directory for all eval tests: config.json, model.safetensors, tokenizer.json."""
    return model_dir(tmp_path_factory.mktemp("eval") / "model")
