"""A text prompt to a DeepSeek release is encoded as its tokenizer frames one, BOS first, as transformers and vLLM
encode it: without the BOS the model continues a start it was never trained on, and other text comes out."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.eval.explain import explain_text, token_label
from seekstack.infer import Engine, SamplingParams
from seekstack.serve.protocol import prompt_ids
from seekstack.serve.schemas import CompletionRequest
from tests.interop.release import deepseek_v3_release

PROMPT = "def main():"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return deepseek_v3_release(tmp_path_factory.mktemp("deepseek-v3"))


@pytest.fixture(scope="module")
def engine(release) -> Engine:
    return Engine.from_pretrained(release)


@pytest.fixture(scope="module")
def transformers_greedy(release) -> tuple[list[int], list[int]]:
    """transformers' prompt ids for PROMPT and its greedy continuation, in float32, never the ids past the tokenizer's
    (as the engine never samples the ids a release's vocab_size is padded with)."""
    tokenizer = AutoTokenizer.from_pretrained(release)
    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    padded = list(range(len(tokenizer), model.config.vocab_size))
    output = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        suppress_tokens=padded,
    )
    return prompt[0].tolist(), output[0, prompt.shape[1] :].tolist()


def test_the_release_tokenizer_puts_bos_before_a_prompt_as_transformers_does(engine, transformers_greedy):
    prompt, _ = transformers_greedy
    assert prompt[0] == engine.tokenizer.bos_id
    assert engine.tokenizer.encode_prompt(PROMPT) == prompt


def test_engine_continues_a_text_prompt_as_transformers_greedy(engine, transformers_greedy):
    [completion] = engine.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0))
    assert completion.token_ids == transformers_greedy[1]


def test_generate_command_continues_a_text_prompt_as_transformers_greedy(release, transformers_greedy):
    args = ["generate", "--model", str(release), PROMPT, "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)]
    result = CliRunner().invoke(app, [*args, "--dtype", "float32", "--no-compile", "--json"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert (reply["prompt_tokens"], reply["token_ids"]) == (len(transformers_greedy[0]), transformers_greedy[1])


def test_a_completions_text_prompt_is_encoded_as_transformers_encodes_it(release, engine, transformers_greedy):
    request = CompletionRequest(model="deepseek-v3", prompt=[PROMPT, "x = 1"])
    auto = AutoTokenizer.from_pretrained(release)
    assert prompt_ids(request, engine.tokenizer) == [transformers_greedy[0], auto("x = 1").input_ids]


def test_explain_maps_a_release_text_from_the_bos_transformers_puts_first(engine, transformers_greedy, tmp_path):
    paths = explain_text(engine.model, engine.tokenizer, PROMPT, tmp_path)
    data = json.loads(re.search(r"const data = (.*);\n", paths["html"].read_text()).group(1))
    assert data["tokens"] == [token_label(engine.tokenizer, token_id) for token_id in transformers_greedy[0]]
