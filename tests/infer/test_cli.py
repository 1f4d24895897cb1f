"""`seekstack generate` and `seekstack chat` on a micro checkpoint with its own tokenizer; the chat session."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.infer import Engine, SamplingParams
from seekstack.infer.chat import HELP, ChatSession
from tests.infer.support import model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("model") / "micro")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine.from_pretrained(checkpoint)


def test_generate_streams_the_same_text_as_the_engine(checkpoint, engine):
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "def main():", "--temperature", "0",
                                 "--max-new-tokens", "12", "--ignore-eos"])  # fmt: skip
    assert result.exit_code == 0, result.output
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    assert result.stdout == engine.generate(["def main():"], params)[0].text + "\n"


def test_generate_json_reports_tokens_timings_and_acceptance(checkpoint, engine):
    args = ["generate", "--model", str(checkpoint), "import os", "--json", "--temperature", "0", "--speculative",
            "--draft-tokens", "2", "--max-new-tokens", "6", "--ignore-eos", "--top-logprobs", "2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    plain = engine.generate(["import os"], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    assert record["token_ids"] == plain.token_ids and record["text"] == plain.text
    assert record["model"] == "micro" and record["finish_reason"] == "length"
    assert record["completion_tokens"] == 6 and record["prompt_tokens"] == len(plain.prompt_token_ids)
    assert record["timings"]["total_s"] >= record["timings"]["time_to_first_token_s"] > 0
    assert 0 <= record["speculative"]["accepted"] <= record["speculative"]["drafted"] > 0
    assert record["speculative"]["drafted"] % 2 == 0  # two drafts a step
    assert [len(entry["top"]) for entry in record["logprobs"]] == [2] * 6


def test_generate_rejects_bad_sampling_values_and_missing_tokenizer(checkpoint, tmp_path):
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "x", "--top-p", "1.5"])
    assert result.exit_code == 1
    assert "top_p=1.5 is invalid: must be in (0, 1]" in result.output
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    result = runner.invoke(app, ["generate", "--model", str(tmp_path), "x"])
    assert result.exit_code == 1 and "has no tokenizer.json" in result.output


def test_chat_keeps_history_and_obeys_reset_system_and_quit(checkpoint, engine):
    lines = "hello\nmore\n/system Be brief.\nhi\n/reset\n/nope\nagain\n/quit\nnever answered\n"
    args = ["chat", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "5"]
    result = runner.invoke(app, args, input=lines)
    assert result.exit_code == 0, result.output

    def answer(messages):
        params = SamplingParams(max_new_tokens=5, temperature=0, top_p=0.95)
        return engine.generate([engine.tokenizer.encode_chat(messages)], params)[0].text

    first_turn = [{"role": "user", "content": "hello"}]
    hello = answer(first_turn)
    expected = [
        hello,
        answer([*first_turn, {"role": "assistant", "content": hello}, {"role": "user", "content": "more"}]),
        "(system prompt set; history cleared)",
        answer([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]),
        "(history cleared)",
        f"unknown command '/nope'; {HELP}",
        answer([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "again"}]),
    ]
    assert result.stdout == "\n".join(expected) + "\n"


def test_chat_drops_the_oldest_turns_when_the_context_is_full(checkpoint):
    engine = Engine.from_pretrained(checkpoint, max_model_len=48)
    session = ChatSession(engine, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    said = ["one two three four", "five six seven eight", "nine ten eleven", "twelve thirteen"]
    for text in said:
        assert len("".join(session.reply(text))) > 0
    users = [turn["content"] for turn in session.turns if turn["role"] == "user"]
    assert users[-1] == said[-1] and users[0] != said[0]  # the newest turn stays, the oldest went
    assert len(engine.tokenizer.encode_chat(session.messages())) < 48


def test_a_stream_closed_early_frees_its_blocks(engine):
    stream = engine.stream([5, 6, 7], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))
    first = next(stream)
    assert first.token_ids and engine.cache.usage > 0
    stream.close()
    assert engine.cache.usage == 0 and engine.cache.tables == {}
    assert [out.finish_reason for out in engine.step()] == ["abort"]


def test_a_reply_that_fails_leaves_no_unanswered_turn_in_the_history(checkpoint, monkeypatch):
    engine = Engine.from_pretrained(checkpoint)
    session = ChatSession(engine, SamplingParams(max_new_tokens=3, temperature=0))
    "".join(session.reply("hello"))
    kept = list(session.turns)
    assert [turn["role"] for turn in kept] == ["user", "assistant"]

    def failing_stream(prompt, params):
        yield from []
        raise RuntimeError("engine step failed")

    monkeypatch.setattr(engine, "stream", failing_stream)
    with pytest.raises(RuntimeError, match="engine step failed"):
        "".join(session.reply("second"))
    assert session.turns == kept
