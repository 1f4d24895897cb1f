"""Training state: the RNG states a checkpoint saves are restored where the run resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.cuda.random

from seekstack.train.state import rng_state, set_rng_state


def seeded_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def test_a_run_saved_with_two_gpus_visible_resumes_where_one_is_restoring_its_state(monkeypatch):
    # rank 0 of a 2-GPU FSDP run saved both devices' states; the run resumes as one process on one GPU. A CPU
    # generator stands in for that GPU's, and torch.cuda answers as it would there.
    one_gpu = torch.Generator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "default_generators", (one_gpu,))
    monkeypatch.setattr(torch.cuda.random, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.random, "_lazy_call", lambda restore, **kwargs: restore())
    saved = {**rng_state(), "cuda": [seeded_state(1), seeded_state(2)]}
    next_draw = np.random.rand()
    with pytest.warns(UserWarning, match="CUDA RNG states of 2 devices and 1 are visible here: restoring the first 1"):
        set_rng_state(saved)
    assert torch.equal(one_gpu.get_state(), seeded_state(1))
    assert np.random.rand() == next_draw  # and the host's generators as saved
