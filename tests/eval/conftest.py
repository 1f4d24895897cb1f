"""Shared by the eval tests: the inference tests' micro checkpoint (random weights, a stdlib-trained tokenizer), and
a training checkpoint of the 3D attention variant beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from seekstack.checkpoint import write_pretrained_files
from tests.infer.support import micro_model, model_dir


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One micro checkpoint directory for all eval tests: config.json, model.safetensors, tokenizer.json."""
    return model_dir(tmp_path_factory.mktemp("eval") / "model")


@pytest.fixture(scope="package")
def checkpoint_3d(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training checkpoint (as `train` saves it: no HF export) of the micro model with attention_variant=3d, its
    channel gate and temporal convolution non-zero, so it computes other logits than plain MLA; the same tokenizer."""
    folder = tmp_path_factory.mktemp("eval_3d") / "model"
    folder.mkdir()
    variant = micro_model(attention_variant="3d")
    with torch.no_grad():
        for name, param in variant.named_parameters():
            if "channel_up" in name or "temporal_conv" in name:
                param.normal_(std=0.5)
    write_pretrained_files(variant, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(checkpoint / name, folder / name)
    return folder
