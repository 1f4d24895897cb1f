"""`seekstack generate` and `seekstack chat` on a micro checkpoint with its own tokenizer; the chat session."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import sys
import time
from collections.abc import Callable

import pytest
import torch
import typer.testing
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.cli.generate import StreamedText, unescape
from seekstack.infer import Engine, EngineOptions, SamplingParams, precision
from seekstack.infer.chat import (
    HELP,
    ChatSession,
    ReplyFailed,
    base_model_reason,
    ending_at_special_tokens,
    run_chat,
)
from seekstack.tokenizer import USER
from tests.infer.support import model_dir, read_only_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("model") / "micro")


@pytest.fixture(scope="module")
def engine(checkpoint):
    """The engine the commands run by default: in the dtype `auto` picks on this machine."""
    return Engine.from_pretrained(checkpoint, dtype=EngineOptions().engine_kwargs(checkpoint)["dtype"])


def test_generate_streams_the_same_text_as_the_engine(checkpoint, engine):
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "def main():", "--temperature", "0",
                                 "--max-new-tokens", "12", "--ignore-eos"])  # fmt: skip
    assert result.exit_code == 0, result.output
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    assert result.stdout == engine.generate(["def main():"], params)[0].text + "\n"


def test_generate_reads_the_prompt_from_stdin_and_refuses_top_logprobs_it_would_not_show(checkpoint, engine):
    args = ["generate", "--model", str(checkpoint), "--max-new-tokens", "5", "--temperature", "0"]
    typed = runner.invoke(app, [*args, "def add(a, b):"])
    piped = runner.invoke(app, [*args, "-"], input="def add(a, b):")
    assert piped.exit_code == 0 and piped.stdout == typed.stdout, piped.output
    shown = runner.invoke(app, [*args, "x", "--top-logprobs", "2"])
    assert (
        shown.exit_code == 2 and "--top-logprobs 2: the log-probabilities are printed with --json only" in shown.stderr
    )


def test_generate_refuses_an_empty_prompt_its_tokenizer_puts_nothing_before_by_the_argument_writing_nothing(checkpoint):
    """An empty prompt (given, or piped in) of a tokenizer adding no BOS was refused by the engine as "error: empty
    prompt: give at least one token" (exit 1), with a blank line on stdout as if text had been generated."""
    args = ["generate", "--model", str(checkpoint), "--max-new-tokens", "2"]
    for given, stdin, read in (([""], None, ""), (["-"], "\n", " (standard input held no text)")):
        refused = runner.invoke(app, [*args, *given], input=stdin)
        assert (refused.exit_code, refused.stdout) == (2, ""), refused.output
        assert refused.stderr.endswith(
            f"Error: Invalid value for 'PROMPT': is empty{read}, and this tokenizer puts no BOS token before a text: "
            "give the text to continue\n"
        )
    as_json = runner.invoke(app, [*args, "", "--json"])
    assert as_json.exit_code == 2 and json.loads(as_json.stdout)["error"]["message"].startswith(
        "Invalid value for 'PROMPT': is empty, and"
    )


def test_generate_names_a_prompt_not_utf8_by_where_it_came_from_and_its_byte(checkpoint):
    """`printf 'caf\\xe9' | seekstack generate` said "error: the text is not valid UTF-8: it holds '\\udce9'" (or, on a
    strict stdin, the codec's "can't decode byte 0xe9 in position 3"), naming neither standard input nor the byte."""
    args = ["generate", "--model", str(checkpoint), "--max-new-tokens", "2"]
    for given, stdin, where in (([], b"caf\xe9\n", "standard input"), (["caf\udce9"], None, "the text")):
        refused = runner.invoke(app, [*args, *given], input=stdin)
        assert (refused.exit_code, refused.stdout) == (2, ""), refused.output
        assert f"Error: Invalid value for 'PROMPT': {where} is not valid UTF-8: it holds the byte 0xe9 (" in (
            refused.stderr
        )


def test_generate_refuses_an_empty_prompt_by_its_tokenizer_alone_before_reading_any_weights(checkpoint, tmp_path):
    """The refusal of an empty prompt (a tokenizer adding no BOS) came once every weight had loaded, though the
    tokenizer alone decides it: a checkpoint whose weights do not load got their error (exit 1) in its place."""
    weightless = tmp_path / "weightless"  # a checkpoint's config and tokenizer, its weights absent
    weightless.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(checkpoint / name, weightless / name)
    bare = tmp_path / "bare"  # its tokenizer given apart, with --tokenizer
    bare.mkdir()
    shutil.copy(checkpoint / "config.json", bare / "config.json")
    for args in (["--model", str(weightless)], ["--model", str(bare), "--tokenizer", str(checkpoint)]):
        refused = runner.invoke(app, ["generate", *args, ""])
        assert (refused.exit_code, refused.stdout) == (2, ""), refused.output
        assert refused.stderr.endswith(
            "Error: Invalid value for 'PROMPT': is empty, and this tokenizer puts no BOS token before a text: give "
            "the text to continue\n"
        )
        assert runner.invoke(app, ["generate", *args, "def"]).exit_code == 1  # a text to continue: the weights' error


def test_generate_max_new_tokens_minus_one_runs_until_the_context_is_full_as_llama_clis(checkpoint, engine):
    """llama-cli's -n -1 generates until the context is full; --max-new-tokens -1 was refused ("has value -1: input
    should be greater than 0"). It now fills what the prompt leaves of the context, without the notice of a cap."""
    args = ["generate", "--model", str(checkpoint), "def main():", "--temperature", "0", "--ignore-eos", "--json"]
    result = runner.invoke(app, [*args, "--max-new-tokens", "-1"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    room = engine.context_len - record["prompt_tokens"]
    [expected] = engine.generate(["def main():"], SamplingParams(max_new_tokens=room, temperature=0, ignore_eos=True))
    assert (record["token_ids"], record["finish_reason"]) == (expected.token_ids, "length")
    assert len(record["token_ids"]) == room == 256 - record["prompt_tokens"] and "capped" not in result.stderr
    refused = runner.invoke(app, [*args, "--max-new-tokens", "-2"])
    assert refused.exit_code == 2 and "Invalid value for '--max-new-tokens': has value -2" in refused.stdout


def test_generate_json_top_logprobs_0_gives_each_tokens_own_logprob_as_vllms_logprobs_0(checkpoint, engine):
    """--top-logprobs 0 (the default) gave no log-probabilities at all, with --json or without, where vLLM's logprobs=0
    gives each generated token's own: scoring a completion from the shell needed an alternative or two."""
    args = ["generate", "--model", str(checkpoint), "def main():", "--temperature", "0", "--max-new-tokens", "3"]
    result = runner.invoke(app, [*args, "--json", "--top-logprobs", "0"])
    assert result.exit_code == 0, result.output
    params = SamplingParams(max_new_tokens=3, temperature=0, logprobs=0)
    [expected] = engine.generate(["def main():"], params)
    entries = json.loads(result.stdout)["logprobs"]
    assert [(entry["token_id"], entry["top"], entry["rank"]) for entry in entries] == [
        (entry.token_id, [], entry.rank) for entry in expected.logprobs
    ]
    assert [entry["logprob"] for entry in entries] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert "logprobs" not in json.loads(runner.invoke(app, [*args, "--json"]).stdout)  # not asked for: none
    unshown = runner.invoke(app, [*args, "--top-logprobs", "0"])
    assert unshown.exit_code == 2 and "--top-logprobs 0: the log-probabilities are printed with --json only" in (
        unshown.stderr
    )


def test_generate_json_gives_the_prompts_logprobs_as_the_engine_does(checkpoint, engine):
    """The engine computes vLLM's prompt_logprobs (940a802), but `generate --json` had no option to print them
    (scoring a text from the shell meant writing Python); without --json the option is refused, as --top-logprobs."""
    args = ["generate", "--model", str(checkpoint), "def main():", "--temperature", "0", "--max-new-tokens", "2"]
    result = runner.invoke(app, [*args, "--json", "--prompt-logprobs", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    params = SamplingParams(max_new_tokens=2, temperature=0, prompt_logprobs=2)
    [scored] = engine.generate(["def main():"], params)
    first, *entries = record["prompt_logprobs"]
    assert first is None and len(entries) == len(scored.prompt_token_ids) - 1
    for entry, expected in zip(entries, scored.prompt_logprobs[1:], strict=True):
        assert (entry["token_id"], entry["rank"]) == (expected.token_id, expected.rank)
        assert entry["logprob"] == pytest.approx(expected.logprob, abs=1e-5) and len(entry["top"]) == 2
    refused = runner.invoke(app, [*args, "--prompt-logprobs", "2"])
    assert refused.exit_code == 2 and "--prompt-logprobs 2: the log-probabilities are printed with --json only" in (
        refused.stderr
    )


def test_generate_without_a_prompt_reads_it_piped_in_and_asks_for_it_at_a_terminal(checkpoint, engine, monkeypatch):
    args = ["generate", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos"]
    [plain] = engine.generate(["def main():"], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    # echo's line end, a Windows file's, and the UTF-8 byte order mark opening a file Notepad saved (it was prompted
    # as 3 more tokens): no part of the prompt
    for opening, line_end, dash in (("", "\n", []), ("", "\r\n", ["-"]), ("\ufeff", "\r\n", ["-"])):
        piped = runner.invoke(app, [*args, *dash], input=opening + "def main():" + line_end)  # echo 'def main():' | ...
        assert piped.exit_code == 0 and piped.stdout == plain.text + "\n", piped.output
    monkeypatch.setattr(typer.testing._NamedTextIOWrapper, "isatty", lambda self: True)  # a terminal: no waiting on it
    typed = runner.invoke(app, args)
    assert typed.exit_code == 2 and "Missing argument 'PROMPT': give the text to continue" in typed.stderr


def test_chat_piped_from_a_file_opening_with_a_byte_order_mark_reads_its_first_message_without_it(checkpoint, engine):
    """`chat --model M < script.txt` of a file Notepad saved sent U+FEFF as the first message's first character."""
    args = ["chat", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "4"]
    chatted = runner.invoke(app, args, input="\ufeffhi\n")
    [reply] = engine.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4, temperature=0))
    assert chatted.exit_code == 0 and chatted.stdout == reply.text + "\n", chatted.output


def test_generate_and_chat_read_a_prompt_file_windows_powershell_saved_in_utf16(checkpoint, engine, monkeypatch):
    """`generate --model M - < prompt.txt` of a file PowerShell 5's `>` saved (UTF-16 with its byte order mark) was
    refused as "not valid UTF-8: it holds the byte 0xff", advising iconv from Latin-1; data build reads such files."""
    # standard input's bytes through a buffered reader, as a process reads a pipe or file (the runner's: a BytesIO)
    monkeypatch.setattr(typer.testing, "make_input_stream", lambda given, charset: io.BufferedReader(io.BytesIO(given)))
    args = ["generate", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos", "-"]
    [plain] = engine.generate(["def main():"], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    for encoding in ("utf-16", "utf-16-be", "utf-32"):  # utf-16: little-endian with its mark, as PowerShell writes
        text = ("\ufeff" if encoding == "utf-16-be" else "") + "def main():\r\n"  # utf-16 and utf-32 write the mark
        generated = runner.invoke(app, args, input=text.encode(encoding))
        assert generated.exit_code == 0 and generated.stdout == plain.text + "\n", (encoding, generated.output)
    chat = ["chat", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "4"]
    chatted = runner.invoke(app, chat, input="hi\r\n".encode("utf-16"))
    [reply] = engine.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4, temperature=0))
    assert chatted.exit_code == 0 and chatted.stdout == reply.text + "\n", chatted.output


def test_chat_piped_a_line_that_is_not_utf8_names_its_byte_and_answers_the_next(checkpoint, engine):
    """`chat --model M < latin1.txt` ended on the first byte that is not UTF-8 with UnicodeDecodeError's traceback."""
    args = ["chat", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "4"]
    chatted = runner.invoke(app, args, input=b"caf\xe9?\nhi\n")
    [reply] = engine.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4, temperature=0))
    assert chatted.exit_code == 0 and chatted.stdout == reply.text + "\n", chatted.output
    assert "error: the text is not valid UTF-8: it holds the byte 0xe9" in chatted.stderr


def test_generate_chat_takes_a_system_prompt_as_llama_cli_does(checkpoint, engine):
    args = ["generate", "--model", str(checkpoint), "hi", "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos",
            "--system", "Be brief."]  # fmt: skip
    result = runner.invoke(app, [*args, "--chat"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    [reply] = engine.generate([engine.tokenizer.encode_chat(messages)], params)
    assert result.exit_code == 0 and result.stdout == reply.text + "\n", result.output
    unread = runner.invoke(app, args)  # a system prompt of no chat would be left out unsaid
    assert unread.exit_code == 2 and "--system is the system prompt of a --chat prompt: add --chat" in unread.stderr


def test_generate_chat_ends_the_reply_with_its_turn_as_chat_does(checkpoint, engine):
    """generate --chat went on past the special token that ends the reply's turn (here <｜tool▁outputs▁end｜>), writing
    text after it that `seekstack chat` and Engine.chat never show; --ignore-eos still goes past it."""
    args = ["generate", "--model", str(checkpoint), "x", "--chat", "--temperature", "0", "--max-new-tokens", "20",
            "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    [reply] = engine.chat([{"role": "user", "content": "x"}], SamplingParams(max_new_tokens=20, temperature=0))
    assert reply.token_ids[-1] in engine.tokenizer.special_ids - engine.eos_ids  # the turn ends at no EOS
    assert (record["token_ids"], record["text"], record["finish_reason"]) == (reply.token_ids, reply.text, "stop")
    past = json.loads(runner.invoke(app, [*args, "--ignore-eos"]).stdout)
    assert past["token_ids"][: len(reply.token_ids)] == reply.token_ids
    assert (len(past["token_ids"]), past["finish_reason"]) == (20, "length")


def test_generate_and_chat_take_max_new_tokens_from_generation_config_as_transformers_and_vllm(
    checkpoint, engine, tmp_path
):
    """A checkpoint's generation_config.json max_new_tokens was not read: generate wrote 128 tokens and chat 512 where
    transformers' generate and vLLM (get_default_sampling_params' max_tokens) stop at the file's; a
    --max-new-tokens given still wins."""
    shipped = shutil.copytree(checkpoint, tmp_path / "micro")
    settings = json.loads((shipped / "generation_config.json").read_text())
    (shipped / "generation_config.json").write_text(json.dumps({**settings, "max_new_tokens": 4}))
    args = ["generate", "--model", str(shipped), "def main():", "--temperature", "0", "--ignore-eos", "--json"]
    record = json.loads(runner.invoke(app, args).stdout)
    [expected] = engine.generate(["def main():"], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    assert (record["token_ids"], record["finish_reason"]) == (expected.token_ids, "length")
    assert len(json.loads(runner.invoke(app, [*args, "--max-new-tokens", "6"]).stdout)["token_ids"]) == 6
    chatted = runner.invoke(app, ["chat", "--model", str(shipped), "--temperature", "0"], input="hi\n")
    [reply] = engine.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4, temperature=0))
    assert (len(reply.token_ids), reply.finish_reason) == (4, "length")
    assert chatted.exit_code == 0 and chatted.stdout == reply.text + "\n", chatted.output


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    ("option", "value"),
    [("--max-new-tokens", "0"), ("--top-p", "2"), ("--min-p", "nan"), ("--repetition-penalty", "-1"),
     ("--presence-penalty", "3"), ("--kv-cache-memory", "abc")],
)  # fmt: skip
def test_a_bad_option_value_is_named_by_its_option(checkpoint, command, option, value):
    prompt = ["x"] if command == "generate" else []
    result = runner.invoke(app, [command, "--model", str(checkpoint), *prompt, option, value], input="")
    assert result.exit_code == 2 and f"Invalid value for '{option}': " in result.stderr and "field" not in result.stderr


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_reply_length_below_one_is_refused_naming_the_minus_one_the_option_takes(checkpoint, command, value):
    """--max-new-tokens takes -1 (until the context is full), but -2 and 0 were refused as "input should be greater
    than 0", the field's check, as if -1 were refused too."""
    prompt = ["x"] if command == "generate" else []
    result = runner.invoke(app, [command, "--model", str(checkpoint), *prompt, "--max-new-tokens", value], input="")
    assert result.exit_code == 2
    assert (f"Invalid value for '--max-new-tokens': has value {value}: give at least 1, or -1 for until the context "
            "is full") in " ".join(result.stderr.split())  # fmt: skip


def test_generate_json_reports_tokens_timings_and_acceptance(checkpoint, engine):
    args = ["generate", "--model", str(checkpoint), "import os", "--json", "--temperature", "0", "--speculative",
            "--draft-tokens", "2", "--no-adaptive-drafts", "--max-new-tokens", "6", "--ignore-eos", "--top-logprobs",
            "2"]  # fmt: skip
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


def test_the_decode_speed_leaves_out_the_steps_that_compiled_a_graph(engine, monkeypatch):
    step, calls = engine.step, []

    def compiling_once(*args, **kwargs):  # the second step (the first decode) compiles for half a second
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.5)
            engine.compile_s += 0.5
        return step(*args, **kwargs)

    monkeypatch.setattr(engine, "step", compiling_once)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    timings = engine.generate(["import os"], params)[0].timings
    assert timings["compile_s"] == 0.5
    decoding = timings["total_s"] - timings["time_to_first_token_s"] - 0.5
    assert timings["decode_tokens_per_s"] == pytest.approx(5 / decoding, rel=1e-6)  # not 5 / (decoding + 0.5)


def test_generate_rejects_bad_sampling_values_and_missing_tokenizer(checkpoint, tmp_path):
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "x", "--top-p", "1.5"])
    assert result.exit_code == 2  # a usage error, as the parser's own refusals
    assert "Invalid value for '--top-p': has value 1.5: input should be less than or equal to 1" in result.stderr
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    result = runner.invoke(app, ["generate", "--model", str(tmp_path), "x"])
    assert result.exit_code == 1
    assert f"{tmp_path} has no tokenizer.json: give the tokenizer's path with --tokenizer PATH" in result.stderr
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "nowhere"), "x"])
    assert result.exit_code == 1 and f"{tmp_path / 'nowhere'}: no such folder" in result.stderr


def test_a_folder_that_is_no_checkpoint_is_named_for_its_missing_config_not_its_tokenizer(checkpoint, tmp_path):
    runs = tmp_path / "runs"  # a folder of runs, or a run's checkpoints/ folder, given for --model
    (runs / "demo").mkdir(parents=True)
    result = runner.invoke(app, ["generate", "--model", str(runs), "x"])
    assert result.exit_code == 1
    assert f"error: {runs / 'config.json'}: no such file" in result.stderr
    assert "--tokenizer" not in result.stderr


def test_an_options_error_names_the_option_and_quotes_the_value_as_given(checkpoint):
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "x", "--kv-cache-memory", "field 'dtype'"])
    assert result.exit_code == 2
    assert "'--kv-cache-memory': must be a size such as 4GiB (size \"field 'dtype'\": expected" in result.stderr


def test_a_tokenizer_that_is_not_the_models_is_refused_or_named(checkpoint, tmp_path):
    from seekstack.infer.engine import check_tokenizer_fits
    from seekstack.tokenizer import Tokenizer, train_tokenizer

    own = Tokenizer.from_file(checkpoint)
    with pytest.raises(ValueError, match=f"has {own.vocab_size} tokens, more than the model's vocabulary .10"):
        check_tokenizer_fits(own, 10, checkpoint)
    other = train_tokenizer(["quite other text, of another tokenizer"] * 20, vocab_size=270, out_path=tmp_path / "t")
    with pytest.warns(UserWarning, match="is not the one saved with the model"):
        check_tokenizer_fits(other, 10_000, checkpoint)
    check_tokenizer_fits(own, own.vocab_size, checkpoint)  # its own: nothing to say


@pytest.mark.parametrize(
    ("args", "message", "exit_code"),
    [
        (["--top-p", "1.5"], "Invalid value for '--top-p': has value 1.5", 2),
        (["--draft-tokens", "0"], "Invalid value for '--draft-tokens': has value 0", 2),
        (["--speculative", "--draft-tokens", "1000"], "Invalid value for '--draft-tokens': must be at most 16", 2),
        (["--stop", ""], "Invalid value for '--stop': has value '': string should have at least 1 character", 2),
        (["--threads", "0"], "Invalid value for '--threads': has value 0: must be from 1 to this machine's", 2),
        (["--threads", "100000"], "Invalid value for '--threads': has value 100000: must be from 1 to", 2),
        (["--temperature", "hot"], "Invalid value for '--temperature'", 2),  # the parser's: a usage error
        (["--no-such-flag"], "No such option: --no-such-flag", 2),
    ],
)
def test_generate_json_reports_bad_options_as_json(checkpoint, args, message, exit_code):
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "x", "--json", *args])
    assert result.exit_code == exit_code
    assert message in json.loads(result.stdout)["error"]["message"]
    assert result.stderr == ""


def test_generate_json_reports_a_missing_model_or_tokenizer_as_json(checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    for model, message in [
        (tmp_path, f"{tmp_path} has no tokenizer.json: give the tokenizer's path with --tokenizer PATH"),
        (tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such folder"),
    ]:
        result = runner.invoke(app, ["generate", "--model", str(model), "x", "--json"])
        assert result.exit_code == 1
        assert list(json.loads(result.stdout)) == ["error"]
        assert json.loads(result.stdout)["error"]["message"].startswith(message)


def press_ctrl_c_in_the_fourth_step(monkeypatch) -> None:
    """Ctrl-C lands in the engine's fourth step: the prefill and two decode steps went out."""
    real_step, steps = Engine.step, []

    def interrupted_in_the_fourth_step(self):
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Engine, "step", interrupted_in_the_fourth_step)


def test_generate_json_on_ctrl_c_prints_the_text_so_far_with_finish_reason_abort(checkpoint, engine, monkeypatch):
    press_ctrl_c_in_the_fourth_step(monkeypatch)
    args = ["generate", "--model", str(checkpoint), "import os", "--json", "--temperature", "0", "--no-compile",
            "--max-new-tokens", "20", "--ignore-eos", "--top-logprobs", "1"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    record = json.loads(result.stdout)
    plain = engine.generate(["import os"], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0]
    assert record["finish_reason"] == "abort" and record["token_ids"] == plain.token_ids[:3]
    assert record["completion_tokens"] == 3 and len(record["logprobs"]) == 3 and plain.text.startswith(record["text"])
    assert record["timings"]["total_s"] >= record["timings"]["time_to_first_token_s"] > 0


def test_generate_stopped_by_ctrl_c_ends_the_line_of_its_text_and_exits_130(checkpoint, engine, monkeypatch):
    press_ctrl_c_in_the_fourth_step(monkeypatch)
    args = ["generate", "--model", str(checkpoint), "import os", "--temperature", "0", "--no-compile",
            "--max-new-tokens", "20", "--ignore-eos"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    plain = engine.generate(["import os"], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0]
    shown = engine.tokenizer.decode(plain.token_ids[:3])
    assert result.stdout == shown + "\n"  # the shell's prompt starts on a line of its own, as after llama-cli


@pytest.mark.parametrize(
    ("failure", "exit_code", "message"),
    [(RuntimeError("the loader broke"), 1, "RuntimeError: the loader broke"),
     (KeyboardInterrupt(), 130, "interrupted (Ctrl-C) before any text was generated")],
)  # fmt: skip
def test_generate_json_reports_any_other_failure_as_json(checkpoint, monkeypatch, failure, exit_code, message):
    def failing(*args, **kwargs):
        raise failure

    monkeypatch.setattr("seekstack.cli.generate.load_engine", failing)
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "x", "--json"])
    assert result.exit_code == exit_code
    assert json.loads(result.stdout) == {"error": {"message": message}}
    assert ("Traceback" in result.stderr and "the loader broke" in result.stderr) == (exit_code == 1)


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("option", [["--draft-tokens", "4"], ["--no-adaptive-drafts"], ["--draft-vocab", "0"]])
def test_a_drafting_option_without_speculative_is_refused_naming_it(checkpoint, monkeypatch, command, option):
    for starts in ("seekstack.cli.generate.load_engine", "seekstack.serve.launch.build_server"):
        monkeypatch.setattr(starts, lambda *args, **kwargs: pytest.fail("started without --speculative"))
    prompt = ["x"] if command == "generate" else []
    result = runner.invoke(app, [command, "--model", str(checkpoint), *prompt, *option], input="")
    assert result.exit_code == 2  # a usage error, as the parser's own
    assert f"Error: {option[0]} sets how speculative decoding drafts, which is off: add --speculative" in result.stderr


def test_serve_names_a_run_s_model_by_the_run(checkpoint, monkeypatch, tmp_path):
    """A run's out_dir is served under the run's name, which stays as it trains (step_N, its checkpoint's, did not);
    a checkpoint folder keeps its own name, and --served-model-name wins over both."""
    step = tmp_path / "prose_run" / "checkpoints" / "step_7"
    shutil.copytree(checkpoint, step)
    (step / "train_state.pt").write_bytes(b"")
    served = []
    monkeypatch.setattr(
        "seekstack.serve.launch.build_server", lambda model, options, **_: served.append(options) or 1 / 0
    )
    for model, name in ((step.parent.parent, "prose_run"), (step, None)):
        runner.invoke(app, ["serve", "--model", str(model)])
        assert served.pop().served_model_name == name
    runner.invoke(app, ["serve", "--model", str(step.parent.parent), "--served-model-name", "mine"])
    assert served.pop().served_model_name == "mine"


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_an_auto_plan_that_puts_parts_on_disk_says_which(checkpoint, tmp_path, command):
    """A budget too small for the model (auto:cpu=1KB, a mistyped 1GB) ran it from disk unsaid, where accelerate's
    plan stops to ask for an offload folder: the parts no budget holds are now named."""
    args = [command, "--model", str(checkpoint), *(["x"] if command == "generate" else []), "--max-new-tokens", "2",
            "--dtype", "float32", "--offload-dir", str(tmp_path)]  # fmt: skip
    spilled = runner.invoke(app, [*args, "--device-map", "auto:cpu=1KB"], input="")
    assert spilled.exit_code == 0, spilled.output
    assert spilled.stderr == (
        "note: --device-map auto:cpu=1KB puts 11 part(s) on disk, which fit in none of its budgets: embed_tokens=disk,"
        "norm=disk,lm_head=disk,layers.0-2.self_attn=disk,layers.0.mlp=disk,layers.1-2.mlp.shared_experts=disk,"
        "layers.1-2.mlp.experts=disk; they are read from disk as each step runs them (raise a budget to hold them in "
        "memory)\n"
    )
    held = runner.invoke(app, [*args, "--device-map", "auto:cpu=1GiB"], input="")
    assert held.exit_code == 0 and held.stderr == "", held.output


def test_disk_parts_are_copied_to_the_offload_dir_given_and_an_unwritable_one_is_named(
    checkpoint, monkeypatch, tmp_path
):
    model, elsewhere = tmp_path / "read_only", tmp_path / "elsewhere"
    shutil.copytree(checkpoint, model)
    read_only_folder(monkeypatch, model)
    args = ["generate", "--model", str(model), "def main():", "--temperature", "0", "--max-new-tokens", "6",
            "--ignore-eos", "--dtype", "float32"]  # fmt: skip
    disk = ["--device-map", "*=cpu,layers.*.mlp.experts=disk"]
    refused = runner.invoke(app, [*args, *disk])
    assert refused.exit_code == 1
    assert (
        f"error: {model / 'offload'}: the copies of the parts placed on disk go in this offload folder, which cannot "
        "be written (Permission denied); choose another with --offload-dir"
    ) in refused.stderr
    placed = runner.invoke(app, [*args, *disk, "--offload-dir", str(elsewhere)])
    assert placed.exit_code == 0, placed.output
    assert placed.stdout == runner.invoke(app, args).stdout and list(elsewhere.glob("layers.1.mlp.experts/*.bin"))
    served = []
    monkeypatch.setattr(
        "seekstack.serve.launch.build_server", lambda model, options, **_: served.append(options) or 1 / 0
    )
    runner.invoke(app, ["serve", "--model", str(model), *disk, "--offload-dir", str(elsewhere)])
    assert served.pop().engine.offload_dir == str(elsewhere)
    unread = runner.invoke(app, [*args, "--offload-dir", str(elsewhere)])
    assert unread.exit_code == 2
    assert "Invalid value for '--offload-dir': must be left out without a device map" in unread.stderr


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_compile_with_a_device_map_is_refused_naming_both_options(checkpoint, monkeypatch, command):
    for starts in ("seekstack.cli.generate.load_engine", "seekstack.serve.launch.build_server"):
        monkeypatch.setattr(starts, lambda *args, **kwargs: pytest.fail("started a compiled placed model"))
    prompt = ["x"] if command == "generate" else []
    result = runner.invoke(app, [command, "--model", str(checkpoint), *prompt, "--compile", "--device-map", "*=cpu"])
    assert result.exit_code == 2
    assert "Invalid value for '--compile': must be off with a device map (--device-map, device_map=)" in result.stderr


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize(
    ("device", "problem"),
    [("cuda:7", "torch cannot reach cuda:7 here"), ("gpu", "give cpu, cuda, cuda:N or auto")],
)
def test_an_engine_command_refuses_a_device_it_cannot_run_on_naming_it(checkpoint, monkeypatch, command, device,
                                                                       problem):  # fmt: skip
    for starts in ("seekstack.cli.generate.load_engine", "seekstack.serve.launch.build_server"):
        monkeypatch.setattr(starts, lambda *args, **kwargs: pytest.fail("read the model"))
    prompt = ["x"] if command == "generate" else []
    result = runner.invoke(app, [command, "--model", str(checkpoint), *prompt, "--device", device], input="")
    assert result.exit_code == 2  # before the weights are read
    assert f"Invalid value for '--device': has value '{device}': {problem}" in result.stderr


def engines_devices(monkeypatch) -> list[str]:
    """The `device` of each Engine.from_pretrained call from now on."""
    from seekstack.infer.engine import Engine

    devices, from_pretrained = [], Engine.from_pretrained.__func__
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: devices.append(kw["device"])
                                                               or from_pretrained(cls, *a, **kw)))  # fmt: skip
    return devices


GREEDY_ARGS = ["def f(", "--temperature", "0", "--max-new-tokens", "6", "--dtype", "float32"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is cuda:0 here")
def test_generate_on_device_auto_runs_on_the_cpu_where_torch_reaches_no_gpu(checkpoint, monkeypatch):
    devices = engines_devices(monkeypatch)
    auto = runner.invoke(app, ["generate", "--model", str(checkpoint), *GREEDY_ARGS, "--device", "auto"])
    assert auto.exit_code == 0, auto.output
    assert auto.stdout == runner.invoke(app, ["generate", "--model", str(checkpoint), *GREEDY_ARGS]).stdout
    assert devices == ["cpu", "cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_on_cuda_writes_the_cpus_greedy_text(checkpoint, monkeypatch):
    devices = engines_devices(monkeypatch)
    on_gpu = runner.invoke(app, ["generate", "--model", str(checkpoint), *GREEDY_ARGS, "--device", "cuda"])
    assert on_gpu.exit_code == 0, on_gpu.output
    assert on_gpu.stdout == runner.invoke(app, ["generate", "--model", str(checkpoint), *GREEDY_ARGS]).stdout
    assert devices == ["cuda:0", "cpu"]


def long_prompt(engine, tokens: int) -> str:
    """A text of at least `tokens` tokens."""
    text = ""
    while len(engine.tokenizer.encode(text)) < tokens:
        text += "def main():\n    return 1\n"
    return text


def test_generate_caps_max_new_tokens_to_the_context_with_a_notice(checkpoint, engine):
    prompt = long_prompt(engine, 240)
    prompt_len = len(engine.tokenizer.encode(prompt))
    room = engine.max_model_len - prompt_len
    args = ["generate", "--model", str(checkpoint), prompt, "--temperature", "0", "--ignore-eos",
            "--max-new-tokens", "500"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    dtype, reason = EngineOptions().resolved_dtype(checkpoint)
    way_out = "--dtype float32 to run in float32" if dtype != "float32" else "--dtype bfloat16 to run in bf16"
    assert result.stderr == (
        f"note: dtype {dtype} ({reason}); {way_out}\n"
        f"note: prompt is {prompt_len} tokens; max_new_tokens capped from 500 to {room} to fit the context of 256\n"
    )
    expected = engine.generate([prompt], SamplingParams(max_new_tokens=room, temperature=0, ignore_eos=True))[0]
    assert len(expected.token_ids) == room and result.stdout == expected.text + "\n"


@pytest.mark.parametrize(
    ("dtype", "caveat"),
    [
        ("float16", "this CPU has none of avx512_fp16, amx_fp16"),
        ("bfloat16", "this CPU has avx512_bf16, but a model of 0.2M parameters (under 16M) runs faster in float32"),
    ],
)
def test_generate_tells_why_a_dtype_asked_for_can_run_slower_here(checkpoint, monkeypatch, dtype, caveat):
    monkeypatch.setattr(precision, "cpu_features", lambda: {"avx512_f": True, "avx512_bf16": True})  # a Zen 4
    args = ["generate", "--model", str(checkpoint), "def f(", "--max-new-tokens", "2"]
    result = runner.invoke(app, [*args, "--dtype", dtype])
    assert result.exit_code == 0, result.output
    told = f"note: dtype {dtype} as asked; it can run slower here than float32: {caveat} (--dtype auto "
    told += "picks the faster)"
    assert result.stderr.splitlines()[0] == told
    quiet = runner.invoke(app, [*args, "--dtype", "float32"])
    assert quiet.exit_code == 0 and "note: dtype" not in quiet.stderr


def test_generate_refuses_a_prompt_that_alone_fills_the_context(checkpoint, engine):
    prompt = long_prompt(engine, 256)
    prompt_len = len(engine.tokenizer.encode(prompt))
    for extra in ([], ["--json"]):
        result = runner.invoke(app, ["generate", "--model", str(checkpoint), prompt, *extra])
        assert result.exit_code == 1
        message = f"prompt is {prompt_len} tokens; the context of 256 leaves no room for a new token"
        assert message in (json.loads(result.stdout)["error"]["message"] if extra else result.stderr)


def test_stop_values_read_backslash_escapes_and_keep_other_text():
    assert unescape(r"\n\n") == "\n\n"
    assert unescape(r"\t|\r|\u00e9|\U0001F600|\x41") == "\t|\r|é|😀|A"
    assert unescape(r"C:\\new") == "C:\\new"  # an escaped backslash, then a plain n
    assert unescape(r"naïve → \d \q") == r"naïve → \d \q"  # non-ASCII text and unknown escapes stay as typed


def test_generate_stop_typed_with_escapes_cuts_the_text(checkpoint, engine):
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    text = engine.generate(["def main():"], params)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    typed = "".join({"\n": r"\n", "\t": r"\t"}.get(char, f"\\u{ord(char):04x}") for char in stop)
    args = ["generate", "--model", str(checkpoint), "def main():", "--temperature", "0", "--ignore-eos",
            "--max-new-tokens", "16", "--stop", typed]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == text[: text.index(stop)] + "\n"
    record = json.loads(runner.invoke(app, [*args, "--json"]).stdout)  # which stop ended it, as vLLM's stop_reason
    assert (record["text"], record["finish_reason"], record["stop_reason"]) == (text[: text.index(stop)], "stop", stop)


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
    replies = [
        hello,
        answer([*first_turn, {"role": "assistant", "content": hello}, {"role": "user", "content": "more"}]),
        answer([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]),
        answer([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "again"}]),
    ]
    assert result.stdout == "".join(on_its_own_line(text) for text in replies)  # the replies alone, as a script's
    told = [
        "note: system prompt set; history cleared",
        "note: history cleared",
        f"error: unknown command '/nope'; {HELP}",
    ]
    assert [line for line in result.stderr.splitlines() if not line.startswith("note: dtype")] == told


def test_chat_takes_the_sampling_options_generate_takes(checkpoint, engine):
    penalties = dict(repetition_penalty=3.0, presence_penalty=2.0, frequency_penalty=2.0)
    args = ["chat", "--model", str(checkpoint), "--max-new-tokens", "12", "--temperature", "0", "--min-p", "0.5",
            *(f"--{name.replace('_', '-')}={value}" for name, value in penalties.items())]  # fmt: skip
    result = runner.invoke(app, args, input="hello\n")
    assert result.exit_code == 0, result.output
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    penalized = dataclasses.replace(greedy, top_p=0.95, min_p=0.5, **penalties)
    reply, plain = (engine.generate([prompt], ending_at_special_tokens(params, engine.tokenizer))[0]
                    for params in (penalized, greedy))  # fmt: skip
    assert result.stdout == on_its_own_line(reply.text) and reply.token_ids != plain.token_ids  # the penalties told


def test_chat_max_new_tokens_minus_one_replies_until_the_context_is_full_as_generates(checkpoint, engine):
    """generate and llama-cli take -1 for no limit but the context's; chat refused it ("has value -1: input should be
    greater than 0"). Each reply now fills what its prompt leaves of the context, with no notice of a cap."""
    result = runner.invoke(app, ["chat", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "-1"],
                           input="hello\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    room = SamplingParams(max_new_tokens=engine.context_len - len(prompt), temperature=0)
    [reply] = engine.generate([prompt], ending_at_special_tokens(room, engine.tokenizer))
    assert result.stdout == on_its_own_line(reply.text) and "capped" not in result.stderr
    refused = runner.invoke(app, ["chat", "--model", str(checkpoint), "--max-new-tokens", "-2"], input="hello\n")
    assert refused.exit_code == 2 and "Invalid value for '--max-new-tokens': has value -2" in refused.stderr


def on_its_own_line(text: str) -> str:
    """What the chat prints for a reply or a notice: a newline follows unless it ends with one."""
    return text if text.endswith("\n") else text + "\n"


def test_chat_drops_the_oldest_turns_when_the_context_is_full_and_says_so(checkpoint):
    engine = Engine.from_pretrained(checkpoint, max_model_len=48)
    notices: list[str] = []
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    session = ChatSession(engine, params, notify=notices.append)
    said = ["one two three four", "five six seven eight", "nine ten eleven", "twelve thirteen"]
    dropped = []
    for text in said:
        exchanges = len(session.turns) // 2
        assert len("".join(session.reply(text))) > 0
        dropped.append(exchanges + 1 - len(session.turns) // 2)
    users = [turn["content"] for turn in session.turns if turn["role"] == "user"]
    assert users[-1] == said[-1] and users[0] != said[0]  # the newest turn stays, the oldest went
    assert len(engine.tokenizer.encode_chat(session.messages())) < 48
    told = [f"the oldest {count} exchange(s) left the history, to fit the context of 48 tokens with 4 for the reply"
            for count in dropped if count]  # fmt: skip
    assert told and notices == told  # each drop told, as it happened


def test_chat_drops_the_oldest_turns_before_it_cuts_a_reply_short(checkpoint):
    engine = Engine.from_pretrained(checkpoint, max_model_len=48)
    notices: list[str] = []
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    session = ChatSession(engine, params, notify=notices.append)
    "".join(session.reply("one two three four five six"))
    session.turns[-1]["content"] = "one"  # a short reply: the next prompt (42 tokens) fits, the reply's 8 do not
    reply = "".join(session.reply("seven eight nine ten eleven"))
    # the oldest turns went to give the reply its 8 tokens; it was not capped
    told = "the oldest 1 exchange(s) left the history, to fit the context of 48 tokens with 8 for the reply"
    assert notices == [told]
    assert session.turns == [
        {"role": "user", "content": "seven eight nine ten eleven"},
        {"role": "assistant", "content": reply},
    ]


def test_chat_with_max_new_tokens_past_the_context_keeps_half_of_it_for_the_history(checkpoint):
    engine = Engine.from_pretrained(checkpoint, max_model_len=48)
    session = ChatSession(engine, SamplingParams(max_new_tokens=512, temperature=0, ignore_eos=True))
    "".join(session.reply("one"))
    session.turns[-1]["content"] = "two"  # a short reply, so that both turns fit in half the context
    "".join(session.reply("three"))
    assert [turn["role"] for turn in session.turns] == ["user", "assistant"] * 2


def test_chat_within_a_small_cache_budget_drops_the_oldest_turns_instead_of_failing(checkpoint):
    engine = Engine.from_pretrained(checkpoint, num_blocks=4, block_size=16)  # 48 tokens of the model's 256
    session = ChatSession(engine, SamplingParams(max_new_tokens=512, temperature=0, ignore_eos=True))
    said = ["one two three four", "five six seven eight", "nine ten eleven"]
    for text in said:
        assert len("".join(session.reply(text))) > 0  # each reply capped to the room the cache leaves
    users = [turn["content"] for turn in session.turns if turn["role"] == "user"]
    assert users[-1] == said[-1] and users[0] != said[0]


def test_chat_keeps_its_history_when_a_message_alone_is_too_long_and_names_text_that_is_not_utf8(checkpoint):
    engine = Engine.from_pretrained(checkpoint, max_model_len=48)
    session = ChatSession(engine, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    assert "".join(session.reply("one two"))
    history = list(session.turns)
    for text, message in (("word " * 60, "the message needs"), ("caf\udce9", "it holds the byte 0xe9")):
        with pytest.raises(ValueError, match=message):
            "".join(session.reply(text))
        assert session.turns == history  # the message is refused; the conversation stays


@pytest.mark.parametrize(
    "system, told",
    [(None, "; the context holds 48: write less"),
     ("Be brief.", " with the system prompt; the context holds 48: write less or change /system")],
)  # fmt: skip
def test_a_message_too_long_names_the_system_prompt_only_where_one_is_set(checkpoint, system, told):
    """It said "the message needs 64 tokens with the system prompt; ...: write less or change /system" in a chat
    that had none."""
    session = ChatSession(
        Engine.from_pretrained(checkpoint, max_model_len=48), SamplingParams(max_new_tokens=4), system
    )
    with pytest.raises(ValueError, match=rf"^the message needs \d+ tokens{re.escape(told)}$"):
        "".join(session.reply("word " * 60))


def test_chat_takes_only_the_system_command_itself(checkpoint):
    args = ["chat", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "2"]
    result = runner.invoke(app, args, input="/systemic design\n/quit\n")
    assert result.exit_code == 0 and f"error: unknown command '/systemic'; {HELP}" in result.stderr


def test_a_command_given_words_it_takes_none_of_is_refused_as_such_not_as_unknown(checkpoint):
    """A "/clear all" was refused as "unknown command '/clear'", a command the help lists: it now says that the command
    takes nothing after it, runs nothing (the chat goes on past "/bye now") and answers nothing. An empty or blank
    line (a plain Enter) between them is skipped, not a crash (it raised IndexError), and the chat goes on past it."""
    args = ["chat", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "2"]
    result = runner.invoke(app, args, input="/clear all\n\n/bye now\n   \n/? commands\n/nope x\n/quit\n")
    assert result.exit_code == 0 and result.stdout == ""
    assert [line for line in result.stderr.splitlines() if not line.startswith("note: dtype")] == [
        f"error: /clear takes nothing after it ('/clear all'); {HELP}",
        f"error: /bye takes nothing after it ('/bye now'); {HELP}",
        f"error: /? takes nothing after it ('/? commands'); {HELP}",
        f"error: unknown command '/nope'; {HELP}",
    ]


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


def test_chat_tells_a_reply_the_engine_failed_and_keeps_no_turn_of_it(checkpoint, engine, monkeypatch):
    """A sampling failure ends the reply's request with finish_reason "error": chat says so on stderr, as generate
    does, rather than show an empty reply and keep a turn the model never answered."""

    def failing(self, logits):
        raise RuntimeError("sampler broke")

    monkeypatch.setattr("seekstack.infer.sampling.SamplingBatch.sample", failing)
    args = ["chat", "--model", str(checkpoint), "--max-new-tokens", "4", "--no-compile"]
    result = runner.invoke(app, args, input="hi\nagain\n")
    assert result.exit_code == 0 and result.stdout == ""
    told = "error: the reply failed (RuntimeError: sampler broke); the message was not kept"
    assert [line for line in result.stderr.splitlines() if not line.startswith("note: dtype")] == [told, told]
    session = ChatSession(engine, SamplingParams(max_new_tokens=4))
    with pytest.raises(ReplyFailed, match="sampler broke"):
        "".join(session.reply("hi"))
    assert session.turns == []


class Terminal:
    """A user at the chat prompt: types `lines`, then ends the input; presses Ctrl-C while `write` shows the
    `interrupt_at`-th piece of text (counting from 1). Records the engine's load at each prompt."""

    def __init__(self, engine: Engine, lines: list[str], interrupt_at: int | None = None):
        self.engine, self.lines, self.interrupt_at = engine, list(lines), interrupt_at
        self.shown: list[str] = []
        self.pieces = 0
        self.load_at_prompt: list[tuple[int, int, float]] = []

    def read_line(self, prompt: str) -> str:
        stats = self.engine.stats()
        self.load_at_prompt.append((stats.running, stats.waiting, stats.cache_usage))
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def write(self, text: str) -> None:
        self.pieces += 1
        if self.pieces == self.interrupt_at:
            raise KeyboardInterrupt
        self.shown.append(text)

    def complain(self, text: str) -> None:  # stderr, beside the replies at a terminal
        self.shown.append(f"error: {text}\n")

    def acknowledge(self, text: str) -> None:  # stderr too
        self.shown.append(f"note: {text}\n")


def reply_to(engine: Engine, messages: list[dict], params: SamplingParams) -> str:
    """The chat's reply to `messages`: `params` stopping at the special tokens, as a ChatSession's do."""
    chat_params = ending_at_special_tokens(params, engine.tokenizer)
    return engine.generate([engine.tokenizer.encode_chat(messages)], chat_params)[0].text


def test_ctrl_c_mid_reply_stops_it_keeps_what_was_shown_and_the_chat_goes_on(checkpoint):
    engine = Engine.from_pretrained(checkpoint)
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    terminal = Terminal(engine, ["hello", "again"], interrupt_at=4)
    run_chat(ChatSession(engine, params), terminal.read_line, terminal.write, terminal.complain, terminal.acknowledge,
             prompt="> ")  # fmt: skip
    partial = "".join(terminal.shown[:3])
    assert partial and reply_to(engine, [{"role": "user", "content": "hello"}], params).startswith(partial)
    assert terminal.shown[3] == "\n"  # the interrupted reply's line is ended
    assert terminal.load_at_prompt[1] == (0, 0, 0.0)  # back at the prompt: no request running, no block held
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": partial}]
    again = reply_to(engine, [*history, {"role": "user", "content": "again"}], params)
    assert "".join(terminal.shown[4:-1]) == on_its_own_line(again) and terminal.shown[-1] == "\n"  # then the end
    assert not engine.has_unfinished() and engine.cache.usage == 0


def test_ctrl_c_while_the_engine_steps_stops_the_reply_and_frees_its_blocks(checkpoint, monkeypatch):
    engine = Engine.from_pretrained(checkpoint)
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    real_step, steps = engine.step, []

    def step():
        steps.append(1)
        if len(steps) == 3:  # the prefill and one decode step went out; Ctrl-C lands in the second decode step
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    session = ChatSession(engine, params)
    terminal = Terminal(engine, ["hello", "again"])
    run_chat(session, terminal.read_line, terminal.write, terminal.complain, terminal.acknowledge, prompt="> ")
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    first = engine.generate([prompt], ending_at_special_tokens(params, engine.tokenizer))[0]
    two_tokens = engine.tokenizer.decode(first.token_ids[:2])  # as generated: the text encoded again may merge others
    assert terminal.load_at_prompt[1] == (0, 0, 0.0)
    assert [turn["role"] for turn in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[1]["content"] == terminal.shown[0] + terminal.shown[1]
    assert two_tokens.startswith(session.turns[1]["content"]) and terminal.shown[2] == "\n"


def test_a_reply_interrupted_before_any_text_leaves_no_turn(checkpoint):
    engine = Engine.from_pretrained(checkpoint)
    session = ChatSession(engine, SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    replies = session.reply("hello")
    next(replies)
    replies.close()  # closed before the first piece was taken: nothing was shown
    assert session.turns == [] and engine.cache.usage == 0


def test_ctrl_c_stops_a_chat_whose_input_is_piped_in_not_only_its_reply(checkpoint):
    """`seekstack chat < questions.txt`: Ctrl-C stops the run, as it stops generate, rather than skip to the next
    question (a 200-line script went on after two Ctrl-C); the reply's line is ended first."""
    engine = Engine.from_pretrained(checkpoint)
    for interrupt_at in (1, 2):  # in the first reply's first piece, its second
        terminal = Terminal(engine, ["hello", "again"], interrupt_at=interrupt_at)
        session = ChatSession(engine, SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
        with pytest.raises(KeyboardInterrupt):
            run_chat(session, terminal.read_line, terminal.write, terminal.complain, terminal.acknowledge)
        assert terminal.lines == ["again"] and terminal.shown[-1] == "\n" and engine.cache.usage == 0
    shown: list[str] = []
    for typed in (KeyboardInterrupt, '"""a block'):  # at the prompt, in a block
        with pytest.raises(KeyboardInterrupt):
            run_chat(Listener(engine), typist([typed, KeyboardInterrupt], []), shown.append, shown.append, shown.append)
    assert shown == []


def test_ctrl_c_or_end_of_input_at_the_prompt_ends_the_chat_on_a_fresh_line(engine):
    session = ChatSession(engine, SamplingParams(max_new_tokens=3))
    for pressed in (KeyboardInterrupt, EOFError):
        shown = []

        def read_line(prompt, pressed=pressed, shown=shown):
            shown.append(prompt)
            raise pressed

        run_chat(session, read_line, shown.append, shown.append, shown.append, prompt="> ")  # returns: neither escapes
        assert shown == ["> ", "\n"]


def test_each_reply_ends_its_line_once(engine):
    class Scripted(ChatSession):
        def reply(self, user_text):
            yield from {"one": ["a", "b\n"], "two": ["c", ""], "three": []}[user_text]

    terminal = Terminal(engine, ["one", "two", "three"])
    run_chat(
        Scripted(engine, SamplingParams()), terminal.read_line, terminal.write, terminal.complain, terminal.acknowledge
    )
    assert "".join(terminal.shown) == "ab\nc\n\n"


@pytest.mark.parametrize("quit", ["/quit", "/exit", "/bye"])
def test_chat_takes_the_command_names_of_llama_cli_and_ollama(engine, quit):
    session = ChatSession(engine, SamplingParams(max_new_tokens=3))
    session.turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    terminal = Terminal(engine, ["/help", "/?", "/clear", quit, "never answered"])
    run_chat(session, terminal.read_line, terminal.write, terminal.complain, terminal.acknowledge)
    assert terminal.shown == [f"note: {HELP}\n", f"note: {HELP}\n", "note: history cleared\n"]  # then it left
    assert session.turns == [] and terminal.lines == ["never answered"]
    assert all(command in HELP for command in ("/reset (/clear)", "/help (/?)", "/quit (/exit, /bye)"))


class Listener(ChatSession):
    """A session that notes each message it is sent and answers "ok"."""

    def __init__(self, engine: Engine):
        super().__init__(engine, SamplingParams())
        self.heard: list[str] = []

    def reply(self, user_text):
        self.heard.append(user_text)
        yield "ok"


def typist(typed: list, prompts: list[str]) -> Callable[[str], str]:
    """A `read_line` that notes each prompt in `prompts` and gives the `typed` lines (an exception class in them is
    raised there: KeyboardInterrupt for Ctrl-C), then ends the input."""

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        if not typed:
            raise EOFError
        if isinstance(typed[0], type):
            raise typed.pop(0)
        return typed.pop(0)

    return read_line


def test_a_message_of_several_lines_goes_between_triple_quotes_as_in_ollama(engine):
    typed = ['"""def f():', "    return 1", '"""', '"""/reset"""', "after", '"""unclosed', "  at the end"]
    session, prompts, shown = Listener(engine), [], []
    run_chat(session, typist(typed, prompts), shown.append, shown.append, shown.append, prompt="> ")
    assert session.heard == ["def f():\n    return 1", "/reset", "after", "unclosed\n  at the end"]  # one message each
    assert prompts == ["> ", "... ", "... ", "> ", "> ", "> ", "... ", "... ", "> "]
    assert shown == ["ok", "\n"] * 4 + ["\n"]


def test_ctrl_c_while_a_block_is_typed_drops_the_block_and_the_chat_goes_on(engine):
    typed = ['"""a long paste', "that went wrong", KeyboardInterrupt, "after"]
    session, prompts, shown = Listener(engine), [], []
    run_chat(session, typist(typed, prompts), shown.append, shown.append, shown.append, prompt="> ")
    assert session.heard == ["after"] and shown == ["\n", "ok", "\n", "\n"]  # the block's line ended, the reply
    assert prompts == ["> ", "... ", "... ", "> ", "> "]


def test_a_reply_ends_at_a_special_token_the_model_writes_and_the_next_message_is_answered(engine):
    writes_user_turn = {engine.tokenizer.backend.token_to_id(USER): 100.0}  # the model opens a turn of the user's
    session = ChatSession(engine, SamplingParams(max_new_tokens=4, temperature=0, logit_bias=writes_user_turn))
    terminal = Terminal(engine, ["hello", "again"])
    run_chat(session, terminal.read_line, terminal.write, terminal.complain, terminal.acknowledge)
    assert terminal.shown == ["", "\n", "", "\n"]  # no "error: chat message 1 content contains the special token"
    assert session.turns == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": ""},
    ]


def test_a_system_prompt_holding_a_special_token_is_refused_and_changes_nothing(engine):
    session = ChatSession(engine, SamplingParams(max_new_tokens=3), system="Be brief.")
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    session.turns = list(history)
    terminal = Terminal(engine, [f"/system be {USER} brief"])
    run_chat(session, terminal.read_line, terminal.write, terminal.complain, terminal.acknowledge)
    assert terminal.shown == [
        f"error: the system prompt contains the special token {USER!r}, which would forge a turn: take it out; the "
        "system prompt and history are unchanged\n"
    ]
    assert (session.system, session.turns) == ("Be brief.", history)


def test_chat_refuses_a_system_option_holding_a_special_token(checkpoint):
    args = ["chat", "--model", str(checkpoint), "--system", f"be {USER} brief"]
    result = runner.invoke(app, args, input="hi\n")
    assert result.exit_code == 1
    said = f"error: the system prompt contains the special token {USER!r}, which would forge a turn: take it out"
    assert said in result.output


@pytest.mark.parametrize("option", ["--system", "prompt"])
def test_generate_chat_refuses_a_special_token_naming_the_text_that_holds_it_as_chat_does(checkpoint, option):
    """generate --chat said "chat message 0 content contains the special token ...", a number the user never gave,
    for the system prompt and for the prompt alike."""
    forged = f"be {USER} brief"
    given = ["--system", forged, "hi"] if option == "--system" else [forged]
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "--chat", "--max-new-tokens", "2", *given])
    named = "the system prompt" if option == "--system" else "the prompt"
    assert result.exit_code == 1
    said = f"error: {named} contains the special token {USER!r}, which would forge a turn: take it out\n"
    assert said in result.output


def test_a_checkpoint_with_no_mark_of_chat_training_is_called_a_base_model(checkpoint, tmp_path):
    assert base_model_reason(checkpoint, checkpoint) is None  # its tokenizer_config.json has a chat template
    bare = tmp_path / "bare"
    bare.mkdir()
    assert base_model_reason(bare, bare) == (
        f"{bare / 'tokenizer_config.json'} has no chat_template and no chat_template.jinja is beside it"
    )
    (bare / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert base_model_reason(bare, bare) is None
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_9"
    shutil.copytree(bare, step)
    (step / "train_state.pt").write_bytes(b"")
    assert "a run that trained on no conversations" in base_model_reason(step, step)  # no train_config.json
    (run / "train_config.json").write_text(json.dumps({"init_from": None}))
    assert "a run that trained on no conversations" in base_model_reason(step, step)  # pretraining
    (run / "train_config.json").write_text(json.dumps({"init_from": "runs/base", "data": "", "task": ""}))
    assert "a run that trained on no conversations" in base_model_reason(step, step)  # distilled on token shards
    (run / "train_config.json").write_text(json.dumps({"init_from": "runs/base", "task": "addition"}))
    assert base_model_reason(step, step) is None  # sft or rl
    (run / "train_config.json").write_text(json.dumps({"init_from": "", "data": "traces.jsonl", "task": ""}))
    assert base_model_reason(step, step) is None  # a student distilled from scratch on a teacher's conversations
    release = shutil.copytree(checkpoint, tmp_path / "DeepSeek-V3-Base")
    assert base_model_reason(release, release) == "its folder is named 'DeepSeek-V3-Base'"


def test_a_chat_template_that_is_no_text_is_named_not_taken_for_none(tmp_path):
    """A tokenizer with the role tokens writes its chats without the tokenizer_config.json's template, so chat went on
    with the note that it has "no chat_template", where it has one that is no text."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    assert base_model_reason(tmp_path, tmp_path).startswith(
        f"{tmp_path / 'tokenizer_config.json'}: field 'chat_template' has template 5: give its Jinja text"
    )


def test_a_chat_template_jinja_saved_by_transformers_5_marks_a_chat_model(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()  # transformers 5's tokenizer.save_pretrained: the template apart, none in tokenizer_config.json
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    assert base_model_reason(folder, folder) is None


def test_a_base_model_with_an_adapter_trained_on_chat_is_not_called_a_base_model(tmp_path):
    base = tmp_path / "base"
    base.mkdir()  # no chat_template: a base model
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "prose.txt").write_text("Some domain text.\n")
    (tmp_path / "completions.jsonl").write_text(json.dumps({"prompt": "2 + 2 =", "completion": " 4"}) + "\n")
    for name, data in (
        ("chat_adapter", "../chat.jsonl"),
        ("prose_adapter", "../prose.txt"),
        ("completion_adapter", "../completions.jsonl"),
    ):
        (tmp_path / name / "checkpoints" / "step_4").mkdir(parents=True)
        (tmp_path / name / "train_config.json").write_text(json.dumps({"init_from": "../base", "data_dir": data}))
    chat_adapter, prose_adapter = tmp_path / "chat_adapter", tmp_path / "prose_adapter"
    assert base_model_reason(base, base, chat_adapter) is None
    assert base_model_reason(base, base, chat_adapter / "checkpoints" / "step_4") is None  # one of its checkpoints
    assert "has no chat_template" in base_model_reason(base, base, prose_adapter)  # a domain adapter, not chat
    # TRL's prompt-completion of text trains with no chat template: the base stays a base model
    assert "has no chat_template" in base_model_reason(base, base, tmp_path / "completion_adapter")


@pytest.mark.parametrize(
    ("command", "told"), [(["chat"], 1), (["generate", "hi", "--chat"], 1), (["generate", "hi"], 0)]
)
def test_a_chat_says_at_the_start_that_a_base_model_has_no_chat_training(checkpoint, tmp_path, command, told):
    base = shutil.copytree(checkpoint, tmp_path / "micro")
    config = json.loads((base / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    for model, notes in ((base, told), (checkpoint, 0)):  # generate --chat as chat; plain text needs no chat training
        result = runner.invoke(app, [*command, "--model", str(model), "--max-new-tokens", "2"], input="hi\nho\n")
        assert result.exit_code == 0, result.output
        assert result.stderr.count("looks like a base model with no chat training") == notes


@pytest.mark.parametrize("terminal", [True, False])
def test_a_note_while_text_streams_starts_its_own_line_on_a_terminal(monkeypatch, capsys, terminal):
    text = StreamedText()
    for stream in (sys.stdout, sys.stderr):
        monkeypatch.setattr(stream, "isatty", lambda: terminal)
    text.write("def add(")
    text.note("compiled the decode step for 1 sequence(s) in 3.0 s")
    text.write("a, b):\n")
    text.note("after a whole line")
    out, err = capsys.readouterr()
    assert out == "def add(a, b):\n"
    opened = "\n" if terminal else ""
    assert err == f"{opened}note: compiled the decode step for 1 sequence(s) in 3.0 s\nnote: after a whole line\n"


def test_text_the_terminals_encoding_cannot_write_streams_with_question_marks_and_one_note(monkeypatch, capsys):
    """chat and generate on a terminal in ASCII or Latin-1 (PYTHONIOENCODING=ascii, a Windows cp1252 console) ended
    at the first character it lacks: "error: 'ascii' codec can't encode character '\\u4f60' ..."."""
    written = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(written, encoding="ascii"))
    text = StreamedText()
    text.write("你好, ")
    text.write("café\n")
    assert written.getvalue() == b"??, caf?\n"
    assert capsys.readouterr().err == (
        "note: standard output's encoding, ascii, cannot write every character of the text: they are written as '?' "
        "(PYTHONIOENCODING=utf-8 writes them as UTF-8)\n"
    )


@pytest.mark.parametrize("as_json", [False, True])
def test_generate_reports_a_request_the_engine_failed_and_exits_non_zero(checkpoint, monkeypatch, as_json):
    """A sampling failure ends the request with finish_reason "error": the message reaches the user (stderr, or the
    JSON's error) and the exit code is 1, not a cut-short text and 0."""

    def failing(self, logits):
        raise RuntimeError("sampler broke")

    monkeypatch.setattr("seekstack.infer.sampling.SamplingBatch.sample", failing)
    args = ["generate", "--model", str(checkpoint), "def main():", "--max-new-tokens", "4", "--no-compile"]
    result = runner.invoke(app, args + (["--json"] if as_json else []))
    assert result.exit_code == 1
    if as_json:
        record = json.loads(result.stdout)
        assert record["finish_reason"] == "error" and "sampler broke" in record["error"]["message"]
    else:
        assert "generation stopped" in result.stderr and "sampler broke" in result.stderr


def test_chat_with_vllms_max_tokens_none_replies_to_the_contexts_end_keeping_half_of_it_for_the_history(checkpoint):
    """SamplingParams(max_tokens=None), vLLM's reply up to the context's end, raised TypeError in ChatSession (min of
    None and an int); the reply now runs to the context's end, and an old turn goes to leave it half the context."""
    engine = Engine.from_pretrained(checkpoint, max_model_len=48)
    notices: list[str] = []
    params = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    session = ChatSession(engine, params, notify=notices.append)
    reply = "".join(session.reply("one"))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "one"}])
    to_the_end = dataclasses.replace(params, max_new_tokens=48 - len(prompt))
    assert reply == engine.generate([prompt], ending_at_special_tokens(to_the_end, engine.tokenizer))[0].text
    session.turns[-1]["content"] = "two three four five six seven"  # the next prompt leaves the reply less than 24
    "".join(session.reply("eight"))
    told = "the oldest 1 exchange(s) left the history, to fit the context of 48 tokens with 24 for the reply"
    assert notices == [told] and session.turns[0] == {"role": "user", "content": "eight"}


def test_stops_help_names_every_escape_it_reads():
    """--stop's help listed \\n \\t \\r \\\\ \\uXXXX while it also reads \\xHH and \\UXXXXXXXX."""
    import typer.main

    from seekstack.cli.generate import unescape

    generate = typer.main.get_command(app).commands["generate"]
    [stop] = [param for param in generate.params if param.name == "stop"]
    for escape, read in ((r"\n", "\n"), (r"\t", "\t"), (r"\r", "\r"), (r"\\", "\\"), (r"\xHH", "A"),
                         (r"\uXXXX", "A"), (r"\UXXXXXXXX", "A")):  # fmt: skip
        assert escape in stop.help
        typed = {"HH": "41", "XXXXXXXX": "00000041", "XXXX": "0041"}
        example = escape
        for placeholder in ("XXXXXXXX", "XXXX", "HH"):
            example = example.replace(placeholder, typed[placeholder])
        assert unescape(example) == read
