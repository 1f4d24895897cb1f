"""`seekstack eval` on a DeepSeek release scores what lm_eval's transformers backend scores: the release's tokenizer
puts BOS before each context and text, and the seekstack backend encodes them as that backend does (it left BOS out,
and a release's log-likelihoods and bits per byte differed)."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

from seekstack.eval.harness import SeekstackLM
from tests.interop.release import deepseek_v3_release

ATOL = 1e-4  # float32 both; README's parity with lm_eval's transformers backend
PAIRS = [("def add(a, b):\n", "    return a + b\n"), ("import os\nimport ", "sys"), ("", "class Point:\n    pass\n")]
TEXTS = ["def main():\n    return 0\n", "import sys\n\n\nclass Foo(object):\n    def __init__(self):\n        pass\n"]


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return deepseek_v3_release(tmp_path_factory.mktemp("deepseek-v3"))


def test_a_releases_loglikelihoods_equal_lm_evals_hf_backend(release):
    from lm_eval.models.huggingface import HFLM

    ours = SeekstackLM(pretrained=release, batch_size=2, max_gen_toks=32)
    theirs = HFLM(pretrained=str(release), device="cpu", batch_size=2, dtype="float32")
    assert (
        ours.tok_encode(TEXTS[0]) == theirs.tok_encode(TEXTS[0])
        and ours.tok_encode(TEXTS[0])[0] == ours.prefix_token_id
    )
    pairs = requests("loglikelihood", PAIRS)
    for (our_logprob, our_greedy), (their_logprob, their_greedy) in zip(
        ours.loglikelihood(pairs), theirs.loglikelihood(pairs), strict=True
    ):
        assert our_logprob == pytest.approx(their_logprob, abs=ATOL)
        assert our_greedy == their_greedy
    rolling = requests("loglikelihood_rolling", [(text,) for text in TEXTS])
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), abs=ATOL)


def test_a_rendered_chat_gets_no_second_bos(release):
    ours = SeekstackLM(pretrained=release, batch_size=2, max_gen_toks=32)
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ours.tok_encode(chat) == ours.tokenizer_.encode_chat([{"role": "user", "content": "hi"}])
