"""DeepSeek-R1's chat template opens the reply in its generation prompt, `<｜Assistant｜><think>\\n`: seekstack writes a
chat for such a release as transformers' `apply_chat_template` does, and reads what the model generates as a reply
that opens with it (the reasoning parser, stop strings, SFT's labels). seekstack's own tokenizers open nothing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from transformers import AutoTokenizer

from seekstack.eval.tasks import reasoning_config, reasoning_docs
from seekstack.infer import Engine
from seekstack.posttrain.conversations import encode_conversation
from seekstack.posttrain.distill import verified_traces
from seekstack.posttrain.rewards import RewardWeights
from seekstack.posttrain.rollout import sample_groups
from seekstack.posttrain.tasks import make_task
from seekstack.posttrain.tasks.base import sample_problems
from seekstack.tokenizer import Tokenizer
from tests.interop.release import R1_CHAT_TEMPLATE, r1_tokenizer, release_tokenizer
from tests.serve.server import make_model_dir
from tests.serve.test_reasoning import token_pieces, with_openai

CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
     {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 3 + 4?"}],
]  # fmt: skip


def with_r1_template(folder: Path) -> Path:
    """`folder`'s tokenizer_config.json given DeepSeek-R1's chat template."""
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = R1_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def r1_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("r1")
    r1_tokenizer(folder)
    return folder


@pytest.mark.parametrize("chat", CHATS, ids=["one-message", "with-history"])
def test_an_r1_chat_is_prompted_with_its_reply_opening_as_transformers_writes_it(r1_folder, chat):
    rendered = Tokenizer.from_file(r1_folder).render_chat(chat)
    expected = AutoTokenizer.from_pretrained(r1_folder).apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected
    assert rendered.endswith("<｜Assistant｜><think>\n")


@pytest.mark.parametrize("chat", CHATS, ids=["one-message", "with-history"])
def test_the_jinja_template_of_an_r1_tokenizer_writes_its_reply_opening_as_render_chat(r1_folder, chat):
    """eval's lm_eval records the chat template as `jinja_chat_template`: it wrote the prompt without R1's opening."""
    tokenizer = Tokenizer.from_file(r1_folder)
    auto = AutoTokenizer.from_pretrained(r1_folder)
    written = auto.apply_chat_template(
        chat, chat_template=tokenizer.jinja_chat_template, tokenize=False, add_generation_prompt=True
    )
    assert written == tokenizer.render_chat(chat)


def test_an_r1_chat_without_a_generation_prompt_or_continued_has_no_reply_opening(r1_folder):
    tokenizer = Tokenizer.from_file(r1_folder)
    chat = [*CHATS[0], {"role": "assistant", "content": "<think> hm </think> hello"}]
    ended = "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think> hm </think> hello<｜end▁of▁sentence｜>"
    assert tokenizer.render_chat(chat, add_generation_prompt=False) == ended
    assert tokenizer.render_chat(chat, continue_final_message=True) == ended.removesuffix("<｜end▁of▁sentence｜>")


def test_seekstacks_own_tokenizer_opens_no_reply_and_renders_as_before(tmp_path):
    release_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_file(tmp_path)
    assert tokenizer.reply_opening == ""
    assert tokenizer.render_chat(CHATS[1]) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2 + 3?<｜Assistant｜>5<｜end▁of▁sentence｜><｜User｜>and 3 + 4?"
        "<｜Assistant｜>"
    )


def test_sft_labels_an_r1_assistant_turn_whole_its_think_included(r1_folder, tmp_path):
    """The assistant role token's length was taken from the generation prompt, which holds R1's opening: the first
    tokens of every assistant turn (its <think>) went unlabelled."""
    release_tokenizer(tmp_path)
    conversation = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "<think> 2 + 3 </think> 5"}]
    r1 = encode_conversation(Tokenizer.from_file(r1_folder), conversation)
    own = encode_conversation(Tokenizer.from_file(tmp_path), conversation)
    assert r1 == own
    labelled = [token for token in r1[1] if token >= 0]
    assert Tokenizer.from_file(r1_folder).decode(labelled) == "<think> 2 + 3 </think> 5<｜end▁of▁sentence｜>"


def test_serve_splits_the_reasoning_of_an_r1_reply_that_starts_after_its_opening(tmp_path):
    """The generation prompt opened <think>: the reply generates the reasoning, then </think> and the answer; the
    parser read it all as content, and stop strings matched the reasoning."""
    model = make_model_dir(tmp_path / "release")
    engine = Engine.from_pretrained(with_r1_template(model))
    submitted: list = []

    async def chat(api: openai.AsyncOpenAI) -> dict:
        request = dict(model="model", messages=CHATS[0], max_tokens=50, stop=["+"])
        return (await api.chat.completions.create(**request)).model_dump()

    pieces = token_pieces(engine, "2 + 3 is 5\n</think>\n\n5")
    whole = with_openai(engine, tmp_path, pieces, "stop", chat, submitted, reasoning_parser="deepseek_r1")
    message = whole["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("2 + 3 is 5", "5")
    assert submitted[0][0].stop_after_reasoning == "<think>\n"


def test_rl_rewards_and_eval_score_an_r1_completion_as_opening_with_its_think(r1_folder):
    """The completion of a prompt ending "<think>\\n" has no <think> of its own: RL's rewards and eval's reasoning
    tasks read it as opening with the prompt's, where they found no think block and scored every answer 0."""
    tokenizer = Tokenizer.from_file(r1_folder)
    task = make_task("addition")
    problem = sample_problems(task, 1, "heldout", seed=0)[0]
    completion = f"{problem.trace}\n</think>\n\n{problem.answer}"

    def generate(prompts, params):
        ended = [*tokenizer.encode(completion), tokenizer.eos_id]
        return [SimpleNamespace(token_ids=ended, finish_reason="stop") for _ in prompts]

    engine = SimpleNamespace(tokenizer=tokenizer, generate=generate)
    rollout = sample_groups(engine, task, [problem], 2, 64, 1.0, 0, RewardWeights())
    assert rollout.terms["correctness"].tolist() == rollout.terms["format"].tolist() == [1.0, 1.0]
    doc = next(doc for doc in reasoning_docs("addition", tokenizer) if doc["key"] == problem.key)
    assert doc["prompt"].endswith("<｜Assistant｜><think>\n")
    assert reasoning_config("reason_addition", tokenizer)["process_results"](doc, [completion]) == {"exact_match": 1.0}


def test_distilled_r1_traces_keep_the_think_their_prompt_opened(r1_folder):
    """A kept trace is an assistant message SFT trains on: without the prompt's <think> it trained a reply that never
    opens its reasoning."""
    tokenizer = Tokenizer.from_file(r1_folder)
    task = make_task("addition")
    problem = sample_problems(task, 1, "train", seed=0, distinct=True)[0]
    completion = f"{problem.trace}\n</think>\n\n{problem.answer}"

    def generate(prompts, params):
        ended = [*tokenizer.encode(completion), tokenizer.eos_id]
        return [SimpleNamespace(token_ids=ended, finish_reason="stop") for _ in prompts]

    traces = verified_traces(SimpleNamespace(tokenizer=tokenizer, generate=generate), task, 1, 1)
    assert traces.conversations[0][-1] == {"role": "assistant", "content": f"<think>\n{completion}"}
