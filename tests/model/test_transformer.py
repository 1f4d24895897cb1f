"""The Transformer's forward: what it accepts as labels."""

from __future__ import annotations

import re

import pytest
import torch

from seekstack.model.transformer import Transformer
from tests.conftest import micro_config


@pytest.mark.parametrize("labels_shape", [(1, 7), (1, 3), (1, 12), (2, 8)])
def test_forward_refuses_labels_not_aligned_with_the_inputs(labels_shape):
    model = Transformer(micro_config())
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(ValueError, match=re.escape(f"labels have shape {labels_shape}, input_ids (1, 8)")):
        model(ids, labels=torch.randint(0, 128, labels_shape))
