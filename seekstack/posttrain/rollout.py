"""Group sampling for GRPO through the inference engine, and the log-probabilities of what was sampled.

The engine is built on the very model object being trained: after an optimizer step changes its weights in
place, the next rollout decodes with them (no reload, no copy; GRPOSource resets the engine's prefix cache first,
whose prompt blocks the old weights computed). Each completion has its own seed, derived from
(run seed, generation batch, row), so a rollout is the same whatever the batch around it, and a resumed run
samples what the uninterrupted one did.

Shapes: N completions (prompts x G, each prompt's G consecutive), L prompt + completion tokens, C completion
positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from seekstack.config import ConfigError
from seekstack.infer import Engine, SamplingParams
from seekstack.infer.params import MAX_SEED
from seekstack.model.attention import SharedPrefixCache
from seekstack.model.head_loss import linear_token_logprobs
from seekstack.model.transformer import ModelOutput
from seekstack.posttrain.conversations import prompt_messages
from seekstack.posttrain.padding import pad_rows, within_lengths
from seekstack.posttrain.rewards import RewardWeights, reward_terms, total_reward
from seekstack.posttrain.tasks import Problem, Task
from seekstack.posttrain.tasks.problems_file import ProblemsFile
from seekstack.tokenizer import Tokenizer


@dataclass
class Rollout:
    """A generation batch: prompt + completion rows, where each completion starts, its rewards."""

    input_ids: torch.Tensor  # (N, L) right-padded
    prompt_lengths: torch.Tensor  # (N,)
    completion_lengths: torch.Tensor  # (N,) tokens sampled, EOS included when the completion ended with it
    rewards: torch.Tensor  # (N,) weighted sum of the terms
    terms: dict[str, torch.Tensor]  # each reward term (N,)
    generate_s: float  # seconds spent sampling

    @property
    def completion_mask(self) -> torch.Tensor:
        """(N, C) 1 on completion tokens."""
        width = int(self.completion_lengths.max())
        return (torch.arange(width)[None, :] < self.completion_lengths[:, None]).float()

    @property
    def completion_ids(self) -> torch.Tensor:
        """(N, C) each row's completion tokens, padding after its end."""
        columns = self.prompt_lengths[:, None] + torch.arange(int(self.completion_lengths.max()))[None, :]
        return self.input_ids.gather(1, columns.clamp(max=self.input_ids.shape[1] - 1))

    def ended(self, eos_id: int) -> torch.Tensor:
        """(N,) bool: whether each completion ended with the model's EOS, not cut at the token limit."""
        last = self.prompt_lengths + self.completion_lengths - 1
        return self.input_ids.gather(1, last[:, None]).squeeze(1) == eos_id


def require_completion_room(
    context: int, model: str, completion_tokens: int, name: str, max_prompt_length: int
) -> None:
    """Refuse `completion_tokens` (the field `name`) when they do not fit after rl's prompt room `max_prompt_length` in
    a model of `context` positions: a ConfigError naming `name` and the most that fit; when that room alone fills the
    context, a ConfigError naming max_prompt_length."""
    if context <= max_prompt_length:
        raise ConfigError(
            f"has value {max_prompt_length}: {model}: its context of {context} tokens (max_position_embeddings) "
            f"leaves no room for a completion after a task prompt's room of {max_prompt_length} tokens "
            f"(max_prompt_length); at most {context - 1}",
            field="max_prompt_length",
        )
    room = context - max_prompt_length
    if completion_tokens > room:
        raise ConfigError(
            f"has value {completion_tokens}: it and a task prompt's room of {max_prompt_length} tokens "
            f"(max_prompt_length) pass the model's ({model}) context of {context} tokens; at most {room}",
            field=name,
        )


def require_prompt_room(task: Task, problems: list[Problem], prompts: list[list[int]], max_prompt_length: int) -> None:
    """Refuse prompts (token ids, those of `problems`) longer than rl's room `max_prompt_length`: a ConfigError
    naming it and the longest prompt's length. A prompt is never cut: its left cut (TRL's old truncation) would drop
    the start of the question its reward verifies."""
    longest = max(map(len, prompts))
    if longest > max_prompt_length:
        raise ConfigError(
            f"has value {max_prompt_length}: {_prompts_taking(task, problems, prompts)}; give "
            f"max_prompt_length={longest} or more (it and max_completion_length within the model's context)",
            field="max_prompt_length",
        )


def _prompts_taking(task: Task, problems: list[Problem], prompts: list[list[int]]) -> str:
    """What the longest of `prompts` (those of `problems`) takes, named as the user sets it: a generator's prompts
    at its difficulty, a file's question by its file and line."""
    longest = max(range(len(prompts)), key=lambda row: len(prompts[row]))
    tokens = len(prompts[longest])
    if isinstance(task, ProblemsFile):
        return f"the prompt of the question on {task.where(problems[longest])} takes {tokens} tokens"
    return f"{task.name} prompts (difficulty {task.difficulty}) take up to {tokens} tokens"


def task_prompts(tokenizer: Tokenizer, problems: list[Problem]) -> list[list[int]]:
    """Each problem's prompt as a rollout samples it: its messages in the chat template, as token ids."""
    return [tokenizer.encode_chat(prompt_messages(p)) for p in problems]


def rollout_length(
    task: Task, problems: list[Problem], prompts: list[list[int]], completion_tokens: int, context: int, limit: str
) -> int:
    """The tokens a rollout of `prompts` (token ids, those of `problems`) needs per request, the longest prompt and
    `completion_tokens` (the sampling commands' max_new_tokens), within `context` tokens (`limit` says whose); a
    ConfigError naming `difficulty` (a file's: `task`) when that prompt alone fills them, else naming `max_new_tokens`
    and the most that fit."""
    longest = max(map(len, prompts))
    prompts_taking = _prompts_taking(task, problems, prompts)
    no_room = f"{prompts_taking}, which leaves no room for a completion in {limit}, {context} tokens"
    if longest >= context and isinstance(task, ProblemsFile):
        raise ConfigError(f"has value {task.name}: {no_room}; shorten that question", field="task")
    if longest >= context:  # the chat template's framing takes most of a prompt: difficulty 1 may not fit either
        lower = "" if task.difficulty == 1 else "lower difficulty, or "
        raise ConfigError(
            f"has value {task.difficulty}: {no_room}; {lower}sample a model of a longer context", "difficulty"
        )
    if longest + completion_tokens > context:
        raise ConfigError(
            f"has value {completion_tokens}: {prompts_taking}, and a completion of that many after them passes "
            f"{limit}, {context} tokens; at most {context - longest}",
            field="max_new_tokens",
        )
    return longest + completion_tokens


def sample_groups(
    engine: Engine,
    task: Task,
    problems: list[Problem],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    weights: RewardWeights,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    max_prompt_length: int | None = None,
) -> Rollout:
    """G completions of each problem's prompt, sampled together by the engine (at `temperature`, `top_p`, `top_k`
    and `min_p`), scored by the task's verifier; prompts past rl's `max_prompt_length` are refused
    (require_prompt_room), as the engine refuses, naming it, one that with `max_new_tokens` passes its max_model_len
    (`rollout_length` sizes the sampling commands' engines)."""
    started = time.perf_counter()
    tokenizer = engine.tokenizer
    distinct = task_prompts(tokenizer, problems)
    if max_prompt_length is not None:
        require_prompt_room(task, problems, distinct, max_prompt_length)
    prompts = [prompt for prompt in distinct for _ in range(group_size)]  # the engine prefills a group's G once
    params = [
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=(seed * 1_000_003 + row) % MAX_SEED,  # torch's seed range, where s and s + 2**64 draw alike
            detokenize=False,
        )
        for row in range(len(prompts))
    ]
    completions = engine.generate(prompts, params)
    generate_s = time.perf_counter() - started
    scored = [p for p in problems for _ in range(group_size)]
    term_rows = [
        reward_terms(task, problem, tokenizer.decode_reply(c.token_ids), ended=c.finish_reason == "stop")
        for problem, c in zip(scored, completions, strict=True)
    ]
    rows = [prompt + c.token_ids for prompt, c in zip(prompts, completions, strict=True)]
    return Rollout(
        input_ids=pad_rows(rows, tokenizer.pad_id),
        prompt_lengths=torch.tensor([len(p) for p in prompts]),
        completion_lengths=torch.tensor([len(c.token_ids) for c in completions]),
        rewards=torch.tensor([total_reward(terms, weights) for terms in term_rows]),
        terms={name: torch.tensor([terms[name] for terms in term_rows]) for name in term_rows[0]},
        generate_s=generate_s,
    )


def completion_logps(
    model: nn.Module, rollout: Rollout, temperature: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, ModelOutput]:
    """(log-probabilities, entropies), each (N, C), of the completion tokens under `model` at the sampling
    temperature, and the model's output; positions past a completion's end hold 0 (the mask drops them).

    Rows that share a prompt (a group's G) share its computation: the distinct prompts run once, and the
    completions attend to their prompt's latents (model/attention.py SharedPrefixCache); this equals the forward
    over whole rows.
    """
    prompts, prompt_of = distinct_prompts(rollout)
    if len(prompts) == len(prompt_of):
        hidden, out = _whole_rows_hidden(model, rollout, device)
    else:
        hidden, out = _shared_prompt_hidden(model, rollout, prompts, prompt_of.to(device), device)
    completions = rollout.completion_ids.to(device)
    real = rollout.completion_mask.to(device).bool()  # (N, C): the head runs on the completion tokens alone
    # head(h) / T = head(h / T): the head has no bias; its logits are made and used a chunk of rows at a time
    real_logps, real_entropy = linear_token_logprobs(
        hidden[real] / temperature, model.lm_head.weight, completions[real]
    )
    logps = torch.zeros(real.shape, device=device).masked_scatter(real, real_logps)
    entropy = torch.zeros(real.shape, device=device).masked_scatter(real, real_entropy)
    return logps, entropy, out


def trained_tokens(rollout: Rollout) -> tuple[int, int]:
    """The token positions `completion_logps` runs through the model (padding included) and the longest row: the
    whole (N, L) rows, or the P distinct prompts padded to the longest and the N completions but their last token."""
    prompts, prompt_of = distinct_prompts(rollout)
    if len(prompts) == len(prompt_of):
        return rollout.input_ids.numel(), rollout.input_ids.shape[1]
    prompt_width, width = max(len(prompt) for prompt in prompts), int(rollout.completion_lengths.max())
    return len(prompts) * prompt_width + len(prompt_of) * (width - 1), prompt_width + width


def distinct_prompts(rollout: Rollout) -> tuple[list[list[int]], torch.Tensor]:
    """The rollout's distinct prompts in order of first use, and (N,) which one each row continues."""
    index: dict[tuple[int, ...], int] = {}
    prompt_of = [
        index.setdefault(tuple(row[:length].tolist()), len(index))
        for row, length in zip(rollout.input_ids, rollout.prompt_lengths.tolist(), strict=True)
    ]
    return [list(prompt) for prompt in index], torch.tensor(prompt_of)


def _whole_rows_hidden(model: nn.Module, rollout: Rollout, device: torch.device) -> tuple[torch.Tensor, ModelOutput]:
    """(N, C, D) states predicting each completion token, from one forward over the whole (N, L) rows."""
    input_ids = rollout.input_ids.to(device)
    N, L = input_ids.shape
    ends = (rollout.prompt_lengths + rollout.completion_lengths).to(device)
    counted = within_lengths(ends, L)  # the rows' padding counts in no expert load
    out = model(input_ids, logits_at=torch.zeros(N, dtype=torch.long, device=device), counted=counted)  # (N, 1, V)
    width = int(rollout.completion_lengths.max())
    # the position predicting completion token j of row i is prompt_length_i - 1 + j (position t predicts t + 1)
    columns = rollout.prompt_lengths[:, None].to(device) - 1 + torch.arange(width, device=device)[None, :]
    columns = columns.clamp(max=L - 2)  # (N, C)
    hidden = out.hidden_states.gather(1, columns[..., None].expand(-1, -1, out.hidden_states.shape[-1]))
    return hidden, out


def _shared_prompt_hidden(
    model: nn.Module, rollout: Rollout, prompts: list[list[int]], prompt_of: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, ModelOutput]:
    """The same (N, C, D) states from one forward over the P distinct prompts and one over the N completions.

    A completion's first token is predicted by its prompt's last state, token j > 0 by the completion's state j - 1,
    so the completions run without their last token. The output's `expert_load`, which MaxVio and the router's bias
    update read, counts each distinct prompt token once and the completion tokens run, not G copies of a prompt nor
    any padding; GRPO's loss has no balance term, so none is returned."""
    prompt_lengths = torch.tensor([len(prompt) for prompt in prompts], device=device)
    P, width = len(prompts), int(rollout.completion_lengths.max())
    cache = SharedPrefixCache(prompt_lengths, prompt_of)
    prompt_ids = pad_rows(prompts, 0).to(device)  # padding after a prompt's end is never attended to
    prompt_counted = within_lengths(prompt_lengths, prompt_ids.shape[1])
    prompt_out = model(
        prompt_ids, cache=cache, logits_at=torch.zeros(P, dtype=torch.long, device=device), counted=prompt_counted
    )
    last = prompt_out.hidden_states[torch.arange(P, device=device), prompt_lengths - 1]  # (P, D)
    hidden, load = last[prompt_of].unsqueeze(1), prompt_out.expert_load  # (N, 1, D)
    if width > 1:
        positions = rollout.prompt_lengths[:, None] + torch.arange(width - 1)[None, :]  # continuing each prompt's
        out = model(
            rollout.completion_ids[:, :-1].to(device), cache=cache, positions=positions.to(device),
            logits_at=torch.zeros(len(prompt_of), dtype=torch.long, device=device),
            counted=rollout.completion_mask[:, :-1].bool().to(device),
        )  # fmt: skip
        hidden = torch.cat((hidden, out.hidden_states), dim=1)
        load = None if load is None else load + out.expert_load
    return hidden, ModelOutput(logits=None, hidden_states=hidden, expert_load=load)
