"""load_pretrained as transformers' from_pretrained is called: the dtype a checkpoint's config.json states."""

from __future__ import annotations

import pytest
import torch

import seekstack
from seekstack.checkpoint import CONFIG_FILE, CheckpointError
from tests.conftest import micro_config
from tests.support import edited_json


@pytest.mark.parametrize(("key", "stated"), [("dtype", 5), ("dtype", "int8"), ("torch_dtype", ["bfloat16"])])
def test_auto_dtype_of_a_config_stating_no_float_dtype_is_refused_naming_the_key(tmp_path, key, stated):
    """dtype="auto" took a config.json's dtype 5, "int8" or a list as no dtype stated and loaded the embedding's
    dtype silently, where transformers' from_pretrained(dtype="auto") refuses them; a dtype given is still taken."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()).bfloat16(), tmp_path)
    with edited_json(tmp_path / CONFIG_FILE) as config:
        config.update(dtype=None, torch_dtype=None)
        config[key] = stated
    expected = f"{tmp_path / CONFIG_FILE}: {key} is {stated!r}, no float dtype a model loads in: state one of float32, "
    with pytest.raises(CheckpointError) as refused:
        seekstack.load_pretrained(tmp_path, dtype="auto")
    assert str(refused.value).startswith(expected)
    assert seekstack.load_pretrained(tmp_path, dtype="float16").embed_tokens.weight.dtype == torch.float16
