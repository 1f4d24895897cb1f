"""Continuations of prompts from a freshly trained model, greedy and sampled: what `make demo` prints (a run on
other text than Python is prompted with the openings of its own held-out documents); and a
chat model's greedy answers to a post-training task's held-out questions, verified, or to conversations up to their
last assistant turn, beside that turn.

Generation runs on the inference engine (`seekstack/infer/`), all prompts in one batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from seekstack.adapters.files import model_folders
from seekstack.checkpoint import read_config
from seekstack.eval.tasks import REASONING_MAX_TOKENS, all_python, asked_problems, held_out_modules
from seekstack.infer.engine import Engine
from seekstack.infer.params import SamplingParams
from seekstack.posttrain.conversations import (
    Conversation,
    TextCompletion,
    offered_tools,
    prompt_messages,
)
from seekstack.posttrain.rewards import RewardWeights
from seekstack.posttrain.rollout import rollout_length, sample_groups, task_prompts
from seekstack.posttrain.tasks import Task
from seekstack.tokenizer import Tokenizer
from seekstack.tokens.provenance import corpus_folder
from seekstack.train.config import CONFIG_FILE
from seekstack.train.plot import json_object
from seekstack.train.runs import run_holding

# Prompts end where a token ends: byte-level BPE glues spaces and newlines to the next word or indentation.
DEMO_PROMPTS = ("def fibonacci(n):", "import os\nimport sys\n\n\nclass", "    for line in lines:")
OPENING_WORDS = 8  # a held-out document's opening as a prompt: its first words, ...
OPENING_MAX_CHARS = 60  # ... at most this many characters (text without spaces: Chinese, Thai)
_OPENING = re.compile(rf"\s*(?:\S+\s+){{0,{OPENING_WORDS - 1}}}\S+")
_LAST_SPACE = re.compile(r"\s\S*\Z")  # the space before a text's last word (or its last space)


def run_prompts(checkpoint: str | Path) -> tuple[str, ...]:
    """The prompts `sample` continues by default. A post-training run's checkpoint is prompted as `report` samples it,
    in the chat template up to the answer: the held-out questions of the task it trained on, or its held-out
    conversations (else its conversations file's first) up to their last assistant turn; a pretraining run's with the
    openings of the first held-out documents (val.jsonl) of the corpus it was trained on, so a model of prose or
    Chinese is prompted with its own kind of text (an opening that fills the model's context left out, as a chat is);
    `DEMO_PROMPTS` when those are Python code or all left out, or when the run, its token shards' corpus or its
    val.jsonl is not found (a checkpoint outside a run, a model from elsewhere)."""
    checkpoint = Path(checkpoint)
    run = run_holding(checkpoint)  # its train_config.json, {} without the file; a damaged one is refused naming it
    train_config = {} if run is None else json_object(run / CONFIG_FILE, "restore it, or give the prompts (--prompt)")
    chats = _trained_chats(checkpoint, run or checkpoint, train_config, len(DEMO_PROMPTS))
    if chats:
        return chats
    documents = _held_out_documents(run or checkpoint, train_config, len(DEMO_PROMPTS))
    if all_python(documents):
        return DEMO_PROMPTS
    tokenizer, context = _tokenizer_and_context(checkpoint)
    openings = _fitting((_opening(document["text"]) for document in documents), tokenizer, context, len(documents))
    return openings or DEMO_PROMPTS  # each fills the context of a model of few positions


def _trained_chats(checkpoint: Path, run: Path, train_config: dict, count: int) -> tuple[str, ...]:
    """The first `count` chats a post-training run's `report` samples (`run_prompts`) in the chat template, each
    with the tools it offers, as the run (folder `run`, train_config.json `train_config`) trained on them; one its
    prompt fills the context of is left out, as report leaves it out. () for another run, or one whose conversations
    (its file, and any val_data file) are gone."""
    from seekstack.eval.report import asked_conversations, trained_conversations_file, trained_task

    try:
        task = trained_task(train_config)
    except ValueError as error:  # its file of problems gone (named relative to where the run started) or damaged
        raise ValueError(
            f"the run's task is not there to ask ({error}): sample from the folder the run started in, or give the "
            "prompts (--prompt)"
        ) from None
    path = trained_conversations_file(run, train_config)
    if task is not None:
        problems = asked_problems(task, count)  # as report's
        chats = [prompt_messages(problem) for problem in problems]
    elif path is not None:
        try:  # a val_data file is asked whether `path` is there or not, as report asks it
            conversations, _ = asked_conversations(run, path, train_config)
        except FileNotFoundError:  # `path` moved or deleted, and no val_data file
            return ()
        except ValueError as error:  # a file emptied or damaged since the run, as report tells it
            raise ValueError(
                f"the run's conversations are not there to ask ({error}): restore the file, or give the prompts "
                "(--prompt)"
            ) from None
        chats = [_asking(conversation) for conversation in conversations]
        chats = [chat for chat in chats if chat]  # one that opens with its answer asks nothing
    else:
        return ()
    tokenizer, context = _tokenizer_and_context(checkpoint)
    return _fitting((_prompt(tokenizer, chat) for chat in chats), tokenizer, context, count)


def _tokenizer_and_context(checkpoint: Path) -> tuple[Tokenizer, int]:
    """`checkpoint`'s tokenizer and its model's context (max_position_embeddings)."""
    folders = model_folders(checkpoint)
    return Tokenizer.from_file(folders.tokenizer), read_config(folders.weights).max_position_embeddings


def _fitting(prompts: Iterable[str], tokenizer: Tokenizer, context: int, count: int) -> tuple[str, ...]:
    """The first `count` of `prompts` whose tokens (by `tokenizer`) leave a model's `context` room for a new token;
    report leaves one that does not out."""
    return tuple(itertools.islice((p for p in prompts if len(tokenizer.encode(p)) < context), count))


def _asking(conversation: Conversation) -> Conversation:
    """`conversation`'s turns before its last assistant turn, with the tools it offers: what asks for that turn."""
    last = max(position for position, message in enumerate(conversation) if message["role"] == "assistant")
    kind = TextCompletion if isinstance(conversation, TextCompletion) else Conversation  # a list of messages too
    return kind(conversation[:last], tools=offered_tools(conversation))


def _prompt(tokenizer: Tokenizer, asking: Conversation) -> str:
    """The text that asks for a conversation's last assistant turn (`_asking`), as the run trained on it: a
    `TextCompletion`'s prompt as it is (`lora train` on TRL's prompt-completion text: no chat template), else the
    chat template up to that turn, with the tools it offers."""
    if isinstance(asking, TextCompletion):
        return asking[0]["content"]
    return tokenizer.render_chat(asking, tools=offered_tools(asking))


def _opening(text: str) -> str:
    """The first `OPENING_WORDS` words of `text`, cut at the last space within `OPENING_MAX_CHARS` characters (at that
    many characters in text without spaces); it ends where a word, and so a token, ends."""
    opening = _OPENING.match(text)[0]
    if len(opening) > OPENING_MAX_CHARS:
        cut = opening[: OPENING_MAX_CHARS + 1]  # one more: a word that ends at the limit is whole when a space follows
        last_space = _LAST_SPACE.search(cut)
        whole_words = last_space is not None and cut[: last_space.start()].strip()
        opening = cut[: last_space.start()] if whole_words else cut[:OPENING_MAX_CHARS]
    return opening.rstrip()


def _held_out_documents(run: Path, train_config: dict, count: int) -> list[dict[str, str]]:
    """The first `count` documents with text of the val.jsonl beside the train.jsonl the run (folder `run`,
    train_config.json `train_config`) encoded its token shards from, or beside the shards (`lora train` on text);
    [] when there is none."""
    data_dir = train_config.get("data_dir")
    corpus = (corpus_folder(run / data_dir) or run / data_dir) if isinstance(data_dir, str) else None
    if corpus is None or not (corpus / "val.jsonl").is_file():
        return []
    documents = (module for module in held_out_modules(corpus) if module["text"].strip())
    return list(itertools.islice(documents, count))


def _engine(model_path: str | Path, **options) -> Engine:
    """An engine on the model `model_path` names (`model_folders`): an adapter checkpoint's merged into its base as
    `generate --adapter` merges it."""
    weights, adapter, tokenizer = model_folders(model_path)
    return Engine.from_pretrained(weights, tokenizer=tokenizer, adapter=adapter, **options)


def demo_samples(
    model_path: str | Path,
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    notify: Callable[[str], None] | None = None,
) -> list[tuple[str, str, str]]:
    """(prompt, greedy continuation, sampled continuation) for each prompt, from a checkpoint or run directory
    holding the tokenizer. A prompt whose max_new_tokens do not fit the model's context with it gets the room there
    is, as `generate` caps it, and `notify` hears the engine's notice. ValueError for a prompt that is empty or fills
    the context, naming it by its place among `prompts` ("prompt 2 of 2"), checked here: the engine, handed each prompt
    twice (greedy and sampled), would number it among the copies ("prompt 3 of 4"). No prompts give [], as
    `Engine.generate` gives for none, the model not loaded."""
    if not prompts:  # an engine batching none would be refused as max_batch_size=0
        return []
    engine = _engine(model_path, max_batch_size=2 * len(prompts))
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    tokenizer = engine.tokenizer
    rooms, prompt_ids = [], []  # each prompt's max_new_tokens and token ids
    for number, prompt in enumerate(prompts, 1):
        # a chat template's text (`run_prompts`) writes its own BOS: encoded as report encodes it; other text is
        # framed as the tokenizer frames a prompt (a release's BOS first)
        ids = tokenizer.encode(prompt)
        if ids[:1] != [tokenizer.bos_id]:
            ids = tokenizer.encode_prompt(prompt)
        if not ids:
            raise ValueError(f"prompt {number} of {len(prompts)} is empty: give the text to continue")
        try:
            fitted, notice = engine.fit_max_new_tokens(len(ids), greedy)
        except ValueError as error:
            raise ValueError(f"prompt {number} of {len(prompts)}: {error}") from None
        rooms.append(fitted.max_new_tokens)
        prompt_ids.append(ids)
        if notice is not None and notify is not None:
            notify(f"{prompt!r}: {notice}")
    params = [dataclasses.replace(p, max_new_tokens=room) for p in (greedy, sampled) for room in rooms]
    completions = engine.generate([*prompt_ids, *prompt_ids], params)
    texts = [completion.text for completion in completions]
    return list(zip(prompts, texts[: len(prompts)], texts[len(prompts) :], strict=True))


class TaskSample(NamedTuple):
    """A held-out question of a task as the model saw it, its greedy answer, the reference answer, the verdict."""

    prompt: str  # the chat template's text: R1 system prompt, the question, the assistant turn opened
    completion: str
    answer: str
    right: bool  # the answer after </think> verifies


def task_samples(
    model_path: str | Path, task: Task, count: int = 4, max_new_tokens: int = REASONING_MAX_TOKENS
) -> list[TaskSample]:
    """`count` held-out problems of `task` answered greedily by a checkpoint or run's newest, sampled as
    `pass-at-k` samples its greedy rollout (at most the room its context leaves after the longest prompt). A count of
    0 gives [], the model not loaded."""
    if not count:  # no prompt to size the room after
        return []
    weights, _, tokenizer_folder = model_folders(model_path)
    context = read_config(weights).max_position_embeddings
    problems = asked_problems(task, count)
    prompts = task_prompts(Tokenizer.from_file(tokenizer_folder), problems)
    max_new_tokens = min(max_new_tokens, context - max(map(len, prompts)))
    length = rollout_length(task, problems, prompts, max_new_tokens, context, f"the context of {model_path}")
    engine = _engine(model_path, max_batch_size=count, max_model_len=length)
    tokenizer = engine.tokenizer
    rollout = sample_groups(engine, task, problems, 1, max_new_tokens, 0.0, 0, RewardWeights())
    completions = [
        tokenizer.decode(t for t in row[:length].tolist() if t != tokenizer.eos_id)
        for row, length in zip(rollout.completion_ids, rollout.completion_lengths.tolist(), strict=True)
    ]
    return [
        TaskSample(tokenizer.render_chat(prompt_messages(problem)), completion, problem.answer, bool(correct))
        for problem, completion, correct in zip(
            problems, completions, rollout.terms["correctness"].tolist(), strict=True
        )
    ]


class ConversationSample(NamedTuple):
    """A conversation as the model saw it up to its last assistant turn, its greedy answer, and that turn's content."""

    prompt: str  # the chat template's text: the turns before the last assistant turn, the assistant turn opened
    completion: str
    reference: str  # the last assistant turn's content, the answer the conversation gives


def conversation_samples(
    model_path: str | Path, conversations: list[Conversation], max_new_tokens: int
) -> list[ConversationSample]:
    """Each conversation's turns before its last assistant turn, with the tools it offers, answered greedily by a
    checkpoint or run's newest, all in one batch; an answer gets at most the room the context leaves after its
    prompt, and a conversation whose prompt fills the context (or what the cache holds, `Engine.context_len`) is left
    out, as is one that opens with its answer (no message asks it: a chat of none is refused, as transformers'). No
    conversations give [], the model not loaded."""
    if not conversations:  # an engine batching none would be refused as max_batch_size=0
        return []
    engine = _engine(model_path, max_batch_size=len(conversations))
    asked = []  # (prompt text, its ids, the reference answer)
    for messages in conversations:
        asking = _asking(messages)
        if not asking:
            continue
        prompt = _prompt(engine.tokenizer, asking)  # as the run trained on it
        text_prompt = isinstance(asking, TextCompletion)  # framed as encode_conversation frames it (a BOS maybe)
        ids = engine.tokenizer.encode_prompt(prompt) if text_prompt else engine.tokenizer.encode(prompt)
        if len(ids) < engine.context_len:
            asked.append((prompt, ids, messages[len(asking)]["content"]))
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    params = [engine.fit_max_new_tokens(len(ids), greedy)[0] for _, ids, _ in asked]
    completions = engine.generate([ids for _, ids, _ in asked], params) if asked else []
    return [
        ConversationSample(prompt, completion.text, reference)
        for (prompt, _, reference), completion in zip(asked, completions, strict=True)
    ]
