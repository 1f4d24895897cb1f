"""The lm-evaluation-harness backend: each method against direct computation on the model, and per-request
log-likelihoods against lm_eval's own HF backend on the same checkpoint loaded through transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from seekstack.eval.harness import SeekstackLM  # noqa: E402

ATOL = 1e-4
PAIRS = [
    ("def add(a, b):\n", "    return a + b\n"),
    ("import os\nimport ", "sys"),
    ("", "class Point:\n    pass\n"),
    ("for line in lines:", " print(line)"),  # the trailing space moves into the continuation
    ("x = [1, 2, 3]\n" * 8, "y = x[0]"),
]
TEXTS = ["def main():\n    return 0\n", "import sys\n\n\nclass Foo(object):\n    def __init__(self):\n        pass\n"]


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


@pytest.fixture(scope="module")
def ours(checkpoint) -> SeekstackLM:
    return SeekstackLM(pretrained=checkpoint, batch_size=2)


def direct_logprobs(lm: SeekstackLM, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from one unbatched forward."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_registered_as_lm_eval_model_seekstack():
    assert get_model("seekstack") is SeekstackLM


def test_loglikelihood_is_the_sum_over_the_continuation_of_one_forward(ours):
    results = ours.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, _) in zip(PAIRS, results, strict=True):
        context_ids = ours.tok_encode(context.rstrip()) if context else [ours.prefix_token_id]
        whole = ours.tok_encode(context + continuation)
        ids = [ours.prefix_token_id, *whole] if not context else whole
        n_continuation = len(ids) - len(context_ids)
        expected = direct_logprobs(ours, ids)[-n_continuation:].sum().item()
        assert logprob == pytest.approx(expected, abs=ATOL)


def test_is_greedy_true_exactly_when_the_continuation_is_the_argmax(ours):
    context = ours.tok_encode("def add(a, b):\n")
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(ours.model(torch.tensor([context + greedy])).logits[0, -1].argmax()))
    last_changed = greedy[:-1] + [(greedy[-1] + 1) % ours.model.config.vocab_size]
    [(_, first), (_, second)] = ours._loglikelihood_tokens([(None, context, greedy), (None, context, last_changed)])
    assert first and not second


def test_loglikelihood_rolling_is_the_whole_text_after_bos_within_max_length(ours):
    results = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    for text, logprob in zip(TEXTS, results, strict=True):
        expected = direct_logprobs(ours, [ours.prefix_token_id, *ours.tok_encode(text)]).sum().item()
        assert logprob == pytest.approx(expected, abs=ATOL)


def test_loglikelihood_rolling_in_windows_sums_each_window_given_the_tokens_before_it(checkpoint):
    lm = SeekstackLM(pretrained=checkpoint, batch_size=3, max_length=8)
    ids = lm.tok_encode(TEXTS[1])
    assert len(ids) > 2 * lm.max_length
    [logprob] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXTS[1],)]))
    padded = [lm.prefix_token_id, *ids]
    # Window w is a fresh forward over the 8 tokens (BOS first) before token 8w + 8, predicting tokens
    # [8w, 8w + 8); the last, shorter window still reads a full 8 tokens and predicts only the rest.
    expected = 0.0
    for start in range(0, len(ids), lm.max_length):
        width = min(lm.max_length, len(ids) - start)
        window = padded[max(0, start + width - lm.max_length) : start + width + 1]
        expected += direct_logprobs(lm, window)[-width:].sum().item()
    assert logprob == pytest.approx(expected, abs=ATOL)
    assert logprob != pytest.approx(direct_logprobs(lm, padded).sum().item(), abs=1e-2)  # windows cut the context


def test_generate_until_is_the_greedy_argmax_loop_cut_at_the_stop_string(ours):
    contexts = ["def add(a, b):\n", "import os\n"]
    arguments = [(c, {"until": ["\n\n"], "max_gen_toks": 12}) for c in contexts]
    arguments.append((contexts[0], {"until": [], "max_gen_toks": 5}))
    texts = ours.generate_until(requests("generate_until", arguments))
    for (context, kwargs), text in zip(arguments, texts, strict=True):
        ids = ours.tok_encode(context)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(kwargs["max_gen_toks"]):
                token = int(ours.model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == ours.eot_token_id:
                    break
                new.append(token)
        expected = ours.tok_decode(new)
        for stop in kwargs["until"]:
            expected = expected.split(stop)[0]
        assert text == expected


def test_loglikelihoods_equal_lm_evals_hf_backend_on_the_transformers_model(checkpoint, ours):
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=2, dtype="float32")
    pairs = requests("loglikelihood", PAIRS)
    rolling = requests("loglikelihood_rolling", [(t,) for t in TEXTS])
    ours_pairs, theirs_pairs = ours.loglikelihood(pairs), theirs.loglikelihood(pairs)
    for (our_logprob, our_greedy), (their_logprob, their_greedy) in zip(ours_pairs, theirs_pairs, strict=True):
        assert our_logprob == pytest.approx(their_logprob, abs=ATOL)
        assert our_greedy == their_greedy
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), abs=ATOL)
