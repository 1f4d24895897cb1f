"""R1-distill's data (DeepSeek-R1 §2.4): a stronger model's reasoning traces on training prompts, kept only when
the verifier accepts their answer (rejection sampling), as conversations a smaller student is SFT-trained on.

Recipe: `seekstack traces TEACHER --out traces.jsonl`, then `seekstack sft data=traces.jsonl init_from=STUDENT`.
"""

from __future__ import annotations

from dataclasses import dataclass

from seekstack.infer import Engine
from seekstack.posttrain.conversations import Conversation, prompt_messages
from seekstack.posttrain.rewards import RewardWeights
from seekstack.posttrain.rollout import sample_groups
from seekstack.posttrain.tasks import Problem, Task, sample_problems


@dataclass
class Traces:
    """Verified conversations, how many samples and prompts they came from, and how many of those prompts have at
    least one verified trace (`prompts_solved`)."""

    conversations: list[Conversation]
    sampled: int
    prompts: int
    prompts_solved: int

    @property
    def accept_rate(self) -> float:
        """The share of the samples kept."""
        return len(self.conversations) / self.sampled

    @property
    def solved_rate(self) -> float:
        """The share of the prompts solved."""
        return self.prompts_solved / self.prompts


def trace_problems(task: Task, prompts: int, seed: int) -> list[Problem]:
    """The distinct training problems `verified_traces` samples."""
    return sample_problems(task, prompts, "train", seed, distinct=True)


def verified_traces(
    engine: Engine,
    task: Task,
    prompts: int,
    samples: int,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_prompts: int = 64,
) -> Traces:
    """`samples` completions of each of `prompts` distinct training problems by the engine's model, each kept (once
    per distinct question and text) when it is well formed and the verifier accepts its answer. A task with fewer
    distinct training problems is a ValueError, as in pass-at-k."""
    problems = trace_problems(task, prompts, seed)
    tokenizer, conversations, solved = engine.tokenizer, [], 0
    kept: set[tuple[str, str]] = set()  # (question, trace)
    for start in range(0, prompts, batch_prompts):
        chunk = problems[start : start + batch_prompts]
        rollout = sample_groups(
            engine, task, chunk, samples, max_new_tokens, temperature, seed * 1_000_003 + start, RewardWeights()
        )
        correct = rollout.terms["correctness"] > 0
        for index, problem in enumerate(chunk):
            rows = range(index * samples, (index + 1) * samples)
            for row in rows:
                start_at, length = int(rollout.prompt_lengths[row]), int(rollout.completion_lengths[row])
                ids = rollout.input_ids[row, start_at : start_at + length].tolist()
                text = tokenizer.decode_reply(ids).strip()
                if correct[row] and (problem.question, text) not in kept:
                    kept.add((problem.question, text))
                    conversations.append([*prompt_messages(problem), {"role": "assistant", "content": text}])
            solved += bool(correct[rows.start : rows.stop].any())
    return Traces(conversations, prompts * samples, prompts, solved)
