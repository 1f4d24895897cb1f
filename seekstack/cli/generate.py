"""`seekstack generate` and `seekstack chat`: a checkpoint on the inference engine, in the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from seekstack.cli.common import user_errors
from seekstack.infer.params import EngineOptions, SamplingParams

ModelDir = Annotated[Path, typer.Option("--model", help="Checkpoint folder: config.json, safetensors, tokenizer.json")]
TokenizerPath = Annotated[Path | None, typer.Option(help="tokenizer.json or its folder, if the model folder has none")]
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens to generate")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy")]
TopK = Annotated[int, typer.Option(help="Sample among the k likeliest tokens; 0 = off")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: the smallest set with this much probability")]
Seed = Annotated[int | None, typer.Option(help="Seed of the sampling; the same seed gives the same text")]
Speculative = Annotated[bool, typer.Option(help="MTP speculative decoding (the model needs an MTP module)")]
DraftTokens = Annotated[
    int, typer.Option(min=1, help="With --speculative: tokens the MTP module drafts per step (past 1 it drafts again)")
]
Compile = Annotated[
    bool, typer.Option(help="Decode with torch.compile: a first step of ~15-30 s compiling, then ~2x faster steps")
]
Threads = Annotated[int | None, typer.Option(min=1, help="torch threads; 1 is fastest for small models on a busy CPU")]


def generate_command(
    prompt: Annotated[str, typer.Argument(help="Text to continue")],
    model: ModelDir,
    tokenizer: TokenizerPath = None,
    max_new_tokens: MaxNewTokens = SamplingParams.max_new_tokens,
    temperature: Temperature = SamplingParams.temperature,
    top_k: TopK = SamplingParams.top_k,
    top_p: TopP = SamplingParams.top_p,
    min_p: Annotated[float, typer.Option(help="Drop tokens less likely than min-p x the likeliest")] = (
        SamplingParams.min_p
    ),
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages tokens already seen")] = (
        SamplingParams.repetition_penalty
    ),
    presence_penalty: Annotated[float, typer.Option(help="OpenAI presence penalty, -2..2")] = (
        SamplingParams.presence_penalty
    ),
    frequency_penalty: Annotated[float, typer.Option(help="OpenAI frequency penalty, -2..2")] = (
        SamplingParams.frequency_penalty
    ),
    seed: Seed = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this text (repeatable)")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep going past the end-of-sequence token")] = False,
    top_logprobs: Annotated[int, typer.Option(help="With --json: log-probabilities of this many alternatives")] = 0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt as a user turn of the chat template")] = False,
    speculative: Speculative = EngineOptions.speculative,
    draft_tokens: DraftTokens = EngineOptions.draft_tokens,
    compile: Compile = EngineOptions.compile,
    threads: Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with tokens and timings")] = False,
) -> None:
    """Continue PROMPT with a checkpoint, streaming the text (or, with --json, a machine-readable result)."""
    import torch

    from seekstack.infer.engine import Engine, completion_record

    with user_errors(as_json):
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos,
            logprobs=as_json and top_logprobs > 0, top_logprobs=top_logprobs,
        ).validate()  # fmt: skip
        if threads:
            torch.set_num_threads(threads)
        options = EngineOptions(max_batch_size=1, speculative=speculative, draft_tokens=draft_tokens, compile=compile)
        engine = Engine.from_pretrained(model, tokenizer=tokenizer, **options.engine_kwargs())
        encoder = engine.tokenizer
        prompt_ids = encoder.encode_chat([{"role": "user", "content": prompt}]) if chat else encoder.encode(prompt)
        if as_json:
            typer.echo(json.dumps(completion_record(engine, engine.generate([prompt_ids], params)[0]), indent=2))
            return
        for output in engine.stream(prompt_ids, params):
            typer.echo(output.text, nl=False)
    typer.echo()


def chat_command(
    model: ModelDir,
    tokenizer: TokenizerPath = None,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_new_tokens: MaxNewTokens = 512,
    temperature: Temperature = 0.7,
    top_k: TopK = SamplingParams.top_k,
    top_p: TopP = 0.95,
    seed: Seed = None,
    speculative: Speculative = EngineOptions.speculative,
    draft_tokens: DraftTokens = EngineOptions.draft_tokens,
    compile: Compile = EngineOptions.compile,
    threads: Threads = None,
) -> None:
    """Chat in the terminal with streamed replies; /reset, /system TEXT, /quit."""
    import torch

    from seekstack.infer.chat import HELP, ChatSession, run_chat
    from seekstack.infer.engine import Engine

    with user_errors():
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        ).validate()
        if threads:
            torch.set_num_threads(threads)
        options = EngineOptions(max_batch_size=1, speculative=speculative, draft_tokens=draft_tokens, compile=compile)
        engine = Engine.from_pretrained(model, tokenizer=tokenizer, **options.engine_kwargs())
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"{engine.model_name}: {HELP}")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_chat(ChatSession(engine, params, system), sys.stdin, write, prompt="> " if interactive else "")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
    app.command("chat")(chat_command)
