"""A chat with a release whose chat format is not DeepSeek-V3's (DeepSeek-V2-Chat, V2-Lite-Chat, Coder-V2-Instruct:
"User: ...\\n\\nAssistant:", no role tokens) is written in the release's own chat template, as transformers'
`apply_chat_template` writes it: it was refused ('no special token <｜User｜>'), in chat, generate --chat and serve."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from seekstack.chat_template import ChatTemplate, read_chat_template
from seekstack.cli import app
from seekstack.infer import Engine
from seekstack.serve.app import create_app
from seekstack.serve.database import open_database
from seekstack.tokenizer import Tokenizer, copy_tokenizer_config
from tests.interop.release import V2_CHAT_TEMPLATE, deepseek_v2_lite_chat_release, release_tokenizer
from tests.serve.server import run

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "def add(a, b):"},
    {"role": "assistant", "content": "return a + b"},
    {"role": "user", "content": "And sub?"},
]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return deepseek_v2_lite_chat_release(tmp_path_factory.mktemp("deepseek-v2-lite-chat"))


@pytest.fixture(scope="module")
def engine(release) -> Engine:
    return Engine.from_pretrained(release)


@pytest.fixture(scope="module")
def auto_tokenizer(release):
    return AutoTokenizer.from_pretrained(release)


@pytest.fixture(scope="module")
def transformers_reply(release, auto_tokenizer) -> list[int]:
    """transformers' greedy reply to CHAT, in float32, never the ids past the tokenizer's (as the engine never samples
    the ids a release's vocab_size is padded with)."""
    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
    prompt = auto_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    padded = list(range(len(auto_tokenizer), model.config.vocab_size))
    output = model.generate(**prompt, do_sample=False, max_new_tokens=NEW_TOKENS, suppress_tokens=padded)
    return output[0, prompt["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("continued", ["Sure: ", "Sure"])
def test_a_chat_is_written_in_the_releases_template_as_transformers_writes_it(engine, auto_tokenizer, continued):
    ours = engine.tokenizer
    assert ours.jinja_chat_template == V2_CHAT_TEMPLATE
    assert ours.render_chat(CHAT) == auto_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False
    )
    assert ours.render_chat(CHAT).endswith("User: And sub?\n\nAssistant:")
    prefixed = [*CHAT, {"role": "assistant", "content": continued}]
    expected = auto_tokenizer.apply_chat_template(prefixed, continue_final_message=True, tokenize=False)
    assert ours.render_chat(prefixed, continue_final_message=True) == expected


def test_serve_answers_a_chat_with_the_reply_transformers_gives(engine, transformers_reply, tmp_path):
    body = {"model": engine.model_name, "messages": CHAT, "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": True}

    async def scenario(client):
        return await client.post("/v1/chat/completions", json=body)

    response = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    assert response.status_code == 200, response.text
    tokens = [entry["token"] for entry in response.json()["choices"][0]["logprobs"]["content"]]
    assert tokens == [engine.tokenizer.decode([token_id]) for token_id in transformers_reply]


def test_generate_chat_writes_the_prompt_in_the_releases_template(release, auto_tokenizer):
    args = ["generate", "--model", str(release), "And sub?", "--chat", "--temperature", "0", "--max-new-tokens", "2"]
    result = CliRunner().invoke(app, [*args, "--no-compile", "--json"])
    assert result.exit_code == 0, result.output
    prompt = auto_tokenizer.apply_chat_template(
        [{"role": "user", "content": "And sub?"}], add_generation_prompt=True, return_dict=False
    )
    assert json.loads(result.stdout)["prompt_tokens"] == len(prompt)


def test_a_tokenizer_without_role_tokens_or_template_is_refused_naming_both(release, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((release / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="<｜User｜>.*nor a chat_template in the tokenizer_config.json"):
        Tokenizer.from_file(tmp_path).render_chat(CHAT)


def test_a_template_is_read_from_named_templates_or_chat_template_jinja(tmp_path):
    config, jinja = tmp_path / "tokenizer_config.json", tmp_path / "chat_template.jinja"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": V2_CHAT_TEMPLATE}]
    config.write_text(json.dumps({"chat_template": named}), encoding="utf-8")
    assert read_chat_template(config, jinja).text == V2_CHAT_TEMPLATE
    config.write_text("{}", encoding="utf-8")
    jinja.write_text(V2_CHAT_TEMPLATE, encoding="utf-8")
    assert (read_chat_template(config, jinja).text, read_chat_template(config, jinja).source) == (
        V2_CHAT_TEMPLATE,
        str(jinja),
    )
    jinja.unlink()
    assert read_chat_template(config, jinja) is None


def test_chat_template_jinja_comes_before_the_config_template_as_transformers_reads_them(tmp_path):
    """transformers' from_pretrained reads chat_template.jinja before tokenizer_config.json's chat_template (a
    template edited in the file transformers 5 saves); seekstack read the config's, so the two wrote other chats."""
    (tmp_path / "source").mkdir()
    config, jinja = tmp_path / "source" / "tokenizer_config.json", tmp_path / "source" / "chat_template.jinja"
    config.write_text(json.dumps({"chat_template": "{{ 'stale' }}"}), encoding="utf-8")
    jinja.write_text(V2_CHAT_TEMPLATE, encoding="utf-8")
    assert (read_chat_template(config, jinja).text, read_chat_template(config, jinja).source) == (
        V2_CHAT_TEMPLATE,
        str(jinja),
    )
    copy_tokenizer_config(config, tmp_path, model_max_length=64)  # a checkpoint's folder holds the config alone
    copied = tmp_path / "tokenizer_config.json"
    assert read_chat_template(copied, tmp_path / "chat_template.jinja").text == V2_CHAT_TEMPLATE


def test_a_damaged_tokenizer_config_beside_a_deepseek_v3_tokenizer_is_not_read(tmp_path):
    release_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ', encoding="utf-8")
    rendered = Tokenizer.from_file(tmp_path).render_chat([{"role": "user", "content": "hi"}])
    assert rendered == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"


def test_a_checkpoint_template_has_what_transformers_gives_templates_tojson_generation_and_strftime_now():
    """A template using transformers' `tojson` (no HTML escapes, non-ASCII as is), `{% generation %}` (TRL's
    assistant-only loss) or `strftime_now` rendered as apply_chat_template renders it: it got jinja's escaping
    tojson, '\\u003cb\\u003e', and failed on the other two ('unknown tag', 'strftime_now is undefined')."""
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] | tojson }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}{{ strftime_now('%%') }}",
        "tokenizer_config.json",
    )
    chat = [{"role": "user", "content": "<b> & 'c' 中"}, {"role": "assistant", "content": "ok"}]
    rendered = template.render(chat, False, False, {"bos_token": "<s>", "eos_token": "</s>"})
    assert rendered == '<s>user: "<b> & \'c\' 中"\nassistant: "ok"\nok</s>%'
