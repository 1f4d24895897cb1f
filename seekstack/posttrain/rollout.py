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

from seekstack.infer import Engine, SamplingParams
from seekstack.model.transformer import ModelOutput
from seekstack.posttrain.conversations import prompt_messages
from seekstack.posttrain.grpo import token_logps_and_entropy
from seekstack.posttrain.padding import pad_rows
from seekstack.posttrain.rewards import RewardWeights, reward_terms, total_reward
from seekstack.posttrain.tasks import Problem, Task


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


def sample_groups(
    engine: Engine,
    task: Task,
    problems: list[Problem],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    weights: RewardWeights,
) -> Rollout:
    """G completions of each problem's prompt, sampled together by the engine, scored by the task's verifier."""
    started = time.perf_counter()
    tokenizer = engine.tokenizer
    distinct = [tokenizer.encode_chat(prompt_messages(p)) for p in problems]
    # A group's G requests share one prefill: one-token requests put each prompt in the engine's prefix cache, where
    # the G find all its full blocks and feed only the tokens after them (at least the last, for its logits).
    if group_size > 1:
        engine.generate(distinct, SamplingParams(max_new_tokens=1, temperature=0.0))
    prompts = [prompt for prompt in distinct for _ in range(group_size)]
    params = [
        SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed * 1_000_003 + row)
        for row in range(len(prompts))
    ]
    completions = engine.generate(prompts, params)
    generate_s = time.perf_counter() - started
    scored = [p for p in problems for _ in range(group_size)]
    term_rows = [
        reward_terms(task, problem, tokenizer.decode(t for t in c.token_ids if t != tokenizer.eos_id))
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
    temperature, and the model's output; positions past a completion's end hold padding (the mask drops them).

    The output head runs on the completion positions alone: the prompt's logits are never needed."""
    input_ids = rollout.input_ids.to(device)
    N, L = input_ids.shape
    out = model(input_ids, logits_at=torch.zeros(N, dtype=torch.long, device=device))  # (N, 1, V): a token cost
    width = int(rollout.completion_lengths.max())
    # the position predicting completion token j of row i is prompt_length_i - 1 + j (position t predicts t + 1)
    columns = rollout.prompt_lengths[:, None].to(device) - 1 + torch.arange(width, device=device)[None, :]
    columns = columns.clamp(max=L - 2)  # (N, C)
    hidden = out.hidden_states.gather(1, columns[..., None].expand(-1, -1, out.hidden_states.shape[-1]))
    logits = model.lm_head(hidden) / temperature  # (N, C, V)
    logps, entropy = token_logps_and_entropy(logits, input_ids.gather(1, columns + 1))
    return logps, entropy, out
