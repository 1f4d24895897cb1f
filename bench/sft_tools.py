"""Tool calling learned by SFT, end to end: a micro model trained on a synthetic tool-calling dataset (TRL's `tools`
column) answers new questions with calls the server's parser reads.

Each conversation offers two tools (`weather(city)`, `local_time(city)`); the user asks one of them of a city, the
assistant calls the tool, the tool answers and the assistant says the result. A byte-level tokenizer is trained on
the rendered chats, a fresh micro DeepSeek-V3 model on the conversations (`seekstack sft`, loss on the calls and the
answers alone). Then the engine answers the questions of held-out conversations greedily, each prompt the chat
template's with the tools (as the server writes it), and `seekstack.serve.tool_calls.message_with_calls` parses the
replies: the shares that are one call the parser reads, of the right function, and with the right arguments are
printed, for cities seen in training and for cities never seen.
Usage:
    OMP_NUM_THREADS=2 python bench/sft_tools.py [--steps 600] [--out /tmp/sft_tools]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from options import positive_int

from seekstack.infer import Engine, SamplingParams
from seekstack.posttrain.config import SFTConfig
from seekstack.posttrain.conversations import Conversation, write_conversations
from seekstack.posttrain.sft import run_sft
from seekstack.serve.schemas import AssistantMessage
from seekstack.serve.tool_calls import message_with_calls
from seekstack.tokenizer import tools_prompt, train_tokenizer
from seekstack.train.config import resolve_train_config

CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Dakar", "Quito", "Perth", "Hanoi", "Seoul", "Delhi"]
HELD_OUT_CITIES = ["Berlin", "Madrid", "Nairobi"]  # never in a trained conversation
TOOLS = [
    {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for name, description in [("weather", "Today's weather in a city"), ("local_time", "The time now in a city")]
]  # fmt: skip
QUESTIONS = {"weather": "What is the weather in {city}?", "local_time": "What time is it in {city}?"}
MODEL = [
    "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128", "model.num_attention_heads=4",
    "model.moe_intermediate_size=32", "model.n_routed_experts=4", "model.num_experts_per_tok=2", "model.n_group=1",
    "model.topk_group=1", "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.num_nextn_predict_layers=0",
]  # fmt: skip


def conversation(rng: random.Random, city: str) -> Conversation:
    """One exchange: a question, the assistant's call of the tool that answers it, the result, the answer."""
    function = rng.choice(list(QUESTIONS))
    result = f"{rng.randint(5, 35)}C" if function == "weather" else f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    call = {"id": "call_1", "type": "function", "function": {"name": function, "arguments": json.dumps({"city": city})}}
    return Conversation(
        [
            {"role": "user", "content": QUESTIONS[function].format(city=city)},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
            {"role": "assistant", "content": f"It is {result} in {city}."},
        ],
        TOOLS,
    )


def call_scores(engine: Engine, conversations: list[Conversation]) -> tuple[float, float, float]:
    """The shares of `conversations` whose question the engine answers, greedily, with one call the parser reads, of
    the conversation's function, with its arguments too."""
    prompts = [engine.tokenizer.encode_chat(c[:1], tools=TOOLS) for c in conversations]
    greedy = SamplingParams(max_new_tokens=48, temperature=0.0, skip_special_tokens=False)
    parsed = function = arguments = 0
    for c, completion in zip(conversations, engine.generate(prompts, greedy), strict=True):
        message, reason = message_with_calls(AssistantMessage(content=completion.text), completion.finish_reason)
        expected = c[1]["tool_calls"][0]["function"]
        calls = message.tool_calls if reason == "tool_calls" else []  # a call cut by max_new_tokens comes back cut
        if len(calls) == 1:
            right_function = calls[0].function.name == expected["name"]
            parsed, function = parsed + 1, function + right_function
            arguments += right_function and _json(calls[0].function.arguments) == _json(expected["arguments"])
    return parsed / len(conversations), function / len(conversations), arguments / len(conversations)


def _json(arguments: str) -> object:
    """The value a call's arguments spell; None when they are no JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=600)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sft_tools"))
    args = parser.parse_args()
    rng = random.Random(0)
    trained = [conversation(rng, rng.choice(CITIES)) for _ in range(400)]
    seen = [conversation(rng, city) for city in CITIES]
    unseen = [conversation(rng, city) for city in HELD_OUT_CITIES * 4]
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_conversations(trained, args.out / "tools.jsonl")
    texts = [tools_prompt(TOOLS)] * 50 + [json.dumps(list(c)) for c in trained]  # the chats' text, the tools' prompt
    tokenizer = train_tokenizer(texts, vocab_size=1024, out_path=args.out / "tok")
    options = [
        f"tokenizer={args.out / 'tok'}",
        f"data={data}",
        f"out_dir={args.out / 'run'}",
        f"max_steps={args.steps}",
    ]
    options += ["batch_size=8", "seq_len=512", "lr=3e-3", "min_lr=3e-4", "warmup_steps=20", "eval_every=0"]
    options += ["save_every=0", f"model.vocab_size={tokenizer.vocab_size}", *MODEL]
    result = run_sft(resolve_train_config(None, options, cls=SFTConfig))
    print(f"sft: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} over {args.steps} steps", file=sys.stderr)
    engine = Engine.from_pretrained(args.out / "run" / "checkpoints" / f"step_{args.steps}")
    for cities, conversations in [("seen", seen), ("unseen", unseen)]:
        parsed, function, arguments = call_scores(engine, conversations)
        print(f"{cities} cities: one parsed call {parsed:.0%}, of the right function {function:.0%}, "
              f"with the right arguments {arguments:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
