"""The prompts `seekstack sample` and `seekstack report` continue for a pretraining run: its own held-out text,
unless it trained on Python, whose demo prompts they are."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import processors

from seekstack.checkpoint import save_pretrained
from seekstack.eval.report import _data, _samples
from seekstack.eval.samples import DEMO_PROMPTS, conversation_samples, demo_samples, run_prompts, task_samples
from seekstack.infer import Engine, SamplingParams
from seekstack.posttrain.conversations import prompt_messages, write_conversations, write_held_out
from seekstack.posttrain.tasks import make_task, sample_problems
from seekstack.tokenizer import TOKENIZER_FILE, Tokenizer
from tests.infer.support import micro_model, tiny_tokenizer
from tests.posttrain.support import micro_checkpoint

LICENSE = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software"
MANUAL = "cp - copy files and directories"
CHINESE = "向量是可调整大小的数组。" * 10


def _run(root: Path, documents: list[tuple[str, str]], context: int = 512) -> Path:
    """A run's checkpoint folder as `train` lays it out (a micro model of `context` positions), trained on shards of a
    `data build` corpus whose val.jsonl holds `documents` ((kind, text)); only the files the prompts are read from."""
    corpus, tokens, run = root / "corpus", root / "tokens", root / "run"
    for folder in (corpus, tokens):
        folder.mkdir(parents=True)
    micro_checkpoint(run / "checkpoints" / "step_5", context)
    (corpus / "train.jsonl").write_text(json.dumps({"id": "t", "text": "x", "kind": "prose/en"}) + "\n")
    rows = [{"id": f"v{i}", "text": text, "kind": kind} for i, (kind, text) in enumerate(documents)]
    (corpus / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tokens / "val_index.json").write_text(json.dumps({"split": "val", "source": str(corpus / "val.jsonl")}))
    (run / "train_config.json").write_text(json.dumps({"data_dir": "../tokens"}))
    return run / "checkpoints" / "step_5"


def test_a_run_on_prose_is_prompted_with_the_openings_of_its_held_out_documents(tmp_path):
    checkpoint = _run(tmp_path, [("prose/en", LICENSE), ("prose/en", f"\n{MANUAL}\n"), ("cjk/zh", CHINESE)])
    first_words = "Permission is hereby granted, free of charge, to"  # 8 words
    assert run_prompts(checkpoint) == (first_words, f"\n{MANUAL}", CHINESE[:60])  # Chinese: its first 60 characters


def test_a_held_out_opening_that_fills_the_models_context_is_left_out_as_a_chat_is(tmp_path):
    """A model of 128 positions: the Chinese opening's 180 bytes filled its context, and report and sample failed
    whole, 'error: prompt 2 of 2: prompt is 180 tokens; the context of 128 leaves no room for a new token'."""
    checkpoint = _run(tmp_path, [("prose/en", LICENSE), ("cjk/zh", CHINESE)], context=128)
    assert run_prompts(checkpoint) == ("Permission is hereby granted, free of charge, to",)
    chinese = _run(tmp_path / "zh", [("cjk/zh", CHINESE)], context=128)
    assert run_prompts(chinese) == DEMO_PROMPTS  # none fits: the demo prompts, which do, as before


def test_a_run_on_python_or_a_checkpoint_outside_a_run_gets_the_python_prompts(tmp_path):
    python = _run(tmp_path / "python", [("code/python", "import os\n\nprint(os.sep)\n")] * 3)
    assert run_prompts(python) == DEMO_PROMPTS
    alone = tmp_path / "model"
    alone.mkdir()
    assert run_prompts(alone) == DEMO_PROMPTS


def test_a_post_training_run_is_prompted_with_its_held_out_chats_as_report_samples_them(tmp_path):
    """`sample` on an sft or rl run continued the Python demo prompts, text the chat model never trained on; it gets
    the held-out conversations (up to their last assistant turn) or task questions `report` samples, in the chat
    template, one whose prompt fills the context left out."""
    chats = [[{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
             [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"},
              {"role": "user", "content": "再说一次"}, {"role": "assistant", "content": "hi!"}],
             [{"role": "user", "content": "x " * 600}, {"role": "assistant", "content": "too long"}]]  # fmt: skip
    write_conversations(chats, tmp_path / "chats.jsonl")
    sft = micro_checkpoint(tmp_path / "sft" / "checkpoints" / "step_2")
    (tmp_path / "sft" / "train_config.json").write_text(json.dumps({"data": "../chats.jsonl", "val_fraction": 0.5}))
    write_held_out(tmp_path / "sft", chats[1:])
    tokenizer = Tokenizer.from_file(sft)
    assert run_prompts(sft) == (tokenizer.render_chat(chats[1][:3]),)
    rl = micro_checkpoint(tmp_path / "rl" / "checkpoints" / "step_2")
    (tmp_path / "rl" / "train_config.json").write_text(json.dumps({"task": "addition", "difficulty": 1}))
    problems = sample_problems(make_task("addition", 1), 3, "heldout", seed=0, distinct=True, up_to=True)
    assert run_prompts(rl) == tuple(tokenizer.render_chat(prompt_messages(problem)) for problem in problems)


def test_a_lora_run_on_conversations_is_reported_and_prompted_as_one_not_as_token_shards(tmp_path):
    """`lora train BASE chats.jsonl` keeps the file as its data_dir: report said "Token shards `chats.jsonl`: no
    *_index.json there (moved or deleted since the run?)" and report and sample continued the Python prompts."""
    chats = [
        [{"role": "user", "content": f"问题 {number}?"}, {"role": "assistant", "content": "答案"}]
        for number in range(3)
    ]
    write_conversations(chats, tmp_path / "chats.jsonl")
    checkpoint = micro_checkpoint(tmp_path / "lora" / "checkpoints" / "step_2")
    train_config = {"data_dir": str(tmp_path / "chats.jsonl"), "seq_len": 32}
    (tmp_path / "lora" / "train_config.json").write_text(json.dumps(train_config))
    write_held_out(tmp_path / "lora", chats[2:])
    assert run_prompts(checkpoint) == (Tokenizer.from_file(checkpoint).render_chat(chats[2][:1]),)
    assert _data(tmp_path / "lora", train_config) == f"## Data\n\nConversations from `{tmp_path / 'chats.jsonl'}`."


def test_a_lora_run_on_prompt_completion_text_is_reported_and_prompted_with_its_held_out_prompts(tmp_path):
    """`lora train BASE pc.jsonl` on TRL's prompt-completion text: report said "Token shards `pc.jsonl`: no
    *_index.json there" and sample continued the Python prompts; its held-out prompts are asked as they are."""
    rows = [{"prompt": f"问题 {number}：", "completion": "答案"} for number in range(3)]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    checkpoint = micro_checkpoint(tmp_path / "lora" / "checkpoints" / "step_2")
    train_config = {"data_dir": str(tmp_path / "pc.jsonl"), "seq_len": 32}
    (tmp_path / "lora" / "train_config.json").write_text(json.dumps(train_config))
    held = [{"role": "user", "content": "问题 2："}, {"role": "assistant", "content": "答案"}]
    write_held_out(tmp_path / "lora", [held])
    assert run_prompts(checkpoint) == ("问题 2：",)
    assert _data(tmp_path / "lora", train_config) == f"## Data\n\nConversations from `{tmp_path / 'pc.jsonl'}`."


def test_an_sft_run_whose_conversations_file_is_gone_is_prompted_with_its_val_data_file_as_report_answers_it(
    tmp_path,
):
    """With its data file moved, `sample` continued the Python demo prompts, where report answers the run's held-out
    conversations' (val_data) file whole."""
    chats = [[{"role": "user", "content": "法国的首都？"}, {"role": "assistant", "content": "巴黎"}]]
    write_conversations(chats, tmp_path / "held.jsonl")
    sft = micro_checkpoint(tmp_path / "sft" / "checkpoints" / "step_2")
    train_config = {"data": "../moved.jsonl", "val_data": "../held.jsonl", "val_fraction": 0.5}
    (tmp_path / "sft" / "train_config.json").write_text(json.dumps(train_config))
    assert run_prompts(sft) == (Tokenizer.from_file(sft).render_chat(chats[0][:1]),)
    (tmp_path / "held.jsonl").unlink()
    assert run_prompts(sft) == DEMO_PROMPTS  # neither file there: no conversations to ask


def test_an_sft_run_whose_val_data_file_was_emptied_is_refused_naming_the_way_on_as_report_tells_it(tmp_path):
    """`sample` said the reader's 'error: .../held.jsonl: no conversations' alone, where report says the run's
    conversations are not there to ask."""
    (tmp_path / "held.jsonl").write_text("")
    sft = micro_checkpoint(tmp_path / "sft" / "checkpoints" / "step_2")
    train_config = {"data": "../moved.jsonl", "val_data": "../held.jsonl", "val_fraction": 0.5}
    (tmp_path / "sft" / "train_config.json").write_text(json.dumps(train_config))
    with pytest.raises(ValueError) as refused:
        run_prompts(sft)
    assert str(refused.value) == (
        f"the run's conversations are not there to ask ({tmp_path / 'sft' / '..' / 'held.jsonl'}: no conversations): "
        "restore the file, or give the prompts (--prompt)"
    )


@pytest.mark.parametrize(
    ("written", "said"), [('{"data": ', "not valid JSON"), ("[1, 2]", "holds [1, 2], not a JSON object")]
)
def test_a_damaged_train_config_is_refused_naming_the_file(written, said, tmp_path):
    """`sample` on a run whose train_config.json was cut short said json's 'Expecting value: line 1 column 10' alone,
    naming no file; one holding a list ended in an AttributeError traceback. Report names the file (`json_object`)."""
    checkpoint = micro_checkpoint(tmp_path / "run" / "checkpoints" / "step_2")
    (tmp_path / "run" / "train_config.json").write_text(written)
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(tmp_path / 'run' / 'train_config.json'))}: {re.escape(said)}"
    ):
        run_prompts(checkpoint)


def test_a_run_on_a_file_of_problems_not_found_from_here_is_refused_naming_the_way_on(tmp_path):
    """train_config.json holds `task` as given, relative to where the run started: sample from elsewhere was refused
    with the task's own error alone, naming no way on."""
    checkpoint = micro_checkpoint(tmp_path / "rl" / "checkpoints" / "step_2")
    (tmp_path / "rl" / "train_config.json").write_text(json.dumps({"task": "problems.jsonl", "num_generations": 4}))
    with pytest.raises(ValueError, match=r"^the run's task is not there to ask \(task 'problems.jsonl': no such file"):
        run_prompts(checkpoint)


def test_report_samples_a_prose_run_on_its_held_out_openings_as_text(tmp_path, monkeypatch):
    checkpoint = _run(tmp_path, [("prose/en", LICENSE)])
    tiny_tokenizer(checkpoint)  # report samples a checkpoint holding its tokenizer, else says it has none
    asked = []

    def continuations(model, prompts, **_):
        asked.extend(prompts)
        return [(prompt, " and to deal.", "") for prompt in prompts]

    monkeypatch.setattr("seekstack.eval.samples.demo_samples", continuations)
    monkeypatch.setattr("seekstack.eval.report.read_config", lambda _: type("Config", (), {"attention_variant": "mla"}))
    section = _samples(checkpoint.parent.parent, checkpoint, {"data_dir": "../tokens"})
    assert asked == ["Permission is hereby granted, free of charge, to"]
    assert "openings of the first held-out documents" in section
    assert "```text\nPermission is hereby granted, free of charge, to and to deal.\n```" in section
    assert "fibonacci" not in section


def test_continuations_past_the_models_context_are_capped_to_its_room_with_a_notice(tmp_path):
    """`seekstack sample` on a model of 64 positions refused every prompt at its default 64 new tokens ("prompt 0 of
    6: prompt (13 tokens) + max_new_tokens (64) = 77 exceeds max_model_len=64"), where `generate` caps them."""
    model_dir = tmp_path / "model"
    save_pretrained(micro_model(max_position_embeddings=64), model_dir)
    tokenizer = tiny_tokenizer(model_dir)
    prompt = "def fibonacci(n):"
    room = 64 - len(tokenizer.encode_prompt(prompt))
    notices = []
    [(_, greedy, _)] = demo_samples(model_dir, (prompt,), max_new_tokens=100, notify=notices.append)
    assert notices == [f"{prompt!r}: prompt is {64 - room} tokens; max_new_tokens capped from 100 to {room} to fit "
                       "the context of 64"]  # fmt: skip
    engine = Engine.from_pretrained(model_dir)
    assert greedy == engine.generate([prompt], SamplingParams(max_new_tokens=room, temperature=0.0))[0].text


def test_a_chat_prompt_gets_the_one_bos_its_template_writes_with_a_tokenizer_that_frames_text_with_bos(
    tmp_path, monkeypatch
):
    """`sample` on a post-training run encoded its chat-template prompts as text to frame (`encode_prompt`): with a
    tokenizer whose post-processor puts BOS first (a DeepSeek release's), BOS twice, where report's samples (`encode`)
    have it once; a plain prompt is framed as before."""
    model = micro_checkpoint(tmp_path / "model")
    tokenizer = Tokenizer.from_file(model)
    bos = tokenizer.backend.id_to_token(tokenizer.bos_id)
    tokenizer.backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_id)]
    )
    tokenizer.backend.save(str(model / TOKENIZER_FILE))
    prompted = []  # each continuation's prompt ids, as the engine read them
    generate = Engine.generate

    def recorded(self, prompts, params):
        completions = generate(self, prompts, params)
        prompted.extend(completion.prompt_token_ids for completion in completions)
        return completions

    monkeypatch.setattr(Engine, "generate", recorded)
    chat = tokenizer.render_chat([{"role": "user", "content": "Capital of France?"}])
    demo_samples(model, (chat, "def f("), max_new_tokens=2)
    assert prompted[:2] == [tokenizer.encode(chat), [tokenizer.bos_id, *tokenizer.encode("def f(")]]


@pytest.mark.parametrize(
    ("prompt", "refusal"),
    [
        ("", "prompt 2 of 2 is empty: give the text to continue"),
        ("x " * 40, "prompt 2 of 2: prompt is 41 tokens; the context of 16 leaves no room for a new token"),
    ],
)
def test_a_prompt_refused_is_named_by_its_place_among_those_given(tmp_path, prompt, refusal):
    """Was "prompt 1 of 4: empty prompt: give at least one token", the engine's 0-based place among the greedy and the
    sampled copies, and for a prompt filling the context no place at all."""
    model_dir = tmp_path / "model"
    save_pretrained(micro_model(max_position_embeddings=16), model_dir)
    tiny_tokenizer(model_dir)
    with pytest.raises(ValueError) as refused:
        demo_samples(model_dir, ("def f", prompt), max_new_tokens=2)
    assert str(refused.value).startswith(refusal)


def test_no_prompts_conversations_or_questions_give_no_samples_as_the_engine_gives_none(tmp_path):
    """Were refused as "max_batch_size=0 must be >= 1", an engine option the caller never gave; task_samples of
    0 questions failed in "max() arg is an empty sequence", sizing the room after the longest of no prompts."""
    model_dir = tmp_path / "model"
    save_pretrained(micro_model(), model_dir)
    tiny_tokenizer(model_dir)
    assert demo_samples(model_dir, ()) == [] == conversation_samples(model_dir, [], max_new_tokens=2)
    assert task_samples(model_dir, make_task("addition"), count=0) == []
