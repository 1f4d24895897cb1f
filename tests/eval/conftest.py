"""Shared by the eval tests: the inference tests' micro checkpoint (random weights, a stdlib-trained tokenizer), a
training checkpoint of the 3D attention variant beside it, and lm_eval's index of its own tasks built once."""

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


@pytest.fixture(scope="package")
def lm_evals_own_index() -> dict:
    """lm_eval's index of its own task YAML files (~15,000 of them, ~6 s of a CPU), as its TaskManager builds it."""
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build([Path(lm_eval.tasks.__file__).parent])


@pytest.fixture
def lm_evals_index_built_once(lm_evals_own_index: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each TaskManager of the test takes lm_eval's own tasks from `lm_evals_own_index` instead of indexing them
    again; the folders it includes are still read, and override them, as lm_eval's build does."""
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex

    build = TaskIndex.build

    def built_once(paths, **kwargs) -> dict:
        paths = list(paths)
        if paths[:1] != [Path(lm_eval.tasks.__file__).parent] or kwargs:
            return build(paths, **kwargs)
        return {**lm_evals_own_index, **build(paths[1:])}

    monkeypatch.setattr(TaskIndex, "build", staticmethod(built_once))
