"""FR-Spec's draft vocabulary: the drafts' token subset, where its frequencies come from, exact verification over the
whole vocabulary, and the draft cost measured for the adaptive draft count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import seekstack
from seekstack.checkpoint import CheckpointError
from seekstack.infer import Engine, SamplingParams
from seekstack.infer.draft_vocab import draft_vocabulary, token_ranking
from seekstack.infer.speculative import accept_drafts, draft_argmax
from tests.infer.support import VOCAB, micro_model, tiny_tokenizer
from tests.infer.test_sampling import batch_of

FREQUENT = [7, 300, 42]  # the training tokens' most frequent ids, in order


def training_run(tmp_path):
    """A run folder as training leaves it: run/train_config.json naming its token shards, run/checkpoints/step_1."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    ids = np.array(FREQUENT[0:1] * 50 + FREQUENT[1:2] * 30 + FREQUENT[2:3] * 20 + list(range(10)), dtype=np.uint16)
    np.random.default_rng(0).shuffle(ids)
    ids.tofile(tokens / "train_00000.bin")
    index = {
        "version": 1,
        "dtype": "uint16",
        "shards": [{"file": "train_00000.bin", "tokens": len(ids)}],
        "total_tokens": len(ids),
    }
    (tokens / "train_index.json").write_text(json.dumps(index))
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_1"
    seekstack.save_pretrained(micro_model(), checkpoint)
    tiny_tokenizer(checkpoint)
    (run / "train_config.json").write_text(json.dumps({"data_dir": "../tokens"}))  # relative to the run, as saved
    return checkpoint


def test_the_draft_vocabulary_is_the_most_frequent_training_tokens_with_their_head_rows(tmp_path):
    checkpoint = training_run(tmp_path)
    ranking, source = token_ranking(checkpoint, VOCAB)
    assert ranking[:3].tolist() == FREQUENT and "token counts" in source
    assert sorted(ranking.tolist()) == list(range(VOCAB))  # every id ranked once
    engine = Engine.from_pretrained(checkpoint, speculative=True, draft_vocab=3)
    assert engine.draft_vocabulary.ids.tolist() == FREQUENT
    torch.testing.assert_close(engine.draft_vocabulary.head_t, engine.model.lm_head.weight[FREQUENT].t())
    with torch.no_grad():
        engine.model.lm_head.weight.mul_(2)  # weights changed in place (an RL weight sync), then the cache reset
    engine.reset_prefix_cache()
    torch.testing.assert_close(engine.draft_vocabulary.head_t, engine.model.lm_head.weight[FREQUENT].t())
    ranking, source = token_ranking(tmp_path / "elsewhere" / "checkpoints" / "step_1", VOCAB)  # no run beside it
    assert ranking.tolist() == list(range(VOCAB)) and "merge rank" in source
    assert draft_vocabulary(engine.model, 0, ranking) is None and draft_vocabulary(engine.model, VOCAB, ranking) is None


@pytest.mark.parametrize(
    ("content", "fault"), [('{"data_dir": "../tok', "not valid JSON"), ('{"data_dir": 5}', "'data_dir' is 5")]
)
def test_a_damaged_run_config_beside_the_checkpoint_is_named(tmp_path, content, fault):
    checkpoint = training_run(tmp_path)
    (tmp_path / "run" / "train_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=f"train_config.json.*{fault}"):
        token_ranking(checkpoint, VOCAB)


def test_drafts_come_from_the_subset_while_greedy_output_stays_plain_greedy(model, tokenizer):
    """Sixteen draft tokens: every draft is one of them, yet the tokens are plain greedy decoding's (verification
    scores the whole vocabulary), most of which lie outside them. (Compiled drafts from a subset:
    test_engine.py's test_compiled_decoding_gives_the_eager_tokens.)"""
    subset = list(range(200, 216))
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    prompts = [tokenizer.encode(text) for text in ("def f(x):", "import os", "class A:")]
    plain = [c.token_ids for c in Engine(model, tokenizer).generate(prompts, params)]
    engine = Engine(
        model, tokenizer, speculative=True, draft_tokens=3, adaptive_drafts=False,
        draft_vocab=len(subset), draft_ranking=torch.tensor(subset + [i for i in range(VOCAB) if i not in subset]),
    )  # fmt: skip
    request_ids = [engine.add_request(prompt, params) for prompt in prompts]
    tokens: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
    drafts = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
        drafts += [token for request in engine.running for token in request.drafts]
    assert [tokens[request_id] for request_id in request_ids] == plain
    assert drafts and set(drafts) <= set(subset)
    assert sum(token not in subset for completion in plain for token in completion) > len(prompts) * 6


def test_a_negative_draft_vocabulary_is_refused_naming_it(tokenizer):
    with pytest.raises(ValueError, match=r"draft_vocab=-3 must be a whole number >= 0"):
        Engine(micro_model(), tokenizer, speculative=True, draft_vocab=-3, adaptive_drafts=False)


def test_a_draft_ranking_of_other_than_the_vocabularys_ids_is_refused_naming_it_and_a_list_is_taken(model):
    """Engine(..., speculative=True, draft_ranking=...) met a ranking with id 600 of 512, or -1, with torch's bare
    "IndexError: index 600 is out of bounds for dimension 0 with size 512" (or "index out of range in self"), floats
    and a 2-D tensor with IndexError and RuntimeError, and a list of ids with "'list' object has no attribute 'to'"; an
    empty ranking failed at the first draft with "argmax(): Expected reduction dim 2 to have non-zero size", a list of
    strings with torch's "too many dimensions 'str'"; a ranking repeating an id drafted from fewer tokens than asked
    (7, 5, 7 is two), unsaid."""
    assert draft_vocabulary(model, 3, [7, 5, 9, 1]).ids.tolist() == [7, 5, 9]
    for ranking, refusal in (
        (torch.tensor([600, 1, 2]), r"^draft_ranking holds token id 600, outside the vocabulary \[0, 512\)$"),
        ([3, -1, 2], r"^draft_ranking holds token id -1, outside the vocabulary \[0, 512\)$"),
        (torch.tensor([1.0, 2.0, 3.0]), r"\(a 1-D tensor or list of ints\); got torch.float32 of shape \(3,\)$"),
        (torch.tensor([[3, 4, 5]]), r"\(a 1-D tensor or list of ints\); got torch.int64 of shape \(1, 3\)$"),
        (
            torch.tensor([], dtype=torch.long),
            r"^draft_ranking holds 0 token ids; draft_vocab=3 needs at least that many$",
        ),
        ([], r"^draft_ranking holds 0 token ids; draft_vocab=3 needs at least that many$"),
        ([7, 5], r"^draft_ranking holds 2 token ids; draft_vocab=3 needs at least that many$"),
        ([7, 5, 7, 1], r"^draft_ranking holds token id 7 more than once among its first 3: it names each token once"),
        (["a", "b", "c"], r"\(a 1-D tensor or list of ints\); got \['a', 'b', 'c'\]: too many dimensions 'str'$"),
    ):
        with pytest.raises(ValueError, match=refusal):
            draft_vocabulary(model, 3, ranking)


def test_sampling_over_drafts_from_the_subset_follows_the_target_over_the_whole_vocabulary(model):
    """The draft distribution q is one-hot on the subset's argmax; the token drawn from p, accepting the draft where
    it is the draft, gives p, tokens outside the subset included (Leviathan et al. 2023, Thm. 3.5)."""
    rows = 20_000
    vocabulary = draft_vocabulary(model, 4, torch.arange(100, 104))
    hidden = torch.randn(rows, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    drafts = draft_argmax(model, hidden, vocabulary)[:, 0]
    assert set(drafts.tolist()) <= {100, 101, 102, 103} and len(set(drafts.tolist())) > 1
    target = torch.zeros(VOCAB)
    target[[0, 100, 101, 102, 103]] = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])
    logits = target.log().expand(rows, 2, -1)
    _, tokens, _ = accept_drafts(batch_of(*[SamplingParams()] * rows), logits, drafts[:, None])
    torch.testing.assert_close(torch.bincount(tokens[:, 0], minlength=VOCAB) / rows, target, atol=0.015, rtol=0)
