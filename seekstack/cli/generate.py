"""`seekstack generate` and `seekstack chat`: a checkpoint on the inference engine, in the terminal."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from seekstack.cli.common import (
    JsonErrorsCommand,
    UsageError,
    fail,
    options_named,
    refuse_empty_path,
    run_to_checkpoint,
    usage_error,
    user_errors,
)
from seekstack.infer.params import EngineOptions, SamplingParams
from seekstack.interrupts import INTERRUPTED
from seekstack.schema import option_name

if TYPE_CHECKING:
    from seekstack.infer.engine import Engine
    from seekstack.infer.outputs import RequestOutput

ModelDir = Annotated[
    Path,
    typer.Option(
        "--model",
        help="Checkpoint folder (config.json, safetensors, tokenizer.json) or a run's out_dir (its newest)",
        callback=run_to_checkpoint,
    ),
]
TokenizerPath = Annotated[Path | None, typer.Option(help="tokenizer.json or its folder, if the model folder has none")]
UNTIL_CONTEXT = -1  # --max-new-tokens for no limit but the context's, as llama-cli's -n -1
CHECKPOINT_DEFAULT = "default: the checkpoint's generation_config.json, else"  # an unset sampling option's value


def reply_length(max_new_tokens: int | None) -> int | None:
    """--max-new-tokens as given: at least 1, or -1 (UNTIL_CONTEXT); else a usage error saying both (the field's own
    check, "greater than 0", would leave out the -1 the option takes)."""
    if max_new_tokens is not None and max_new_tokens < 1 and max_new_tokens != UNTIL_CONTEXT:
        raise typer.BadParameter(
            f"has value {max_new_tokens}: give at least 1, or {UNTIL_CONTEXT} for until the context is full"
        )
    return max_new_tokens


ReplyTokens = Annotated[
    int | None,
    typer.Option(
        help=f"Most tokens of each reply; -1: until the context is full (llama-cli's -n -1) [{CHECKPOINT_DEFAULT} 512]",
        callback=reply_length,
    ),
]
Temperature = Annotated[
    float | None, typer.Option(help=f"Sampling temperature; 0 = greedy [{CHECKPOINT_DEFAULT} 1; chat 0.7]")
]
TopK = Annotated[
    int | None, typer.Option(help=f"Sample among the k likeliest tokens; 0 = off [{CHECKPOINT_DEFAULT} 0]")
]
TopP = Annotated[
    float | None,
    typer.Option(
        help=f"Nucleus sampling: the smallest set with this much probability [{CHECKPOINT_DEFAULT} 1; chat 0.95]"
    ),
]
MinP = Annotated[
    float | None, typer.Option(help=f"Drop tokens less likely than min-p x the likeliest [{CHECKPOINT_DEFAULT} 0]")
]
RepetitionPenalty = Annotated[
    float | None, typer.Option(help=f"> 1 discourages tokens already seen [{CHECKPOINT_DEFAULT} 1]")
]
PresencePenalty = Annotated[float, typer.Option(help="OpenAI presence penalty, -2..2")]
FrequencyPenalty = Annotated[float, typer.Option(help="OpenAI frequency penalty, -2..2")]
Seed = Annotated[
    int | None,
    typer.Option(help="Seed of the sampling; the same seed gives the same text; -1: a new one each run (llama-cli's)"),
]
Speculative = Annotated[bool, typer.Option(help="MTP speculative decoding (the model needs an MTP module)")]
DraftTokens = Annotated[
    int, typer.Option(help="With --speculative: tokens the MTP module drafts per step (past 1 it drafts again)")
]
AdaptiveDrafts = Annotated[
    bool, typer.Option(help="With --speculative: draft 0..draft-tokens a step, by measured acceptance and batch size")
]
DraftVocab = Annotated[
    int,
    typer.Option(
        min=0,
        help="With --speculative: drafts score only this many most frequent tokens (FR-Spec; counted from the training "
        "run's token shards, else the tokenizer's id order); 0 = the whole vocabulary. Output is unchanged",
    ),
]
Compile = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="Decode steps through torch.compile (~2x faster steps after ~5-60 s compiling) from the start, or never; "
        "by default once eager decoding has run 10 s, the compile time told on stderr",
    ),
]


def thread_count(threads: int | None) -> int | None:
    """--threads from 1 to this machine's CPUs (`checked_thread_count`), else a usage error (exit 2), as a bad value
    of any other option is."""
    if threads is None:
        return None
    from seekstack.infer.threads import checked_thread_count

    try:
        return checked_thread_count(threads, "--threads")
    except ValueError as error:
        raise typer.BadParameter(str(error).replace("--threads ", "has value ", 1)) from None


Threads = Annotated[
    int | None,
    typer.Option(
        help="torch threads (default torch's own; OMP_NUM_THREADS sets it); decode steps under 1 GFLOP run on "
        "one anyway",
        callback=thread_count,
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        help="auto (bfloat16 where the CPU has avx512_bf16/amx_bf16 and the model 16M+ parameters, or the GPU native "
        "bf16; else float32), float32, bfloat16 or float16; the choice is told on stderr"
    ),
]
Device = Annotated[
    str,
    typer.Option(
        help="Where the model runs: cpu, cuda, cuda:N, or auto (cuda:0 where torch reaches a GPU, else cpu); "
        "--device-map places parts on several instead"
    ),
]
KvCacheMemory = Annotated[str | None, typer.Option(help="Latent-cache budget, e.g. 4GiB; default half the free memory")]
DeviceMap = Annotated[
    str | None,
    typer.Option(
        help="Parts on devices, e.g. '*=cuda:0,layers.*.mlp.experts=cpu' or auto:cuda:0=80GiB (`seekstack plan`)"
    ),
]
OffloadDir = Annotated[
    str | None,
    typer.Option(
        help="With --device-map: the folder for copies of the parts placed on disk (memory-mapped); default the "
        "model folder's offload/ (parts the checkpoint stores as they run are mapped from it, not copied)",
        callback=refuse_empty_path,
    ),
]
Adapter = Annotated[
    Path | None, typer.Option(help="LoRA adapter folder (peft format, from `lora train`), merged into the weights")
]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        help=r"Stop before this text (repeatable); \n, \t, \r, \\, \xHH, \uXXXX and \UXXXXXXXX are read as escapes"
    ),
]
ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|[ntr\\])")
ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
# chat's defaults where neither option nor checkpoint sets them (512: ReplyTokens' help)
CHAT_SAMPLING = dict(max_new_tokens=512, temperature=0.7, top_p=0.95)
DRAFTING_OPTIONS = ("draft_tokens", "adaptive_drafts", "draft_vocab")  # what --speculative decoding alone reads


def generate_command(
    ctx: typer.Context,
    model: ModelDir,
    prompt: Annotated[
        str | None,
        typer.Argument(help="Text to continue ('-', or left out where standard input is no terminal: read from it)"),
    ] = None,
    tokenizer: TokenizerPath = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            help=f"Most tokens to generate; -1: until the context is full (llama-cli's -n -1) [{CHECKPOINT_DEFAULT} "
            f"{SamplingParams.max_new_tokens}]",
            callback=reply_length,
        ),
    ] = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    presence_penalty: PresencePenalty = SamplingParams.presence_penalty,
    frequency_penalty: FrequencyPenalty = SamplingParams.frequency_penalty,
    seed: Seed = None,
    stop: Stop = None,
    ignore_eos: Annotated[
        bool, typer.Option(help="Keep going past the end-of-sequence token (with --chat: past the end of the turn)")
    ] = False,
    top_logprobs: Annotated[
        int | None,
        typer.Option(
            help="With --json: each token's log-probability and this many likeliest (0: its own alone, vLLM's)"
        ),
    ] = None,
    prompt_logprobs: Annotated[
        int | None,
        typer.Option(help="With --json: each prompt token's log-probability and this many likeliest (vLLM's)"),
    ] = None,
    chat: Annotated[
        bool,
        typer.Option(
            help="Wrap the prompt as a user turn of the chat template; the reply ends with its turn (a special token)"
        ),
    ] = False,
    system: Annotated[str | None, typer.Option(help="With --chat: a system prompt before the user turn")] = None,
    speculative: Speculative = EngineOptions.speculative,
    draft_tokens: DraftTokens = EngineOptions.draft_tokens,
    adaptive_drafts: AdaptiveDrafts = EngineOptions.adaptive_drafts,
    draft_vocab: DraftVocab = EngineOptions.draft_vocab,
    compile: Compile = EngineOptions.compile,
    kv_cache_memory: KvCacheMemory = EngineOptions.kv_cache_memory,
    device_map: DeviceMap = EngineOptions.device_map,
    offload_dir: OffloadDir = EngineOptions.offload_dir,
    dtype: Dtype = EngineOptions.dtype,
    device: Device = EngineOptions.device,
    threads: Threads = None,
    adapter: Adapter = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object with tokens and timings (errors too; Ctrl-C: text so far)"),
    ] = False,
) -> None:
    """Continue PROMPT with a checkpoint, streaming the text (or, with --json, a machine-readable result).

    A max-new-tokens that does not fit the context with the prompt is capped, with a notice on stderr. Sampling
    options (and max-new-tokens) left unset take the checkpoint's generation_config.json values, else temperature 1,
    top-p 1, no top-k, min-p or repetition penalty, 128 new tokens."""
    from seekstack.infer.chat import ending_at_special_tokens
    from seekstack.tokenizer import Tokenizer, lone_surrogate_error, tokenizer_json_path

    with failures_as_json(as_json), user_errors(as_json):
        for option, value in (("--top-logprobs", top_logprobs), ("--prompt-logprobs", prompt_logprobs)):
            if value is not None and not as_json:
                raise usage_error(f"{option} {value}: the log-probabilities are printed with --json only")
        if system is not None and not chat:
            raise usage_error("--system is the system prompt of a --chat prompt: add --chat, or leave --system out")
        if prompt is None and sys.stdin.isatty():
            hint = prompt_parameter(ctx).get_error_hint()
            raise UsageError(f"Missing argument {hint}: give the text to continue, or pipe it in", ctx)
        from_stdin = prompt in (None, "-")
        if from_stdin:  # as `echo TEXT | ollama run MODEL` and llama-cli's `-f /dev/stdin` read it
            _read_stdin_as_text()  # a byte not UTF-8 is named below
            prompt = sys.stdin.read().removesuffix("\n").removesuffix("\r")
            # the line end echo or a file closes it with is no part of the text, as llama-cli's -f drops it: the text
            # goes on where its last line ends
        not_utf8 = lone_surrogate_error([prompt], "standard input" if from_stdin else "the text")
        if not_utf8 is not None:  # before any weights load
            raise typer.BadParameter(str(not_utf8), ctx, prompt_parameter(ctx))
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty)  # fmt: skip
        with options_named():
            params = SamplingParams(
                **given_options(sampling),
                presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, seed=seed, stop=tuple(unescape(text) for text in stop or ()),
                ignore_eos=ignore_eos, logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0,
                prompt_logprobs=prompt_logprobs,
            ).validate()  # fmt: skip
            options = one_stream(
                speculative, draft_tokens, adaptive_drafts, draft_vocab, compile, kv_cache_memory, device_map,
                offload_dir, dtype, device,
            )  # fmt: skip
        refuse_drafting_without_speculation(ctx)
        if not chat and prompt == "" and tokenizer_json_path(tokenizer or model).is_file():
            # the tokenizer alone decides whether an empty text is something to continue: before any weights load
            refuse_nothing_to_continue(Tokenizer.from_file(tokenizer or model).encode_prompt(""), from_stdin, ctx)
        engine = load_engine(model, tokenizer, options, threads, adapter)
        params = with_checkpoint_defaults(params, sampling, engine)
        encoder = engine.tokenizer
        if chat:
            tell_base_model(engine, model, tokenizer, adapter)
            params = ending_at_special_tokens(params, encoder)
            for text, named in ((system or "", "the system prompt"), (prompt, "the prompt")):
                encoder.refuse_forged_turn(text, named)  # encode_chat would say "chat message 0", which none was called
        system_turn = [{"role": "system", "content": system}] if system else []
        prompt_ids = (
            encoder.encode_chat([*system_turn, {"role": "user", "content": prompt}])
            if chat
            else encoder.encode_prompt(prompt)
        )
        refuse_nothing_to_continue(prompt_ids, from_stdin, ctx)  # --chat: a template writing nothing for it
        params, notice = engine.fit_max_new_tokens(len(prompt_ids), params)  # -1 (None): the room, unsaid
        if notice:
            typer.echo(f"note: {notice}", err=True)
        if as_json:
            print_completion_json(engine, prompt_ids, params)
            return
        terminal = StreamedText()
        engine.notify = terminal.note
        error = None
        try:
            for output in engine.stream(prompt_ids, params):
                terminal.write(output.text)
                error = output.error
        finally:
            typer.echo()  # the text's line ends, stopped by Ctrl-C or not
    if error is not None:  # the engine ended this request: say why, after the text it made
        fail(f"generation stopped: {error}")


def chat_command(
    ctx: typer.Context,
    model: ModelDir,
    tokenizer: TokenizerPath = None,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_new_tokens: ReplyTokens = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    presence_penalty: PresencePenalty = SamplingParams.presence_penalty,
    frequency_penalty: FrequencyPenalty = SamplingParams.frequency_penalty,
    seed: Seed = None,
    speculative: Speculative = EngineOptions.speculative,
    draft_tokens: DraftTokens = EngineOptions.draft_tokens,
    adaptive_drafts: AdaptiveDrafts = EngineOptions.adaptive_drafts,
    draft_vocab: DraftVocab = EngineOptions.draft_vocab,
    compile: Compile = EngineOptions.compile,
    kv_cache_memory: KvCacheMemory = EngineOptions.kv_cache_memory,
    device_map: DeviceMap = EngineOptions.device_map,
    offload_dir: OffloadDir = EngineOptions.offload_dir,
    dtype: Dtype = EngineOptions.dtype,
    device: Device = EngineOptions.device,
    threads: Threads = None,
    adapter: Adapter = None,
) -> None:
    """Chat in the terminal with streamed replies; /reset, /system TEXT, /help, /quit; \"\"\" opens and closes a
    message of several lines; Ctrl-C stops a reply.

    Says so at the start when the checkpoint looks like a base model with no chat training. Sampling options (and
    max-new-tokens) left unset take the checkpoint's generation_config.json values, else temperature 0.7, top-p 0.95,
    no top-k, min-p or repetition penalty, 512 new tokens a reply."""
    from seekstack.infer.chat import HELP, ChatSession, run_chat

    with user_errors():
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty)  # fmt: skip
        with options_named():
            params = SamplingParams(
                **{**CHAT_SAMPLING, **given_options(sampling)},
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed,
            ).validate()  # fmt: skip
            options = one_stream(
                speculative, draft_tokens, adaptive_drafts, draft_vocab, compile, kv_cache_memory, device_map,
                offload_dir, dtype, device,
            )  # fmt: skip
        refuse_drafting_without_speculation(ctx)
        engine = load_engine(model, tokenizer, options, threads, adapter)
        params = with_checkpoint_defaults(params, sampling, engine)
    tell_base_model(engine, model, tokenizer, adapter)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"{engine.model_name}: {HELP}", err=True)

    terminal = StreamedText()
    engine.notify = terminal.note
    with user_errors():  # a --system holding a special token
        session = ChatSession(engine, params, system, notify=terminal.note)
    run_chat(session, line_reader(interactive), terminal.write, terminal.error, terminal.note,
             prompt="> " if interactive else "")  # fmt: skip


def tell_base_model(engine: Engine, model: Path, tokenizer: Path | None, adapter: Path | None) -> None:
    """Say on stderr when the checkpoint (with `adapter`) looks like a base model with no chat training, before a
    chat with it (`base_model_reason`)."""
    from seekstack.infer.chat import base_model_reason
    from seekstack.tokenizer import tokenizer_json_path

    reason = base_model_reason(model, tokenizer_json_path(tokenizer or model).parent, adapter)
    if reason:
        note = f"{engine.model_name} looks like a base model with no chat training ({reason})"
        typer.echo(f"note: {note}: it may continue the text rather than answer", err=True)


def refuse_nothing_to_continue(prompt_ids: list[int], from_stdin: bool, ctx: typer.Context) -> None:
    """A usage error naming the prompt argument where it encodes to no token: an empty text (given, or read from
    standard input) of a tokenizer that puts no BOS before one leaves the model nothing to continue."""
    if not prompt_ids:
        read = " (standard input held no text)" if from_stdin else ""
        raise typer.BadParameter(
            f"is empty{read}, and this tokenizer puts no BOS token before a text: give the text to continue",
            ctx,
            prompt_parameter(ctx),
        )


def prompt_parameter(ctx: typer.Context) -> Any:
    """generate's prompt argument, which its errors name as its usage line does (`Command`: PROMPT)."""
    return next(param for param in ctx.command.params if param.name == "prompt")


def print_completion_json(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
    """Print the JSON record of the completion of `prompt_ids`, and exit 1 when the engine failed the request. Ctrl-C
    prints the record of the text made so far, with finish_reason "abort" (as vLLM's), and exits 130."""
    from seekstack.infer.outputs import completion_record, joined_completion

    parts: list[RequestOutput] = []
    started, first, compiled_before = time.perf_counter(), None, engine.compile_s
    try:
        for output in engine.stream(prompt_ids, params):  # timed as Engine.generate times a request
            if first is None:
                first, compiled_before = time.perf_counter(), engine.compile_s
            parts.append(output)
    except KeyboardInterrupt:
        parts.append(aborted_output(parts, len(prompt_ids), params))
    end = time.perf_counter()
    first = end if first is None else first
    completion = joined_completion(parts[0].request_id, prompt_ids, parts, started, first, end,
                                   engine.compile_s - compiled_before)  # fmt: skip
    typer.echo(json.dumps(completion_record(engine, completion), indent=2))
    if completion.finish_reason == "abort":
        raise typer.Exit(code=INTERRUPTED)
    if completion.error is not None:
        raise typer.Exit(code=1)


def aborted_output(parts: list[RequestOutput], prompt_tokens: int, params: SamplingParams) -> RequestOutput:
    """The last output of a request stopped after `parts`: no new tokens, finish_reason "abort"."""
    from seekstack.infer.outputs import RequestOutput

    return RequestOutput(
        request_id=parts[-1].request_id if parts else "", token_ids=[], text="",
        logprobs=[] if params.logprobs else None, finished=True, finish_reason="abort", prompt_tokens=prompt_tokens,
        completion_tokens=parts[-1].completion_tokens if parts else 0, scheduled_at=None,
    )  # fmt: skip


@contextmanager
def failures_as_json(as_json: bool) -> Iterator[None]:
    """With --json, a failure `user_errors` does not report still prints one JSON object, `{"error": {"message":
    ...}}`: an unexpected exception (its traceback on stderr) exits 1, Ctrl-C before any text exits 130."""
    if not as_json:
        yield
        return
    try:
        yield
    except (typer.Exit, BrokenPipeError):  # a broken pipe: stdout's reader has gone, to hear no JSON either
        raise
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C) before any text was generated", as_json, code=INTERRUPTED)
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        fail(f"{type(error).__name__}: {error}", as_json)


def refuse_drafting_without_speculation(ctx: typer.Context) -> None:
    """A usage error (exit 2) naming a drafting option (--draft-tokens, --adaptive-drafts, --draft-vocab) given on the
    command line without --speculative, which would leave it unread."""
    if ctx.params["speculative"]:
        return
    for name in DRAFTING_OPTIONS:
        if ctx.get_parameter_source(name).name != "DEFAULT":
            option = option_name("no_" * (ctx.params[name] is False) + name)  # as typed
            raise usage_error(f"{option} sets how speculative decoding drafts, which is off: add --speculative, or "
                              f"leave {option} out")  # fmt: skip


class StreamedText:
    """Text streamed to stdout, notes and errors to stderr: where both show on one terminal, a note that comes while
    the text's line is open (the engine compiling mid-reply) starts on a line of its own."""

    def __init__(self) -> None:
        self.open_line = False

    def write(self, text: str) -> None:
        try:
            sys.stdout.write(text)
        except UnicodeEncodeError:  # a terminal or file in an encoding lacking a character: ASCII, Latin-1, cp1252
            sys.stdout.reconfigure(errors="replace")
            self.note(
                f"standard output's encoding, {sys.stdout.encoding}, cannot write every character of the text: they "
                "are written as '?' (PYTHONIOENCODING=utf-8 writes them as UTF-8)"
            )
            sys.stdout.write(text)
        sys.stdout.flush()
        if text:
            self.open_line = not text.endswith("\n")

    def note(self, text: str) -> None:
        self._tell(f"note: {text}")

    def error(self, text: str) -> None:
        self._tell(f"error: {text}")

    def _tell(self, line: str) -> None:
        if self.open_line and sys.stdout.isatty() and sys.stderr.isatty():
            sys.stderr.write("\n")
            self.open_line = False
        typer.echo(line, err=True)


def one_stream(
    speculative: bool,
    draft_tokens: int,
    adaptive_drafts: bool,
    draft_vocab: int,
    compile: bool | None,
    kv_cache_memory: str | None,
    device_map: str | None,
    offload_dir: str | None,
    dtype: str,
    device: str,
) -> EngineOptions:
    """The engine options of a one-stream command (generate, chat), checked."""
    return EngineOptions(
        max_batch_size=1, speculative=speculative, draft_tokens=draft_tokens, adaptive_drafts=adaptive_drafts,
        draft_vocab=draft_vocab, compile=compile, kv_cache_memory=kv_cache_memory, device_map=device_map,
        offload_dir=offload_dir, dtype=dtype, device=device,
    ).validate()  # fmt: skip


def given_options(sampling: dict[str, float | None]) -> dict[str, float | None]:
    """The sampling options (and max_new_tokens) the command line set (those not None), --max-new-tokens -1
    (UNTIL_CONTEXT, llama-cli's -n -1) as max_new_tokens None: the room the prompt leaves in the context (vLLM's
    max_tokens=None), which the engine sets per prompt and a chat per reply."""
    given = {name: value for name, value in sampling.items() if value is not None}
    if given.get("max_new_tokens") == UNTIL_CONTEXT:
        given["max_new_tokens"] = None
    return given


def with_checkpoint_defaults(
    params: SamplingParams, sampling: dict[str, float | None], engine: Engine
) -> SamplingParams:
    """`params` with each of the `sampling` options the command line left unset (None) set as the checkpoint's
    generation_config.json sets it (`Engine.sampling_defaults`: DeepSeek-R1's temperature 0.6), as transformers'
    generate and vLLM read it."""
    unset = {name: value for name, value in engine.sampling_defaults.items() if sampling.get(name) is None}
    return dataclasses.replace(params, **unset) if unset else params


def load_engine(
    model: Path, tokenizer: Path | None, options: EngineOptions, threads: int | None, adapter: Path | None = None
) -> Engine:
    """`Engine.from_pretrained` with the command's options (and LoRA adapter)."""
    import torch

    from seekstack.infer.engine import Engine
    from seekstack.infer.placement import disk_parts_note

    if threads is not None:  # from 1 to the CPUs (`thread_count`)
        torch.set_num_threads(threads)
    torch.seed()  # requests without --seed take seeds from torch's generator (`SeededUniforms`): new ones each run
    tell_dtype(options, model)
    engine = Engine.from_pretrained(model, tokenizer=tokenizer, adapter=adapter, **options.engine_kwargs(model))
    note = disk_parts_note(options.device_map, engine.model)
    if note is not None:
        typer.echo(note, err=True)
    return engine


def tell_dtype(options: EngineOptions, model: Path) -> None:
    """Say on stderr which dtype an `auto` engine runs the checkpoint in `model` in, and why, with the way out; or why
    a dtype asked for by name can run slower than float32 on these devices (`asked_dtype_caveat`)."""
    from seekstack.infer.precision import asked_dtype_caveat, checkpoint_parameters

    options = options.validate()
    if options.dtype == "auto":
        dtype, reason = options.resolved_dtype(model)
        way_out = "--dtype float32 to run in float32" if dtype != "float32" else "--dtype bfloat16 to run in bf16"
        typer.echo(f"note: dtype {dtype} ({reason}); {way_out}", err=True)
        return
    caveat = asked_dtype_caveat(options.dtype, options.devices(), checkpoint_parameters(model))
    if caveat is not None:
        typer.echo(
            f"note: dtype {options.dtype} as asked; it can run slower here than float32: {caveat} (--dtype auto "
            "picks the faster)",
            err=True,
        )


def unescape(text: str) -> str:
    """The backslash escapes a shell passes through as typed (\\n, \\t, \\r, \\\\, \\xHH, \\uXXXX,
    \\UXXXXXXXX) turned into the characters they name; any other text, non-ASCII included, stays as it is."""
    return ESCAPE.sub(lambda match: ESCAPED.get(match[1]) or chr(int(match[1][1:], 16)), text)


def line_reader(interactive: bool) -> Callable[[str], str]:
    """What reads the user's lines: `input` with line editing and history (readline) at a terminal, else the
    lines of stdin; both raise EOFError at the end."""
    if not interactive:
        _read_stdin_as_text()  # a message holding a byte not UTF-8 is named by the chat, which goes on
        return _read_piped_line
    try:
        import readline  # noqa: F401  (importing it gives `input` line editing and history)
    except ImportError:  # not on every platform
        pass
    return input


def _read_stdin_as_text() -> None:
    """Read standard input as UTF-8, skipping the byte order mark that opens a file Windows' Notepad (before 2019) or
    PowerShell's Out-File -Encoding utf8 saved (`generate --model M < prompt.txt`), or as UTF-16 or UTF-32 where it
    opens with their mark (Windows PowerShell 5's `>` and Out-File write UTF-16), as the JSON Lines and config readers
    decode theirs; a byte that is not UTF-8 is kept as a C locale keeps it (surrogateescape), for
    `lone_surrogate_error` to name rather than a UnicodeDecodeError's traceback."""
    from seekstack.jsonl import marked_encoding

    peek = getattr(sys.stdin.buffer, "peek", None)  # a pipe's or a file's reader; not a test's BytesIO
    marked = marked_encoding(peek(4)[:4]) if peek is not None else None
    sys.stdin.reconfigure(encoding=marked or "utf-8-sig", errors="surrogateescape")


def _read_piped_line(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def register(app: typer.Typer) -> None:
    app.command("generate", cls=JsonErrorsCommand)(generate_command)
    app.command("chat")(chat_command)
