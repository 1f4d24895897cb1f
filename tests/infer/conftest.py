"""Fixtures of the inference tests: each test module gets its own tokenizer and micro model (module scope)."""

import pytest

from tests.infer.support import micro_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model():
    return micro_model()
