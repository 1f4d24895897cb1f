"""Rows continuing a shared prefix through SharedPrefixCache equal the forward over the whole rows, values and
gradients, with prefixes of different lengths in one batch."""

from __future__ import annotations

import torch

from seekstack.model.attention import SharedPrefixCache
from seekstack.model.transformer import Transformer
from tests.conftest import micro_config

PREFIX_LENGTHS = [5, 12, 9]  # three prompts of different lengths, right-padded to 12 in the prefix forward
ROWS_PER_PREFIX = 3
SUFFIX = 7


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, S) padded prefixes, their lengths, which prefix each of the B rows continues, and (B, SUFFIX) suffixes."""
    prefixes = torch.randint(2, 128, (len(PREFIX_LENGTHS), max(PREFIX_LENGTHS)))
    lengths = torch.tensor(PREFIX_LENGTHS)
    prefix_of = torch.arange(len(PREFIX_LENGTHS)).repeat_interleave(ROWS_PER_PREFIX)
    suffixes = torch.randint(2, 128, (len(prefix_of), SUFFIX))
    return prefixes, lengths, prefix_of, suffixes


def _whole_rows_states(model: Transformer, prefixes, lengths, prefix_of, suffixes) -> torch.Tensor:
    """The final states of each row's suffix positions, from one forward per whole (unpadded) row."""
    states = []
    for row, prefix in enumerate(prefix_of.tolist()):
        ids = torch.cat((prefixes[prefix, : lengths[prefix]], suffixes[row]))[None]
        states.append(model(ids).hidden_states[0, -SUFFIX - 1 :])  # the prefix's last state, then the suffix's
    return torch.stack(states)


def _shared_prefix_states(model: Transformer, prefixes, lengths, prefix_of, suffixes) -> torch.Tensor:
    cache = SharedPrefixCache(lengths, prefix_of)
    prefix_states = model(prefixes, cache=cache).hidden_states
    last = prefix_states[torch.arange(len(lengths)), lengths - 1][prefix_of]
    positions = lengths[prefix_of][:, None] + torch.arange(SUFFIX)[None, :]
    suffix_states = model(suffixes, cache=cache, positions=positions).hidden_states
    return torch.cat((last[:, None], suffix_states), dim=1)


def test_shared_prefix_rows_match_whole_rows_in_values_and_gradients():
    model = Transformer(micro_config()).train()
    batch = _batch()
    weights = torch.randn(len(batch[2]), SUFFIX + 1, model.config.hidden_size)
    results = []
    for states_of in (_whole_rows_states, _shared_prefix_states):
        model.zero_grad()
        states = states_of(model, *batch)
        (states * weights).sum().backward()
        results.append(
            (states.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        )
    (whole, whole_grads), (shared, shared_grads) = results
    assert torch.allclose(shared, whole, rtol=1e-5, atol=1e-5)
    assert whole_grads.keys() == shared_grads.keys()
    for name, grad in whole_grads.items():
        assert (shared_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-7, name


def test_a_row_sees_only_its_own_prefix_and_suffix():
    """Changing another prefix's tokens, or a later suffix token, leaves a row's states unchanged."""
    model = Transformer(micro_config()).eval()
    prefixes, lengths, prefix_of, suffixes = _batch()
    with torch.no_grad():
        before = _shared_prefix_states(model, prefixes, lengths, prefix_of, suffixes)
        prefixes[0, lengths[0] :] = 3  # the padding of the shortest prefix
        prefixes[1] = torch.randint(2, 128, (prefixes.shape[1],))
        suffixes[:, -1] = 4
        after = _shared_prefix_states(model, prefixes, lengths, prefix_of, suffixes)
    rows_of_prefix_1 = prefix_of == 1
    assert torch.allclose(after[~rows_of_prefix_1, :-1], before[~rows_of_prefix_1, :-1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after[rows_of_prefix_1], before[rows_of_prefix_1])
