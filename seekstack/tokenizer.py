"""Byte-level BPE tokenizer: training, loading (ours or a DeepSeek release's) and the DeepSeek-V3 chat template.

On disk a tokenizer is a directory with `tokenizer.json` (Hugging Face `tokenizers` format) and
`tokenizer_config.json`, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it unchanged.

Chat template: DeepSeek-V3's `chat_template` (its tool turns as V3-0324's, which mended the first release's), taking
OpenAI chat messages (`template_message`) and tools:
  BOS + system prompts, then the tools' prompt (`tools_prompt`), joined by "\\n\\n" (no role token)
  + for each turn: "<｜User｜>" + content
    | "<｜Assistant｜>" + content [+ "<｜tool▁calls▁begin｜>" + calls (`tool_call_text`) joined by "\\n"
      + "<｜tool▁calls▁end｜>"] + EOS, the role token "<｜tool▁outputs▁end｜>" instead after tool results
    | tool results: "<｜tool▁outputs▁begin｜>" before the first of a run, "\\n" between, each
      "<｜tool▁output▁begin｜>" + content + "<｜tool▁output▁end｜>"
  + "<｜tool▁outputs▁end｜>" after a last tool result, else "<｜Assistant｜>" when a generation prompt is asked for,
    then the reply's opening a release's own template writes there (DeepSeek-R1's "<think>\\n"; none for ours).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import regex
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import __version__ as tokenizers_version
from tokenizers.pre_tokenizers import PreTokenizer

from seekstack.atomic import staged_files
from seekstack.chat_template import ChatTemplate, read_chat_template, read_tokenizer_config
from seekstack.interrupts import interruptible
from seekstack.schema import LONE_SURROGATE, ConfigError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)  # ids 0..4 in a trained tokenizer; BOS/EOS/PAD as in DeepSeek-V3
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
# DeepSeek-V3's tool-call tokens in the order of its ids (128806..128814); ids 5..13 in a trained tokenizer. Special
# tokens here (refused in chat content, skipped by skip_special_tokens); the server keeps them in a reply to a request
# offering tools, for its tool-call parser, as vLLM's tool parsers turn skip_special_tokens off.
TOOL_TOKENS = (
    TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END,
    TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_SEP,
)  # fmt: skip
CALL_MARKERS = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP)  # a reply's calls' tokens
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # older transformers' file of the special tokens' names
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5's save_pretrained writes the chat template
# A slow (Python) tokenizer's files, which transformers converts into a tokenizer.json: SentencePiece's model (Llama
# 2's, T5's, XLM-R's), GPT-2's vocab.json and merges.txt, WordPiece's vocab.txt
SLOW_TOKENIZER_FILES = (
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
# Where transformers pads a batch: on the left, before each prompt, as generate needs (it warns of right padding) and
# transformers 4 pads DeepSeek's releases (their LlamaTokenizerFast); PreTrainedTokenizerFast, ours, pads right unless
# told, as does the TokenizersBackend transformers 5 loads a release's byte-level tokenizer.json as
PADDING_SIDE = "left"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # the R1 format's reasoning block: <think> reasoning </think> answer
# Where an assistant message holds its reasoning apart from its content: DeepSeek's API (and vLLM's until 2026,
# `seekstack serve --reasoning-parser`), vLLM's name since (after OpenAI's guidance for gpt-oss), and transformers'
# chat templates' (gpt-oss's `thinking`, as TRL's gpt-oss datasets give it)
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
# OpenAI's message roles; developer (its newer system) is read as system
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
SMALLEST_VOCAB = 256 + len(SPECIAL_TOKENS) + len(TOOL_TOKENS)  # every byte, then the special and tool-call tokens
# 4x the largest vocabulary of a released model (Gemma 3's 262,144; DeepSeek-V3 has 129,280): ids far below what
# uint32 shards hold, and ~75 MB for the BPE trainer, which allocates ~70 bytes per token asked for up front (it
# aborts the process, past Python's reach, when that fails: 1e9 tokens asks for 70 GB).
LARGEST_VOCAB = 2**20
# GPT-2's pre-tokenizer pattern with combining marks (\p{M}) kept in the run of letters they belong to, as DeepSeek-V3's
# own pattern keeps them (`[\p{L}\p{M}]+`): GPT-2's splits Hindi नमस्ते into नमस ् त े, Thai ไม่ into ไม ่ and an NFD é
# from its e, pieces BPE never merges back; a run of symbols keeps its marks as GPT-2's does (❤️ is ❤ and the
# variation selector U+FE0F, a mark). Each run is at most LONGEST_PRE_TOKEN characters, a longer one cut into runs of
# that many from its start. tokenizers' BPE trainer updates a word at each merge in time that grows with the square
# of its length: one 400,000-character CJK document without punctuation or spaces, a single run, was still training
# after 200 s, and trains in 1.9 s cut at 256. Words of any language are far shorter (the demo corpus's longest run
# is 96), so ordinary text splits as before.
LONGEST_PRE_TOKEN = 256
RUN_REPEAT = f"{{1,{LONGEST_PRE_TOKEN}}}"
# The most characters that decide a pre-token of such a pattern: a space, a run, and the one its lookahead reads
MATCH_SPAN = LONGEST_PRE_TOKEN + 2
PRE_TOKENIZER_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}\p{M}]{1,N}| ?\p{N}{1,N}| ?[^\s\p{L}\p{N}]{1,N}|\s{1,N}(?!\S)|\s{1,N}"
).replace("{1,N}", RUN_REPEAT)
# A long document is encoded in pieces of about this many characters, and pieces in groups of about
# ENCODE_GROUP_CHARS: tokenizers holds ~185 bytes per character while it encodes (a 20 MB document took 3.7 GB whole)
DOCUMENT_PIECE_CHARS = 1 << 18
ENCODE_GROUP_CHARS = 1 << 21
# Where a document may be cut: after a letter (\p{L}) that neither a letter nor a combining mark follows (whitespace,
# a digit, punctuation: base64, minified code and CJK prose have such cuts where whitespace is rare). A run of letters
# ends there, and the pre-tokenizer's scan from the next character on reads nothing before it, so the pieces' ids are
# the whole document's (`Tokenizer.cuts_keep_ids` checks the pattern). Not before half a character (a lone surrogate,
# \p{Cs}), which only the encoding may read: it refuses the text naming it.
LETTER_END = regex.compile(r"\p{L}(?=[^\p{L}\p{M}\p{Cs}])")
# The same rule in Oniguruma, tokenizers' regex engine, whose Unicode tables differ from the regex module's (1,518 code
# points, Unicode 17's, are letters to the regex module and symbols to Oniguruma): a LETTER_END is a cut only where
# this one removes its letter, so that each cut ends a run of letters of the pattern the tokenizer splits with.
TOKENIZERS_LETTER_END = pre_tokenizers.Split(Regex(LETTER_END.pattern), behavior="removed")
# Texts around a cut of that kind, on which a tokenizer's pre-tokenizer must split alike whole and in halves
CUT_PROBES = (
    ("it's", " 12 days\n"), ("a.b", "\r\n  c"), ("中文", " 日本"), ("e\u0301", "\t\u0301x"), ("x", "   \n\nY"),
    ("The", " \U0001F600!"), ("ab", "\u3000'll"), ("aGVsbG", "8+/=ZQ"), ("f", "(x){return x.y};"),
    ("中文", "。日本語，"), ("カナ", "「かな」"), ("ok", "'s"),
)  # fmt: skip


def pre_tokenizer_pattern(split_digits: int | None = None) -> str:
    """PRE_TOKENIZER_PATTERN, its runs of digits cut into pieces of at most `split_digits` when given (GPT-4's and
    DeepSeek-V3's patterns cut at 3, nanochat's at 2), so no token holds more; None keeps a run whole up to
    LONGEST_PRE_TOKEN, as every other run."""
    if split_digits is None:
        return PRE_TOKENIZER_PATTERN
    split_digits = _whole_number(split_digits, "split_digits")  # 2.5 made "{1,2.5}", a literal: no run was cut
    if not 1 <= split_digits <= LONGEST_PRE_TOKEN:  # past it, the same pattern as LONGEST_PRE_TOKEN, or none
        raise ConfigError(
            f"has value {split_digits}; a run of digits is cut into pieces of 1 digit or more, and at most "
            f"{LONGEST_PRE_TOKEN}, the longest run of any kind (leave it out to cut runs of digits only there)",
            "split_digits",
        )
    digits_repeat = f"{{1,{split_digits}}}"
    return PRE_TOKENIZER_PATTERN.replace(rf" ?\p{{N}}{RUN_REPEAT}", rf" ?\p{{N}}{digits_repeat}")


@functools.cache
def _capped_patterns() -> frozenset[str]:
    """The patterns `train_tokenizer` splits with: `pre_tokenizer_pattern` of each split_digits, and of none."""
    return frozenset(pre_tokenizer_pattern(split_digits) for split_digits in (None, *range(1, LONGEST_PRE_TOKEN + 1)))


def byte_level_split(pattern: str) -> PreTokenizer:
    """The pre-tokenizer `train_tokenizer` writes: the pre-tokens `pattern` finds, each as byte-level characters."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _whole_number(value: object, field: str) -> int:
    """`value` as an int (a numpy integer, a 0-d integer tensor too); ConfigError naming `field` for anything else."""
    try:
        if not isinstance(value, bool):  # an int to operator.index: split_digits=True cut every digit alone
            return operator.index(value)
    except TypeError:
        pass
    raise ConfigError(f"has value {value!r} ({type(value).__name__}), not a whole number", field)


def tool_call_text(name: str, arguments: str) -> str:
    """One tool call as DeepSeek-V3 writes it (and vLLM's deepseek_v3 parser reads it): the function's `name`, then
    its `arguments` (a JSON object's text) in a json code block, between the call's tokens."""
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{arguments}\n```{TOOL_CALL_END}"


# The tools' prompt, written after the system prompts (DeepSeek's releases write none, and vLLM's example template for
# DeepSeek-V3 lists the tools there too): each tool's OpenAI definition as JSON, one a line, then the call format.
TOOLS_INTRO = (
    "## Tools\n\nYou can call these functions, each given by its definition (a JSON Schema of its parameters):\n"
)
TOOLS_FORMAT = (
    f"\n\nTo call functions, write {TOOL_CALLS_BEGIN}, then each call as {tool_call_text('NAME', 'ARGUMENTS')} (NAME "
    f"the function's name, ARGUMENTS a JSON object of its parameters), a newline between calls, then {TOOL_CALLS_END}."
)


# OpenAI's tool definition, as errors name it
TOOL_SHAPE = '{"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}'
# A function definition's fields, in the order the server reads them (seekstack.serve.schemas.FunctionDefinition)
FUNCTION_FIELDS = ("name", "description", "parameters", "strict")


def listed_tool(tool: dict) -> dict:
    """An OpenAI tool definition (`{"type": "function", "function": {...}}`, checked by `render_chat`) as the tools'
    prompt lists it: as the server reads a request's tools and SFT a line's, its function's FUNCTION_FIELDS in their
    order, null and other keys left out."""
    function = tool["function"]
    fields = {field: function[field] for field in FUNCTION_FIELDS if function.get(field) is not None}
    return {"type": "function", "function": fields}


def tools_prompt(tools: list[dict]) -> str:
    """What the system prompt says of the `tools` offered (OpenAI's `{"type": "function", "function": {...}}`), each
    as `listed_tool` lists it."""
    return TOOLS_INTRO + "\n".join(json.dumps(listed_tool(tool), ensure_ascii=False) for tool in tools) + TOOLS_FORMAT


def _jinja(text: str) -> str:
    """`text` as a Jinja string literal (a JSON string is one)."""
    return json.dumps(text, ensure_ascii=False)


# The same template as `Tokenizer.render_chat`, for transformers' `apply_chat_template`, taking messages as
# seekstack's chat, sft and serve read them: `developer` as system, content as a string or a list of text parts
# (joined by newlines; an assistant's refusal parts read as their text), an assistant's null content as empty (as its
# `refusal` where it gives one; its reasoning given apart before it, `with_reasoning`), a tool call's arguments as a
# JSON text or an object (as transformers' templates take them, written as JSON); what they refuse raises, naming the
# message (another role or part, a missing content but an assistant's, text that is no string, tool_calls but an
# assistant's list of function calls, the legacy function_call), the tools offered listed as `listed_tool` lists them
# (as the server and SFT read them), so a transformers user trains on what `seekstack sft` does. An assistant turn
# before the last user message loses its reasoning (`drop_past_reasoning`). Its `{% generation %}` blocks mark the
# tokens SFT trains (each answer, its tool calls and its EOS, not an assistant turn of weight 0) for
# `return_assistant_tokens_mask` (TRL's assistant_only_loss); they render nothing of their own.
GENERATION_PROMPT = "{{- '<｜Assistant｜>' -}}"  # CHAT_TEMPLATE's; a release's reply opening follows it
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_prompts=[], turns=[], last_user=-1, after_tool=false, calls=[], texts=[], tools=[],"
    " fields=[], reasoning=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- set position = 'chat message ' ~ loop.index0 -%}"
    "{%- if message['function_call'] -%}"
    "{{- raise_exception(position ~ ' has function_call, OpenAI\\'s deprecated form of a tool call: give it as "
    "tool_calls') -}}"
    "{%- endif -%}"
    "{%- set calls = message['tool_calls'] -%}"
    "{%- if calls is defined and calls is not none and (message['role'] != 'assistant' or calls is string"
    " or calls is mapping or calls is not iterable) -%}"
    "{{- raise_exception(position ~ ' has tool_calls: only an assistant message calls tools, giving a list of calls')"
    " -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- elif (message['content'] is none or message['content'] is not defined) and message['role'] == 'assistant' -%}"
    "{%- set content = '' -%}"
    "{%- elif message['content'] is defined and message['content'] is iterable and message['content'] is not mapping"
    " -%}"
    "{%- set ns.texts = [] -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' and part['text'] is string -%}{%- set ns.texts = ns.texts + [part['text']] -%}"
    "{%- elif part['type'] == 'refusal' and message['role'] == 'assistant' and part['refusal'] is string -%}"
    "{%- set ns.texts = ns.texts + [part['refusal']] -%}"
    "{%- else -%}"
    "{{- raise_exception(position ~ ' has a content part that is neither text nor an assistant\\'s refusal') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.texts | join('\\n') -%}"
    "{%- else -%}"
    "{{- raise_exception(position ~ ' content must be a string or a list of text parts') -}}"
    "{%- endif -%}"
    "{%- if message['role'] in ('system', 'developer') -%}"
    "{%- set ns.system_prompts = ns.system_prompts + [content] -%}"
    "{%- elif message['role'] == 'user' -%}{%- set ns.turns = ns.turns + [['<｜User｜>', content, false]] -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['refusal'] is defined and message['refusal'] is not none -%}"
    "{%- if content -%}{{- raise_exception(position ~ ' has content and a refusal: keep one') -}}{%- endif -%}"
    "{%- set content = message['refusal'] -%}"
    "{%- endif -%}"
    "{%- set ns.reasoning = [] -%}"
    "{%- for field in " + repr(REASONING_FIELDS) + " -%}"
    "{%- if message[field] is defined and message[field] is not none -%}"
    "{%- if message[field] is not string -%}"
    "{{- raise_exception(position ~ ' field \\'' ~ field ~ '\\' must be text or null') -}}"
    "{%- endif -%}"
    "{%- set ns.reasoning = ns.reasoning + [message[field]] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.reasoning | unique(case_sensitive=true) | list | length > 1 -%}"
    "{{- raise_exception(position ~ ' gives two reasonings, which differ: keep the one the assistant wrote') -}}"
    "{%- elif ns.reasoning and '<think>' in content -%}"
    "{{- raise_exception(position ~ ' has its reasoning apart and a <think> block in its content too: keep one') -}}"
    "{%- elif ns.reasoning -%}"
    "{%- set content = "
    + _jinja(THINK_OPEN + "\n")
    + " ~ ns.reasoning[0] ~ "
    + _jinja("\n" + THINK_CLOSE + "\n\n")
    + " ~ content -%}"
    "{%- endif -%}"
    "{%- if loop.index0 < ns.last_user and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{%- set ns.calls = [] -%}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- if call['type'] is defined and call['type'] != 'function' or call['function'] is not mapping"
    " or call['function']['name'] is not string or not call['function']['name']"
    " or call['function']['arguments'] is not defined or call['function']['arguments'] is none -%}"
    '{{- raise_exception(position ~ \' tool_calls[\' ~ loop.index0 ~ \'] must be {"type": "function", '
    '"function": {"name": ..., "arguments": ...}}\') -}}'
    "{%- endif -%}"
    "{%- set arguments = call['function']['arguments'] -%}"
    "{%- if arguments is not string -%}{%- set arguments = arguments | tojson -%}{%- endif -%}"
    "{%- set ns.calls = ns.calls + [" + _jinja(TOOL_CALL_BEGIN + "function" + TOOL_SEP) + " ~ call['function']['name']"
    " ~ " + _jinja("\n```json\n") + " ~ arguments ~ " + _jinja("\n```" + TOOL_CALL_END) + "] -%}"
    "{%- endfor -%}"
    "{%- if ns.calls -%}"
    "{%- set content = content ~ "
    + _jinja(TOOL_CALLS_BEGIN)
    + " ~ ns.calls | join('\\n') ~ "
    + _jinja(TOOL_CALLS_END)
    + " -%}"
    "{%- endif -%}"
    "{%- set trained = message['weight'] is not defined or message['weight'] != 0 -%}"
    "{%- set role = " + _jinja(TOOL_OUTPUTS_END) + " if ns.after_tool else '<｜Assistant｜>' -%}"
    "{%- set ns.turns = ns.turns + [[role, content + eos_token, trained]] -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- set opening = '\\n' if ns.after_tool else " + _jinja(TOOL_OUTPUTS_BEGIN) + " -%}"
    "{%- set output = opening ~ " + _jinja(TOOL_OUTPUT_BEGIN) + " ~ content ~ " + _jinja(TOOL_OUTPUT_END) + " -%}"
    "{%- set ns.turns = ns.turns + [[output, '', false]] -%}"
    "{%- else -%}"
    "{{- raise_exception(position ~ ' has unknown role ' ~ message['role'] ~ ': expected system, developer, user, '"
    " ~ 'assistant or tool') -}}"
    "{%- endif -%}"
    "{%- if message['role'] not in ('system', 'developer') -%}"
    "{%- set ns.after_tool = message['role'] == 'tool' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- for tool in tools or [] -%}"
    "{%- if tool is not mapping or tool['type'] != 'function' or tool['function'] is not mapping"
    " or tool['function']['name'] is not string -%}"
    "{{- raise_exception('tools[' ~ loop.index0 ~ '] must be " + TOOL_SHAPE + "') -}}"
    "{%- endif -%}"
    "{%- set ns.fields = [] -%}"
    "{%- for field in " + repr(FUNCTION_FIELDS) + " -%}"
    "{%- if tool['function'][field] is defined and tool['function'][field] is not none -%}"
    "{%- set ns.fields = ns.fields + [(field, tool['function'][field])] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.tools = ns.tools + [{'type': 'function', 'function': dict(ns.fields)} | tojson] -%}"
    "{%- endfor -%}"
    "{%- if ns.tools -%}"
    "{%- set ns.system_prompts = ns.system_prompts + [" + _jinja(TOOLS_INTRO) + " ~ ns.tools | join('\\n')"
    " ~ " + _jinja(TOOLS_FORMAT) + "] -%}"
    "{%- endif -%}"
    "{{- bos_token + ns.system_prompts | join('\\n\\n') -}}"
    "{%- for role, text, trained in ns.turns -%}"
    "{{- role -}}"
    "{%- if trained -%}{%- generation -%}{{- text -}}{%- endgeneration -%}{%- else -%}{{- text -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.after_tool -%}{{- " + _jinja(TOOL_OUTPUTS_END) + " -}}"
    "{%- elif add_generation_prompt -%}" + GENERATION_PROMPT + "{%- endif -%}"
)


def tokenizer_json_path(path_or_dir: str | os.PathLike) -> Path:
    """The `tokenizer.json` meant by a path that names either the file or the directory holding it."""
    path = Path(path_or_dir)
    return path if path.suffix == ".json" else path / TOKENIZER_FILE


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's `bytes_to_unicode`, inverted): each byte's printable stand-in -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + n): byte for n, byte in enumerate(others)}


BYTE_OF_CHARACTER = _byte_level_alphabet()
CHARACTER_OF_BYTE = {byte: character for character, byte in BYTE_OF_CHARACTER.items()}


def byte_level_bytes(piece: str) -> bytes | None:
    """The bytes a byte-level BPE vocabulary string stands for (part of a UTF-8 character keeps its own bytes), or
    None when `piece` is no such string (an added token's text, a tokenizer that is not byte-level)."""
    if any(character not in BYTE_OF_CHARACTER for character in piece):
        return None
    return bytes(BYTE_OF_CHARACTER[character] for character in piece)


MAX_TOKEN_ID = 2**32 - 1  # the largest id Hugging Face tokenizers reads (a u32)


def _token_ids(ids: Iterable[int] | int, vocab_size: int) -> list[int]:
    """`ids` as ints, numpy and torch integer scalars as the ints they equal (they hash unlike them), and one such
    integer (5, a 0-d tensor) as the one id, as transformers' decode takes it; TypeError naming the first that is
    not an integer and its position (1.5, "3", a float tensor's), as Hugging Face tokenizers' decode refuses it, where
    int() would have decoded 1.5 as id 1, or a batch's row (transformers' decode returns a list for a batch: here it is
    decoded row by row); ValueError naming the first that is negative or past `MAX_TOKEN_ID`, where
    tokenizers raises a bare OverflowError ("number too small to fit in target type")."""
    if not isinstance(ids, Iterable) or getattr(ids, "ndim", None) == 0:  # 5, np.int64(5), a 0-d tensor: one id
        ids = [ids]
    token_ids = []
    for position, token_id in enumerate(ids):
        try:
            token_id = operator.index(token_id)
        except TypeError:
            if isinstance(token_id, Iterable) and not isinstance(token_id, str) and getattr(token_id, "ndim", 1):
                # a batch's row (a float tensor's elements are 0-d tensors, iterable by type alone)
                raise TypeError(
                    f"the ids at position {position} are a sequence, {token_id!r}: decode takes one sequence of ids; "
                    "decode a batch row by row, [tokenizer.decode(row) for row in batch] (transformers' batch_decode)"
                ) from None
            raise TypeError(
                f"token id {token_id!r} at position {position} is not an integer: give the integer ids the tokenizer "
                "gave (a float tensor of ids converted back with .long())"
            ) from None
        if token_id < 0:
            raise ValueError(
                f"token id {token_id} at position {position} is negative: the tokenizer's ids are 0 to "
                f"{vocab_size - 1} (labels of -100, the positions no loss is taken on, are no tokens: leave them out)"
            )
        if token_id > MAX_TOKEN_ID:
            raise ValueError(
                f"token id {token_id} at position {position} is past any vocabulary: the tokenizer's ids are 0 to "
                f"{vocab_size - 1}, and ids past them up to {MAX_TOKEN_ID} (a model's vocabulary padded past the "
                "tokenizer's) decode to nothing"
            )
        token_ids.append(token_id)
    return token_ids


def _misread_added_tokens(backend: BackendTokenizer) -> dict[int, str]:
    """Added tokens a ByteLevel decoder misreads -> their text spelled in the byte-level alphabet, which it reads
    right. The decoder takes a token whose characters are all in the alphabet for byte-level characters (tokenizers
    issue #1392): an added 'café' decodes to b'caf\\xe9', U+FFFD; 'đem' to '\\x11em'."""
    if not isinstance(backend.decoder, decoders.ByteLevel):
        return {}
    return {
        token_id: "".join(CHARACTER_OF_BYTE[byte] for byte in token.content.encode("utf-8"))
        for token_id, token in backend.get_added_tokens_decoder().items()
        if byte_level_bytes(token.content) not in (None, token.content.encode("utf-8"))
    }


def first_token_in(text: str, tokens: Iterable[str]) -> str | None:
    """The one of `tokens` that `text` holds first (where it starts), or None."""
    return min((token for token in tokens if token in text), key=text.index, default=None)


def refuse_forged_turn(text: str, named: str, special_tokens: Iterable[str]) -> None:
    """A ValueError when `text` (a chat's system prompt, a prompt, a message's field, the tools offered: `named`)
    holds one of `special_tokens`, which would forge a turn of the chat it goes into, saying to take it out."""
    forged = first_token_in(text, special_tokens)
    if forged:
        raise ValueError(f"{named} contains the special token {forged!r}, which would forge a turn: take it out")


def document_pieces(text: str, piece_chars: int, capped_pre_tokenizer: PreTokenizer | None = None) -> list[str]:
    """`text` cut into pieces of `piece_chars` characters or a few more, each cut at the first LETTER_END past the
    piece's length that tokenizers' engine finds too (`_first_cut`); the rest whole where there is none. Given
    `capped_pre_tokenizer` (one of `capped_pre_tokenizer`'s, every pre-token at most LONGEST_PRE_TOKEN characters),
    a piece with no LETTER_END in its next piece_chars is cut where that pre-tokenizer ends a pre-token instead
    (`_pre_token_cut`): a run of letters and nothing else, which it cuts every LONGEST_PRE_TOKEN characters."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = _first_cut(text, start + piece_chars, start + 2 * piece_chars)
        if cut is None and capped_pre_tokenizer is not None:
            cut = _pre_token_cut(text, start, piece_chars, capped_pre_tokenizer)
        if cut is None:
            cut = _first_cut(text, start + 2 * piece_chars, len(text))
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _pre_token_cut(text: str, start: int, piece_chars: int, pre_tokenizer: PreTokenizer) -> int | None:
    """The first end of a pre-token of `text`, read by `pre_tokenizer` from `start` (where one begins), past
    `start + piece_chars`, when `text[start:cut]` alone pre-tokenizes as it does in the whole; None where there is none
    or a lone surrogate, which only the encoding may read, is in the way. Each pre-token of a capped pattern is decided
    by at most MATCH_SPAN characters from its start, so a window that many past the cut reads as the whole text, and
    of the piece before the cut only the pre-tokens that start less than MATCH_SPAN before it may read otherwise: they
    alone are read again, from the first one's start, ended at the cut."""
    window = text[start : start + piece_chars + 2 * MATCH_SPAN]
    if LONE_SURROGATE.search(window):
        return None
    pre_tokens = pre_tokenizer.pre_tokenize_str(window)
    for count, (_, (_, end)) in enumerate(pre_tokens, start=1):
        if piece_chars <= end < len(window) - MATCH_SPAN:
            first = count - 1
            while first > 0 and pre_tokens[first - 1][1][0] >= end - MATCH_SPAN:
                first -= 1
            tail_start = pre_tokens[first][1][0]
            tail = [
                (piece, (piece_start + tail_start, piece_end + tail_start))
                for piece, (piece_start, piece_end) in pre_tokenizer.pre_tokenize_str(window[tail_start:end])
            ]
            return start + end if tail == pre_tokens[first:count] else None
    return None


def _first_cut(text: str, position: int, before: int) -> int | None:
    """The end of the first LETTER_END in `text` from `position` on, starting before `before`, that
    TOKENIZERS_LETTER_END finds too (its letter removed, the character after it left); None where there is none."""
    for letter_end in LETTER_END.finditer(text, position, before + 1):
        pair = text[letter_end.start() : letter_end.end() + 1]
        if [piece for piece, _ in TOKENIZERS_LETTER_END.pre_tokenize_str(pair)] == [pair[1:]]:
            return letter_end.end()
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its special tokens and the chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        source: str = "<in memory>",
        chat_template: ChatTemplate | None = None,
        reply_opening: str = "",
        bos_token: str | None = BOS,
        eos_token: str | None = EOS,
    ):
        # A tokenizer.json that transformers saved after a call with truncation=True or padding keeps that setting,
        # which the tokenizers library applies to every encode (transformers turns it off for calls that ask none):
        # each text cut to its max_length (a shard's documents, a prompt), batches padded. Off, as in transformers.
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.source = source
        # The checkpoint's own template, which writes its chats where the DeepSeek-V3 role tokens are missing (V2 chat)
        self.chat_template = chat_template
        # What the generation prompt writes after <｜Assistant｜>, for the reply to continue (DeepSeek-R1's "<think>\n")
        self.reply_opening = reply_opening
        self.has_role_tokens = has_role_tokens(backend)
        # The special tokens the tokenizer's files name (`special_token_names`): Llama-style releases' <s> and </s>
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._special_id(bos_token, "bos_token")
        self.eos_id = self._special_id(eos_token, "eos_token")
        # DeepSeek-V2 releases have no pad token and pad with EOS, as their tokenizer_config does.
        pad_id = backend.token_to_id(PAD)
        self.pad_id = self.eos_id if pad_id is None else pad_id
        # Refused in chat content and skipped by skip_special_tokens: the added tokens flagged special, and seekstack's
        # own (the tool-call tokens too) by name, which releases such as DeepSeek-R1-Distill's list with "special":
        # false.
        flagged = {token.content for token in backend.get_added_tokens_decoder().values() if token.special}
        own = (*SPECIAL_TOKENS, *TOOL_TOKENS)
        self.special_tokens = flagged | {token for token in own if backend.token_to_id(token) is not None}
        self.special_ids = frozenset(backend.token_to_id(token) for token in self.special_tokens)
        self.has_tool_tokens = all(backend.token_to_id(token) is not None for token in TOOL_TOKENS)
        self._misread_added = _misread_added_tokens(backend)

    @classmethod
    def from_file(cls, path_or_dir: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` (ours or a DeepSeek release's), given the file or its directory.

        FileNotFoundError when there is none, ValueError when it is another JSON file or truncated or damaged; both
        name the file.
        """
        given = Path(path_or_dir)
        path = tokenizer_json_path(given)
        if not path.is_file():
            if given.is_file():  # tokenizer.model, vocab.txt: no tokenizer.json, and no folder to look in
                raise FileNotFoundError(
                    f"{given}: a file, not a tokenizer.json or the folder holding one; {_to_get_tokenizer_json(given)}"
                )
            raise FileNotFoundError(f"{path}: no such file; {_to_get_tokenizer_json(path)}")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception
            raise ValueError(f"{path}: {_why_not_a_tokenizer(path, error)}") from None
        # A tokenizer with the DeepSeek-V3 role tokens writes its chats itself, with DeepSeek's BOS and EOS, opening
        # the reply as the release's template does
        if has_role_tokens(backend):
            return cls(backend, source=str(path), reply_opening=_reply_opening(path.parent))
        chat_template = read_chat_template(path.parent / CONFIG_FILE, path.parent / CHAT_TEMPLATE_FILE)
        return cls(backend, source=str(path), chat_template=chat_template, **special_token_names(path.parent))

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json: equal for the same tokenizer however its file was formatted."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def frames_with_bos(self) -> bool:
        """Whether the tokenizer.json's post-processor puts BOS before a text (`encode_prompt`): a DeepSeek release's
        does, seekstack's trained tokenizers do not."""
        return self._encode("", add_special_tokens=True)[:1] == [self.bos_id]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their single ids. ValueError for text holding a lone
        surrogate: how Python keeps bytes that were not UTF-8 (in arguments, pipes), which no tokenizer can take."""
        ids = self._encode(text, add_special_tokens=False)
        return [self.bos_id, *ids] if add_bos else ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt to continue, framed as the tokenizer.json's post-processor frames a text, as
        transformers' `tokenizer(text)` and vLLM's completions encode it: a DeepSeek release's puts BOS first (without
        it the model reads a start it was never trained on); seekstack's trained tokenizers add nothing."""
        return self._encode(text, add_special_tokens=True)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError as error:
            raise lone_surrogate_error([text], "the text") or _not_text_error([text], "the text") or error from None

    def encode_batch(
        self, texts: list[str], add_bos: bool = False, piece_chars: int = DOCUMENT_PIECE_CHARS
    ) -> list[list[int]]:
        """Token ids of many documents (corpus text) at once, in parallel threads, as `encoded_pieces` encodes them:
        a special-token string in them as the plain text it is."""
        documents_ids: list[list[int]] = [[] for _ in texts]
        for document, ids in self.encoded_pieces(texts, add_bos=add_bos, piece_chars=piece_chars):
            documents_ids[document].extend(ids)
        return documents_ids

    def encoded_pieces(
        self, texts: list[str], add_bos: bool = False, add_eos: bool = False, piece_chars: int = DOCUMENT_PIECE_CHARS
    ) -> Iterator[tuple[int, list[int]]]:
        """The token ids of each piece of many documents (corpus text) with its document's position in `texts`, in
        order, the first piece of each led by BOS when `add_bos` and the last ended by EOS when `add_eos`. Unlike
        `encode`, a special-token string in them is encoded as the plain text it is: a document quoting
        `<｜end▁of▁sentence｜>` or `<｜User｜>` gets no false document boundary or chat turn in the training data. A
        document longer than `piece_chars` is encoded in pieces cut where its ids stay the same (`cuts_keep_ids`),
        groups of pieces in parallel threads, so memory holds a group's encodings and the ids of a piece, not a whole
        book's (a 50 MB document's ids as Python ints were 1.4 GB). ValueError naming the document (its position in
        `texts`) that holds a lone surrogate, as `encode`."""
        if isinstance(texts, str):
            raise TypeError(
                f"encode_batch takes a list of texts, not one text ({texts[:40]!r}): encode_batch([text]), or "
                "encode(text)"
            )
        which = f"document {{}} of the {len(texts)} given"
        error = _not_text_error(texts, which)
        if error is not None:
            raise error
        backend = self._corpus_backend
        if not backend.encode_special_tokens:  # set here, as a pickled backend (a worker process's) comes without it
            backend.encode_special_tokens = True
        bos, eos = [self.bos_id] if add_bos else [], [self.eos_id] if add_eos else []
        for group in self._piece_groups(texts, piece_chars):
            try:
                # in a thread, as Ctrl-C waits for native code: a batch of 256 book-length documents takes minutes
                pieces = [piece for _, piece, _, _ in group]
                encodings = interruptible(
                    functools.partial(backend.encode_batch_fast, pieces, add_special_tokens=False)
                )
            except TypeError as error:
                raise lone_surrogate_error(texts, which) or error from None
            for (document, _, first, last), encoding in zip(group, encodings, strict=True):
                yield document, (bos if first else []) + encoding.ids + (eos if last else [])

    def _piece_groups(self, texts: list[str], piece_chars: int) -> Iterator[list[tuple[int, str, bool, bool]]]:
        """The pieces of `texts` (`document_pieces`, when `cuts_keep_ids`), each with its document's position and
        whether it is the document's first and last, in groups of about ENCODE_GROUP_CHARS characters: what one call
        of the backend's threads holds at once."""
        group: list[tuple[int, str, bool, bool]] = []
        group_chars = 0
        for document, text in enumerate(texts):
            pieces = document_pieces(text, piece_chars, self.capped_pre_tokenizer) if self.cuts_keep_ids else [text]
            for number, piece in enumerate(pieces):
                group.append((document, piece, number == 0, number == len(pieces) - 1))
                group_chars += len(piece)
                if group_chars >= ENCODE_GROUP_CHARS:
                    yield group
                    group, group_chars = [], 0
        if group:
            yield group

    @functools.cached_property
    def cuts_keep_ids(self) -> bool:
        """Whether a text cut where `document_pieces` cuts encodes, piece by piece, to the ids of the whole: no
        normalizer (which may write a prefix at each piece's start, as Llama's "▁"), no added token the corpus encoding
        splits on that holds or strips whitespace (it could span the cut), and a pre-tokenizer that splits each of
        CUT_PROBES whole as in its two halves (a byte-level regex split does: ours, GPT-2's, DeepSeek-V3's)."""
        backend = self._corpus_backend
        if json.loads(backend.to_str()).get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}):
            return False
        for token in backend.get_added_tokens_decoder().values():
            if not token.special and (token.lstrip or token.rstrip or any(c.isspace() for c in token.content)):
                return False
        pre_tokenizer = backend.pre_tokenizer
        if pre_tokenizer is None:
            return False
        for left, right in CUT_PROBES:
            whole = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(left + right)]
            halves = [
                piece for piece, _ in pre_tokenizer.pre_tokenize_str(left) + pre_tokenizer.pre_tokenize_str(right)
            ]
            if whole != halves:
                return False
        return True

    @functools.cached_property
    def capped_pre_tokenizer(self) -> PreTokenizer | None:
        """The pre-tokenizer, where it is one `train_tokenizer` writes (`byte_level_split` of a `pre_tokenizer_pattern`,
        every pre-token at most LONGEST_PRE_TOKEN characters); None for any other: one trained before the cap keeps a
        run of letters whole, which a cut inside it would split."""
        pre_tokenizer = self._corpus_backend.pre_tokenizer
        if pre_tokenizer is None:
            return None
        layout = json.loads(pre_tokenizer.__getstate__())
        first_step = next(iter(layout.get("pretokenizers", ())), {})
        pattern = first_step.get("pattern", {}).get("Regex")
        if pattern not in _capped_patterns():
            return None
        return pre_tokenizer if layout == json.loads(byte_level_split(pattern).__getstate__()) else None

    @functools.cached_property
    def _corpus_backend(self) -> BackendTokenizer:
        """A copy of the backend that encodes every one of `special_tokens` as plain text (`encode_special_tokens`),
        those the file lists as plain added tokens (DeepSeek-R1-Distill's role tokens) flagged special here, as that
        splits only flagged ones. The same ids for any other text; `fingerprint` stays the file's. A copy, so that the
        backend `encode` reads is never switched: switching it back after a batch waited for a batch still encoding
        (after Ctrl-C), and an `encode` meanwhile read special tokens as text."""
        unflagged = [
            token.content
            for token in self.backend.get_added_tokens_decoder().values()
            if token.content in self.special_tokens and not token.special
        ]
        copy = BackendTokenizer.from_str(self.backend.to_str())
        copy.add_special_tokens([AddedToken(token, special=True) for token in unflagged])
        return copy

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (or of one id, as transformers' decode takes it), special tokens kept as their strings (left
        out with `skip_special_tokens`, as transformers' and vLLM's tokenizers take it) and added tokens as their own
        text; ids the tokenizer does not have (a model's vocabulary padded past it) give none; TypeError for an id that
        is not an integer, ValueError for a negative one (`_token_ids`)."""
        ids = _token_ids(ids, self.vocab_size)
        if skip_special_tokens:
            ids = [token_id for token_id in ids if token_id not in self.special_ids]
        if self._misread_added.keys().isdisjoint(ids):
            return self.backend.decode(ids, skip_special_tokens=False)
        pieces = [self.decoder_piece(token_id) for token_id in ids]
        return self.backend.decoder.decode([piece for piece in pieces if piece is not None])

    def decode_reply(self, ids: Iterable[int]) -> str:
        """Text of a reply generated after a chat's generation prompt, its EOS left out: opening with the
        `reply_opening` that prompt wrote (DeepSeek-R1's "<think>\\n"), as the reply it continues."""
        return self.reply_opening + self.decode(token_id for token_id in ids if token_id != self.eos_id)

    def decoder_piece(self, token_id: int) -> str | None:
        """The string the decoder reads for `token_id` (for `byte_level_bytes`): its vocabulary piece, or an added
        token's text, spelled in the byte-level alphabet where the decoder would misread it; None for an id the
        tokenizer does not have."""
        return self._misread_added.get(token_id) or self.backend.id_to_token(token_id)

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
    ) -> str:
        """The DeepSeek-V3 chat string for `messages`, OpenAI chat messages read as the server reads them
        (`template_message`), the assistant turns before the last user message without their reasoning
        (`drop_past_reasoning`), the `tools` offered (OpenAI's definitions) listed after the system prompts
        (`tools_prompt`). With `continue_final_message` (transformers' name; the DeepSeek API's `prefix`) the
        last message, an assistant's, is left open for the model to continue: no EOS closes it and no generation
        prompt follows; ValueError when it is not an assistant's, and, as transformers raises, for no messages and
        when `add_generation_prompt` is given true beside it (None, the default: a generation prompt unless the last
        message is continued). A chat ending with tool results ends with
        <｜tool▁outputs▁end｜>, where the reply follows (DeepSeek's templates write no generation prompt there).
        A tokenizer without the DeepSeek-V3 role tokens writes the chat in its checkpoint's own template
        (`chat_template`: DeepSeek-V2-Chat's "User: ... Assistant:"), as transformers' `apply_chat_template` does, the
        messages passed as it passes them (`_templated`: reasoning apart, no turn cut); ValueError when it has none,
        and for tools or tool turns given to a tokenizer without DeepSeek-V3's tool-call tokens. The generation prompt
        ends with the `reply_opening` the release's template writes there (DeepSeek-R1's "<think>\\n")."""
        if not self.has_role_tokens and self.chat_template is None:
            raise ValueError(
                f"tokenizer {self.source} has neither the DeepSeek-V3 chat format's role tokens {USER!r} and "
                f"{ASSISTANT!r} nor a chat_template in the {CONFIG_FILE} beside it to write a chat with"
            )
        if add_generation_prompt and continue_final_message:
            raise ValueError(
                "add_generation_prompt=True and continue_final_message=True ask for two things: a new assistant turn "
                "after the messages, and the last one continued; give add_generation_prompt=False to continue the last "
                "message, as transformers' apply_chat_template refuses both"
            )
        add_generation_prompt = not continue_final_message if add_generation_prompt is None else add_generation_prompt
        messages = self._chat_messages(messages, continue_final_message, tools)
        if not self.has_role_tokens:
            return self._own_template(messages, add_generation_prompt, continue_final_message)
        pieces = self._chat_pieces(messages, tools)
        chat = "".join(text for text, _ in pieces)
        if continue_final_message:
            return chat.removesuffix(EOS)
        if pieces[-1][0] == TOOL_OUTPUTS_END:  # it closed a last tool result: the reply follows
            return chat
        return chat + (ASSISTANT + self.reply_opening if add_generation_prompt else "")

    def chat_pieces(self, messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        """A whole conversation's chat string (`render_chat` without a generation prompt) in pieces, each with whether
        SFT trains it: an assistant turn's content, tool calls and EOS (not its role token, nor a turn of `"weight":
        0`), the text CHAT_TEMPLATE's `{% generation %}` blocks mark. Pieces meet at a special token (a role token, an
        EOS, a tool-call token), which the tokenizer never merges across, so they encode alone as they do together; a
        checkpoint's own template is rendered turn by turn. ValueError as `render_chat`'s."""
        messages = self._chat_messages(messages, False, tools)
        return self._chat_pieces(messages, tools) if self.has_role_tokens else self._template_pieces(messages)

    def _template_pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """`chat_pieces` of messages `_chat_messages` templated and checked (no tools, which it refuses here) in the
        checkpoint's own template (DeepSeek-V2-Chat's): the system messages it opens with, then each other turn (a
        later system message too, which such a template writes where it is) rendered alone, an assistant's trained
        after its generation prompt ("Assistant:"). ValueError naming the template's file where the turns alone do not
        make the chat."""
        bos = self._own_template([], add_generation_prompt=False)
        role = self._own_template([], add_generation_prompt=True).removeprefix(bos).removesuffix(self.reply_opening)
        opening = next((p for p, message in enumerate(messages) if message["role"] != "system"), len(messages))
        pieces = [(self._own_template(messages[:opening], add_generation_prompt=False), False)]
        for message in messages[opening:]:
            turn = self._own_template([message], add_generation_prompt=False).removeprefix(bos)
            pieces += [(role, False), (turn.removeprefix(role), True)] if is_trained(message) else [(turn, False)]
        if "".join(text for text, _ in pieces) != self._own_template(messages, add_generation_prompt=False):
            raise ValueError(
                f"the chat template of {self.chat_template.source} writes a conversation's turns otherwise alone "
                "than together, so its assistant's tokens cannot be told apart for training"
            )
        return pieces

    def _chat_messages(
        self, messages: list[dict], continue_final_message: bool, tools: list[dict] | None
    ) -> list[dict]:
        """`messages` templated as `render_chat` writes them, and its ValueErrors but the first."""
        messages = self._templated(messages)
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise ValueError(
                "a chat continued from its last message must end with an assistant message; its last message is a "
                f"{messages[-1]['role']} message"
            )
        if continue_final_message and messages[-1].get("tool_calls"):
            raise ValueError(
                f"chat message {len(messages) - 1} has tool_calls, which close its turn: a chat continued from it has "
                "nothing to continue; give the calls' results in tool messages (the reply then answers them), or "
                "leave the calls out to continue its content"
            )
        if tools is not None and (isinstance(tools, str) or not all(isinstance(tool, dict) for tool in tools)):
            raise ValueError(  # a string's characters were each listed as a tool
                f"tools must be a list of OpenAI tool definitions (dicts), got {type(tools).__name__} {tools!r:.80}"
                + (": parse the JSON text first (json.loads)" if isinstance(tools, str) else "")
            )
        for index, tool in enumerate(tools or []):
            function = tool.get("function")
            if (
                tool.get("type") != "function"
                or not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
            ):
                raise ValueError(f"tools[{index}] must be {TOOL_SHAPE}, OpenAI's tool definition, got {tool!r:.80}")
        self.check_tool_use(messages, tools)
        if tools:
            self.refuse_forged_turn(json.dumps([listed_tool(t) for t in tools], ensure_ascii=False), "tools")
        return messages

    def check_tool_use(self, messages: list[dict], tools: list[dict] | None) -> None:
        """ValueError when templated `messages` hold tool calls or results, or `tools` are offered, and this tokenizer
        has no DeepSeek-V3 tool-call tokens to write them with (a checkpoint's own template, DeepSeek-V2-Chat's, writes
        no tools: it dropped them)."""
        uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if uses_tools and not (self.has_role_tokens and self.has_tool_tokens):
            raise ValueError(
                f"tokenizer {self.source} has no DeepSeek-V3 tool-call tokens ({TOOL_CALLS_BEGIN!r} ...), so a chat "
                "cannot offer tools or hold tool calls and results: train the tokenizer again with this seekstack "
                "(its tokenizers have them), or leave the tools out"
            )

    def _own_template(
        self, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool = False
    ) -> str:
        """Templated `messages` written in the checkpoint's own chat template, with this tokenizer's BOS and EOS."""
        special_tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        return self.chat_template.render(messages, add_generation_prompt, continue_final_message, special_tokens)

    def _templated(self, messages: list[dict]) -> list[dict]:
        """`messages` as the chat format takes them (`template_message`): in DeepSeek-V3's, the assistant turns before
        the last user message without their reasoning (`drop_past_reasoning`); a checkpoint's own template gets them
        as transformers' `apply_chat_template` passes them, and writes what it writes of each. ValueError for no
        messages, as transformers refuses them (the chat string was a BOS and a generation prompt)."""
        if not messages:
            raise ValueError("a chat has no messages: give at least one, as transformers' apply_chat_template asks")
        templated = [self.template_message(position, message) for position, message in enumerate(messages)]
        return drop_past_reasoning(templated) if self.has_role_tokens else templated

    def _chat_pieces(self, messages: list[dict], tools: list[dict] | None) -> list[tuple[str, bool]]:
        """`chat_pieces` of messages `_chat_messages` templated and checked."""
        system = [m["content"] for m in messages if m["role"] == "system"]
        if tools:
            system.append(tools_prompt(tools))
        pieces, after_tool = [(BOS + "\n\n".join(system), False)], False
        for message in messages:
            role = message["role"]
            if role == "user":
                pieces.append((USER + message["content"], False))
            elif role == "assistant":
                calls = [
                    tool_call_text(c["function"]["name"], c["function"]["arguments"])
                    for c in message.get("tool_calls") or []
                ]
                called = TOOL_CALLS_BEGIN + "\n".join(calls) + TOOL_CALLS_END if calls else ""
                pieces.append((TOOL_OUTPUTS_END if after_tool else ASSISTANT, False))
                pieces.append((message["content"] + called + EOS, is_trained(message)))
            elif role == "tool":
                opening = "\n" if after_tool else TOOL_OUTPUTS_BEGIN
                pieces.append((opening + TOOL_OUTPUT_BEGIN + message["content"] + TOOL_OUTPUT_END, False))
            if role != "system":
                after_tool = role == "tool"
        if after_tool:
            pieces.append((TOOL_OUTPUTS_END, False))
        return pieces

    @property
    def jinja_chat_template(self) -> str:
        """The Jinja form of the chat format `render_chat` writes: the checkpoint's own template where it writes that
        (no DeepSeek-V3 role tokens), else CHAT_TEMPLATE, its generation prompt followed by the `reply_opening`."""
        if not self.has_role_tokens and self.chat_template:
            return self.chat_template.text
        if not self.reply_opening:
            return CHAT_TEMPLATE
        opening = "{{- " + json.dumps(self.reply_opening) + " -}}"  # a JSON string is a Jinja string literal
        return CHAT_TEMPLATE.replace(GENERATION_PROMPT, GENERATION_PROMPT + opening)

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Token ids of `render_chat(messages, ...)`, starting with BOS."""
        return self.encode(self.render_chat(messages, add_generation_prompt, continue_final_message, tools))

    def apply_chat_template(
        self,
        conversation: list[dict],
        tools: list[dict] | None = None,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
    ) -> str | list[int]:
        """transformers' name and defaults for `encode_chat` (the ids, as a list: transformers' `return_dict=False`;
        its v5 default wraps them in a dict) or, with `tokenize=False`, `render_chat`; as transformers, no generation
        prompt unless `add_generation_prompt`. The options after `tools` are keyword-only (transformers' third and
        fourth are `documents` and `chat_template`, so a call passing more by position is a TypeError, not another
        option); its other options (padding, return_tensors, a chat_template of one's own, template variables) are not
        taken: a TypeError names them."""
        if tokenize:
            return self.encode_chat(conversation, add_generation_prompt, continue_final_message, tools)
        return self.render_chat(conversation, add_generation_prompt, continue_final_message, tools)

    def template_message(self, position: int, message: object) -> dict:
        """`template_message(position, message)` (`read_message` for a checkpoint's own template, which gets an
        assistant's reasoning apart, as transformers passes it), and a ValueError naming `position` when its content or
        a tool call (or its reasoning kept apart) holds one of this tokenizer's special tokens."""
        templated = template_message(position, message) if self.has_role_tokens else read_message(position, message)
        calls = templated.get("tool_calls") or []
        reasoning = {field: templated[field] for field in REASONING_FIELDS if isinstance(templated.get(field), str)}
        texts = {"content": templated["content"], **reasoning} | {
            f"tool_calls[{index}]": call["function"]["name"] + call["function"]["arguments"]
            for index, call in enumerate(calls)
        }
        for field, text in texts.items():
            self.refuse_forged_turn(text, f"chat message {position} {field}")
        return templated

    def refuse_forged_turn(self, text: str, named: str) -> None:
        """`refuse_forged_turn` of this tokenizer's special tokens."""
        refuse_forged_turn(text, named, self.special_tokens)

    def _special_id(self, token: str | None, name: str) -> int:
        """The id of special token `token`, the tokenizer's `name` (bos_token, eos_token); ValueError naming both when
        the tokenizer has no such token, or its files name none (null)."""
        if token is None:
            like = ", as Qwen's tokenizers have no BOS token" if name == "bos_token" else ""
            raise ValueError(
                f"tokenizer {self.source}: its {CONFIG_FILE} gives {name} null (it has none{like}), and seekstack "
                f"requires one; name one of its special tokens as the {name} there"
            )
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"tokenizer {self.source} has no special token {token!r} (its {name}, which seekstack requires); "
                f"name the token it has in the {name} of the {CONFIG_FILE} beside it"
            )
        return token_id


def special_token_names(folder: Path) -> dict[str, str | None]:
    """The `bos_token` and `eos_token` a tokenizer in `folder` names, as transformers reads them: its
    tokenizer_config.json's, over which special_tokens_map.json's go where the config lists no
    added_tokens_decoder (older transformers' files); a token given as an AddedToken object by its content, None
    for one given as null (Qwen's tokenizers name no BOS). DeepSeek's BOS and EOS for a name given nowhere (an
    AddedToken object without a content names none).
    ValueError naming a file that is not a JSON object."""
    config = read_tokenizer_config(folder / CONFIG_FILE)
    if "added_tokens_decoder" not in config:
        config = {**config, **read_tokenizer_config(folder / SPECIAL_TOKENS_MAP_FILE)}
    names = {}
    for name, default in (("bos_token", BOS), ("eos_token", EOS)):
        token = config.get(name, default)
        # an AddedToken object by its content; one without content names no token (not null: it has none)
        token = token.get("content", default) if isinstance(token, dict) else token
        names[name] = token if isinstance(token, str) or token is None else default
    return names


def _reply_opening(folder: Path) -> str:
    """The reply's opening (`ChatTemplate.reply_opening`) of the chat template in `folder` beside a tokenizer with the
    DeepSeek-V3 role tokens: DeepSeek-R1's "<think>\\n"; "" for none, seekstack's own template, or a damaged
    tokenizer_config.json, which such a tokenizer does not need (it writes its chats itself). seekstack's own template
    is not rendered: that imports transformers (`ChatTemplate.render`), ~2 s and 18 MiB at every load."""
    try:
        template = read_chat_template(folder / CONFIG_FILE, folder / CHAT_TEMPLATE_FILE)
    except ValueError:
        return ""
    if template is None or template.text == CHAT_TEMPLATE:
        return ""
    return template.reply_opening({"bos_token": BOS, "eos_token": EOS}, ASSISTANT)


def trained_by_seekstack(tokenizer_file: Path) -> bool:
    """Whether `tokenizer_file` is a tokenizer `train_tokenizer` wrote: its ids 0..4 are SPECIAL_TOKENS (a DeepSeek
    release's are BOS, EOS, pad and two bytes). False when it is missing or no tokenizer.json."""
    try:
        added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens", [])
        ids = {token["content"]: token["id"] for token in added}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return False
    return all(ids.get(token) == token_id for token_id, token in enumerate(SPECIAL_TOKENS))


def has_role_tokens(backend: BackendTokenizer) -> bool:
    """Whether a tokenizer has the DeepSeek-V3 chat format's role tokens (`USER`, `ASSISTANT`), so seekstack writes its
    chats itself."""
    return all(backend.token_to_id(token) is not None for token in (USER, ASSISTANT))


def lone_surrogate_error(texts: list[str], which: str) -> ValueError | None:
    """A ValueError for the first of `texts` holding a lone surrogate (`which` names it; {} is its position from 1),
    or None when none does: how Python keeps bytes that were not UTF-8 (in arguments, pipes), which no tokenizer can
    take."""
    for position, text in enumerate(texts, start=1):
        surrogate = LONE_SURROGATE.search(text) if isinstance(text, str) else None  # else the library's TypeError
        if surrogate is None:
            continue
        code = ord(surrogate.group())
        if 0xDC80 <= code <= 0xDCFF:  # Python's surrogateescape keeps a byte b that is not UTF-8 as U+DC00 + b
            return ValueError(
                f"{which.format(position)} is not valid UTF-8: it holds the byte 0x{code - 0xDC00:02x} "
                f"({surrogate.group()!r} to Python): convert the text to UTF-8 (iconv -f LATIN1 -t UTF-8 for Western "
                "European text, -f GBK for Chinese)"
            )
        return ValueError(
            f"{which.format(position)} is not valid UTF-8: it holds {surrogate.group()!r}, half a character UTF-8 "
            "cannot hold"
        )
    return None


def _not_text_error(texts: list, which: str) -> TypeError | None:
    """A TypeError for the first of `texts` that is no str (`which` names it; {} is its position from 1), or None when
    each is one: tokenizers' own says "TextInputSequence must be str", naming neither the value nor what to give."""
    for position, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            hint = ""
            if isinstance(text, bytes):
                hint = ": decode it first, text.decode('utf-8')"
            elif isinstance(text, list | tuple):
                hint = ": encode_batch(texts) encodes a list of texts"
            return TypeError(f"{which.format(position)} is {text!r:.60} ({type(text).__name__}), not str{hint}")
    return None


def _to_get_tokenizer_json(path: Path) -> str:
    """How to come by the tokenizer.json missing beside `path`: a slow tokenizer's files in its folder, which
    transformers converts (a release that ships them alone), or a tokenizer trained or copied there; for a file given
    in its place (`path` itself, a stray file: its folder is no tokenizer's), one given instead."""
    folder = path.parent
    slow = [name for name in SLOW_TOKENIZER_FILES if (folder / name).is_file()]
    if slow:
        return (
            f"{folder} holds a slow tokenizer's {', '.join(slow)}, which seekstack does not read; write its "
            'tokenizer.json beside them with transformers: python -c "from transformers import AutoTokenizer as T; '
            f"T.from_pretrained('{folder}').save_pretrained('{folder}')\""
        )
    if path.is_file():
        return "give a tokenizer.json or the folder holding one (`seekstack tokenizer train --out FOLDER` writes one)"
    return f"train a tokenizer into {folder}, or copy the tokenizer.json of the model's release there"


def _why_not_a_tokenizer(path: Path, error: Exception) -> str:
    """Why the tokenizers library refused `path` (its `error`): another JSON file given for the tokenizer.json (the
    tokenizer_config.json beside it, a model's config.json), a byte-order mark before the JSON, a Git LFS pointer in
    its place, or a tokenizer.json truncated or damaged."""
    from seekstack.checkpoint.reader import LFS_POINTER, LFS_POINTER_FOUND  # here alone: that module imports torch

    raw = path.read_bytes()
    if raw.startswith(LFS_POINTER):  # a hub repository cloned without Git LFS, as its weights are
        return LFS_POINTER_FOUND.format(size=len(raw), what="tokenizer", them="it")
    if raw.startswith(codecs.BOM_UTF8):
        return (
            "starts with a UTF-8 byte-order mark, which neither seekstack nor transformers reads in JSON (an editor "
            "such as Windows Notepad adds one); save the file as UTF-8 without it"
        )
    try:
        content = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        content = None
    if isinstance(content, dict) and "model" not in content:
        fields = ", ".join(repr(key) for key in list(content)[:4]) + (", ..." if len(content) > 4 else "")
        return (
            f"a JSON file but not a Hugging Face tokenizer.json: it has no 'model' field (its fields: "
            f"{fields or 'none'}); give the tokenizer's {TOKENIZER_FILE}, or the folder holding it"
        )
    if isinstance(content, dict):  # whole, so not cut short: a part this tokenizers library does not know
        return (
            f"a whole tokenizer.json that tokenizers {tokenizers_version} cannot read ({error}): it holds a type or "
            "field this version does not know (written by a newer tokenizers) or a value edited by hand; fix the "
            f"part the error points at, or save the tokenizer again with tokenizers {tokenizers_version}"
        )
    return f"not a valid Hugging Face tokenizer.json ({error}); it is truncated or damaged: train or copy it again"


def template_message(position: int, message: object) -> dict:
    """An OpenAI chat message as the DeepSeek-V3 chat template takes it (`read_message`), an assistant's reasoning given
    apart in its content (`with_reasoning`). ValueError naming `position` as theirs."""
    templated = read_message(position, message)
    return with_reasoning(position, templated) if templated["role"] == "assistant" else templated


def read_message(position: int, message: object) -> dict:
    """An OpenAI chat message as a chat template takes it, read as the server and transformers' `apply_chat_template`
    with `CHAT_TEMPLATE` read it: role `developer` (OpenAI's newer name for system) as `system`, content given as a
    list of text parts as their texts joined by newlines (as vLLM's server joins them; an assistant's refusal parts
    as their text, `part_text`), an assistant's null or left-out content (a replayed turn, or one that only calls
    tools) as empty, or as its `refusal` where it gives one (`refusal_text`), an assistant's `tool_calls` as
    `template_tool_call` gives each; its other keys kept (reasoning given apart too). ValueError naming `position`
    for a message that is no dict with `role` and `content`, another role or content, tool calls on another role, and
    the legacy `function_call`."""
    # an assistant's content may be left out, as OpenAI's messages that call tools or refuse leave it
    if (
        not isinstance(message, dict)
        or "role" not in message
        or ("content" not in message and message["role"] != "assistant")
    ):
        raise ValueError(
            f"chat message {position} must be a dict with 'role' and 'content' (an assistant's content may be left "
            f"out, as null), got {message!r}"
        )
    role, content = message["role"], message.get("content")
    if message.get("function_call"):
        raise ValueError(
            f"chat message {position} has function_call, OpenAI's deprecated form of a tool call: give it as "
            'tool_calls [{"type": "function", "function": {"name": ..., "arguments": ...}}]'
        )
    if role not in MESSAGE_ROLES:
        raise ValueError(f"chat message {position} has unknown role {role!r}; expected one of {MESSAGE_ROLES}")
    if content is None and role == "assistant":
        content = ""
    elif isinstance(content, list):
        content = "\n".join(part_text(position, index, part, role) for index, part in enumerate(content))
    elif not isinstance(content, str):
        raise ValueError(
            f"chat message {position} content must be a string or a list of text parts (null only in an assistant "
            f"message), got {type(content).__name__}"
        )
    if role == "assistant" and message.get("refusal") is not None:  # read into the content, which then holds it
        content = refusal_text(position, message["refusal"], content)
        message = {key: value for key, value in message.items() if key != "refusal"}
    templated = {**message, "role": "system" if role == "developer" else role, "content": content}
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise ValueError(
                f"chat message {position} has tool_calls {str(calls)[:80]!r}: only an assistant message calls tools, "
                "giving a list of calls"
            )
        templated["tool_calls"] = [template_tool_call(position, index, call) for index, call in enumerate(calls)]
    return templated


def with_reasoning(position: int, message: dict) -> dict:
    """An assistant message whose reasoning is apart in one of REASONING_FIELDS (`reasoning_content` as DeepSeek's API
    and `seekstack serve --reasoning-parser deepseek_r1` answer, `reasoning` as vLLM answers, `thinking` as
    transformers' templates read it) with it written back into its content in the R1 format the parser splits,
    `<think>\\n{reasoning}\\n</think>\\n\\n{content}`, as the model writes it (so SFT trains it; a turn before the last
    user message then loses it, `drop_past_reasoning`, as a reply given back with its think block). ValueError naming
    `position` when it is no text, two of the fields differ, or the content holds a think block of its own too. The
    message as it is when it gives none."""
    given = {field: message[field] for field in REASONING_FIELDS if message.get(field) is not None}
    if not given:
        return message
    (field, reasoning), *others = given.items()
    if not isinstance(reasoning, str):
        raise ValueError(
            f"chat message {position} field {field!r} must be text or null, got {type(reasoning).__name__}"
        )
    if any(other != reasoning for _, other in others):
        raise ValueError(
            f"chat message {position} gives two reasonings, in {' and '.join(given)}, which differ: keep the one the "
            "assistant wrote"
        )
    if THINK_OPEN in message["content"]:
        raise ValueError(f"chat message {position} has {field} and a {THINK_OPEN} block in its content too: keep one")
    content = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{message['content']}"
    return {**{k: v for k, v in message.items() if k not in REASONING_FIELDS}, "content": content}


def refusal_text(position: int, refusal: object, content: str) -> str:
    """The text of an assistant message whose reply is a `refusal` (OpenAI's message field, beside a null content):
    the refusal, which is what the model said. ValueError naming the message when it is no text, or the message has
    content too (OpenAI's reply holds one or the other)."""
    if not isinstance(refusal, str):
        raise ValueError(f"chat message {position} refusal must be text or null, got {type(refusal).__name__}")
    if content:
        raise ValueError(
            f"chat message {position} has content and a refusal: an OpenAI reply holds one or the other (its content "
            "null beside a refusal); keep the one the assistant said"
        )
    return refusal


def template_tool_call(position: int, index: int, call: object) -> dict:
    """An assistant's tool call as the chat template writes it: OpenAI's `{"type": "function", "function": {"name":
    ..., "arguments": ...}}`, the arguments a JSON object's text (given as an object, as transformers' templates take
    them, written as JSON); ValueError naming the message and the call otherwise."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name or arguments is None or call.get("type", "function") != "function":
        raise ValueError(
            f'chat message {position} tool_calls[{index}] must be {{"type": "function", "function": {{"name": ..., '
            f'"arguments": ...}}}}, got {str(call)[:120]!r}'
        )
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {**call, "type": "function", "function": {**function, "arguments": arguments}}


def is_trained(message: dict) -> bool:
    """Whether a templated message's tokens are labelled: an assistant message not of weight 0."""
    return message["role"] == "assistant" and message.get("weight") != 0


def drop_past_reasoning(messages: list[dict]) -> list[dict]:
    """Templated `messages` with each assistant turn before the last user message cut to what follows its last
    `</think>` (the whitespace after it dropped): an R1 reply's answer, the content `--reasoning-parser deepseek_r1`
    returns. DeepSeek-R1's chat template drops that reasoning from every earlier turn, and the DeepSeek API does not
    put it back in the context; the turns after the last user message keep theirs, as Qwen3's template and
    DeepSeek-V3.2's `drop_thinking` keep them: the reply SFT trains on, a `prefix` the model continues."""
    last_user = max((position for position, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return [
        {**m, "content": m["content"].split(THINK_CLOSE)[-1].lstrip()}
        if m["role"] == "assistant" and position < last_user and THINK_CLOSE in m["content"]
        else m
        for position, m in enumerate(messages)
    ]


def part_text(position: int, index: int, part: object, role: str) -> str:
    """The text of a content part of a `role` message: a text part's `{"type": "text", "text": ...}`, or an assistant's
    refusal part's `{"type": "refusal", "refusal": ...}` (OpenAI's, read as its text as vLLM and the server read it);
    ValueError naming the message and part otherwise."""
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    if isinstance(part, dict) and kind in ("text", "refusal") and not isinstance(part.get(kind), str):
        given = f"got {type(part[kind]).__name__}" if kind in part else "left out"
        raise ValueError(f"chat message {position} content part {index} field {kind!r} must be text, {given}")
    if isinstance(part, dict) and kind in ("text", "refusal"):
        if kind == "refusal" and role != "assistant":
            raise ValueError(
                f"chat message {position} content part {index} is a refusal, which only an assistant message's "
                f"content holds (as OpenAI takes it): give the {role} message's text as a text part"
            )
        return part[kind]
    raise ValueError(
        f'chat message {position} content part {index} is {kind!r}: only text parts {{"type": "text", "text": ...}} '
        'are supported (and an assistant\'s refusal parts {"type": "refusal", "refusal": ...})'
    )


def copy_tokenizer_config(source: str | os.PathLike, folder: str | os.PathLike, model_max_length: int) -> None:
    """Copy the tokenizer_config.json `source` into the model folder `folder` with `model_max_length` the model's
    context: the length transformers' `truncation=True` cuts at, and the chat template that transformers (5) saves
    beside it in chat_template.jinja, which transformers reads before the config's own. Beside a tokenizer seekstack
    trained, a template is CHAT_TEMPLATE, the chats `render_chat` writes, whatever version of it the tokenizer was
    trained with (none stays none: a base model's mark), and batches pad on the `PADDING_SIDE` unless it names one.
    ValueError naming `source` when it is no JSON object."""
    try:
        config = json.loads(Path(source).read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(
            f"{source}: not valid JSON ({error}); write or copy the tokenizer's {CONFIG_FILE} again"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    config["model_max_length"] = model_max_length
    template_file = Path(source).parent / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
    if trained_by_seekstack(Path(source).parent / TOKENIZER_FILE):  # maybe by an earlier version
        config.setdefault("padding_side", PADDING_SIDE)
        if "chat_template" in config:
            config["chat_template"] = CHAT_TEMPLATE
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def check_vocab_size(vocab_size: int) -> None:
    """ConfigError naming the field `vocab_size` unless a BPE of that many tokens can be trained here."""
    vocab_size = _whole_number(vocab_size, "vocab_size")
    if vocab_size < SMALLEST_VOCAB:
        raise ConfigError(
            f"has value {vocab_size:,}, too small: at least {SMALLEST_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
            f"special and {len(TOOL_TOKENS)} tool-call tokens)",
            "vocab_size",
        )
    if vocab_size > LARGEST_VOCAB:
        raise ConfigError(
            f"has value {vocab_size:,}, too large: at most {LARGEST_VOCAB:,}, 4x the largest vocabulary a released "
            "model uses (Gemma 3's 262,144)",
            "vocab_size",
        )


def train_tokenizer(
    texts: Iterable[str | Sequence[str]],
    vocab_size: int,
    out_path: str | os.PathLike,
    model_max_length: int = 4096,
    split_digits: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; write `tokenizer.json` and `tokenizer_config.json` to `out_path`.

    `out_path` is the directory, or the `tokenizer.json` path inside it; `split_digits` cuts runs of digits into
    pieces of at most that many before BPE (`pre_tokenizer_pattern`; None: runs whole up to LONGEST_PRE_TOKEN). A
    `vocab_size` outside [SMALLEST_VOCAB, LARGEST_VOCAB] or a `split_digits` below 1 (or either no whole number) is
    a ConfigError and a `.json` path of another name a ValueError, all raised before `texts` is read; one str,
    bytes, a mapping or a non-iterable for `texts` is a TypeError, and a text that is no str or holds a lone
    surrogate a TypeError or ValueError naming its position (tokenizers' own named neither).
    """
    check_vocab_size(vocab_size)
    pattern = pre_tokenizer_pattern(split_digits)
    path = tokenizer_json_path(out_path)
    if path.name != TOKENIZER_FILE:
        raise ValueError(
            f"{out_path}: a tokenizer is written as {TOKENIZER_FILE}, the name transformers loads from its folder; "
            f"give the folder ({path.parent}) or {path.parent / TOKENIZER_FILE}"
        )
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = byte_level_split(pattern)
    cutting_pre_tokenizer = byte_level_split(pattern)  # not the backend's: the trainer holds it while texts are read
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *TOOL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if isinstance(texts, str):  # else each of its characters would be a text, and BPE would find no pair to merge
        raise TypeError(f"texts is one text ({texts[:40]!r}): train on an iterable of texts, [text] for one")
    if isinstance(texts, bytes | bytearray) or not isinstance(texts, Iterable):  # bytes: each byte an int "text"
        to_do = (
            "decode it first, [texts.decode('utf-8')]"
            if isinstance(texts, bytes | bytearray)
            else "give a list of texts"
        )
        raise TypeError(f"texts is {texts!r:.60} ({type(texts).__name__}), not an iterable of texts: {to_do}")
    # a datasets batch (dataset[:1000]) or a pandas DataFrame, dict-like: its keys would be the texts, "text" alone
    if isinstance(texts, Mapping) or hasattr(texts, "keys"):
        keys = ", ".join(map(repr, list(texts)[:4]))
        raise TypeError(f"texts is a mapping (keys {keys}), whose keys would be the texts: give its texts, texts[key]")

    def checked(texts: Iterable[str | Sequence[str]]) -> Iterator[str | Sequence[str]]:
        """Each text, or batch of texts (a list or tuple, as tokenizers' train_from_iterator takes them), refused by
        its position before tokenizers reads it (it pulls texts ahead in batches, and its own errors name none);
        tokenizers re-raises an error raised here unchanged."""
        for position, item in enumerate(texts, start=1):
            batched = isinstance(item, list | tuple)
            for index, text in enumerate(item if batched else [item], start=1):
                which = f"text {index} of batch {position} of the texts" if batched else f"text {position} of the texts"
                error = _not_text_error([text], which) or lone_surrogate_error([text], which)
                if error is not None:
                    raise error
            # a long text in pieces that pre-tokenize as it does (`document_pieces`, which our pattern keeps): the
            # trainer's word counts are the same, its memory that of a piece (a 20 MB text took 2.1 GB whole)
            yield [
                piece
                for text in (item if batched else [item])
                for piece in document_pieces(text, DOCUMENT_PIECE_CHARS, cutting_pre_tokenizer)
            ]

    interruptible(lambda: backend.train_from_iterator(checked(texts), trainer=trainer))  # Ctrl-C lands mid-training

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": PADDING_SIDE,
        "chat_template": CHAT_TEMPLATE,
    }
    with staged_files(path.parent) as staged:  # the pair appears together, replacing an earlier tokenizer's
        staged.path(path.name).write_text(backend.to_str(pretty=True), encoding="utf-8")
        staged.path(CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        if (path.parent / CHAT_TEMPLATE_FILE).is_file():  # an earlier one's, saved by transformers, read first there
            staged.path(CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")
    return Tokenizer(backend, source=str(path))
