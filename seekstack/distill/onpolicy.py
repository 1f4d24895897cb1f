"""On-policy rows for GKD (Agarwal et al. 2024): the student continues the start of each corpus row itself.

Generation runs on the inference engine built on the very student being trained, as the RL rollouts do
(seekstack/posttrain/rollout.py): an optimizer step changes the weights in place and the next generation uses
them, with no copy. Each row has its own seed, drawn from the global generator the trainer saves and restores,
so a resumed run writes what the uninterrupted one did.

Shapes: B rows, T tokens (seq_len), P prompt tokens.
"""

from __future__ import annotations

import torch

from seekstack.infer import Engine, SamplingParams
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import Tokenizer


class StudentGenerations:
    """Rows whose first `prompt_tokens` come from the corpus and whose rest the student samples (ignoring EOS, so
    every row keeps its length T, at most `max_tokens`)."""

    def __init__(
        self,
        student: Transformer,
        tokenizer: Tokenizer,
        rows: int,
        max_tokens: int,
        prompt_tokens: int,
        temperature: float,
    ):
        self.student, self.prompt_tokens, self.temperature = student, prompt_tokens, temperature
        self.engine = Engine(student, tokenizer, max_batch_size=rows, max_model_len=max_tokens)
        student.train()  # the engine put it in eval mode

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, T) corpus rows -> (B, T): each row's first P tokens followed by the student's continuation."""
        prompts = rows[:, : self.prompt_tokens].tolist()
        seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        params = [
            SamplingParams(
                max_new_tokens=rows.shape[1] - self.prompt_tokens,
                temperature=self.temperature,
                seed=seed,
                ignore_eos=True,
            )
            for seed in seeds
        ]
        completions = self.engine.generate(prompts, params)
        self.student.train()
        generated = [prompt + completion.token_ids for prompt, completion in zip(prompts, completions, strict=True)]
        return torch.tensor(generated, dtype=rows.dtype, device=rows.device)
