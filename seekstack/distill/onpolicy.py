"""On-policy rows for GKD (Agarwal et al. 2024): the student writes the rows the teacher then scores.

Token shards: the student continues the first `prompt_tokens` of each corpus row to the row's length (to the
student's context when the row is one longer: seq_len = max_position_embeddings). Conversations:
the student answers each conversation's last trained assistant turn (its tokens before that turn are the prompt, as
TRL's GKD answers a conversation's last message with the turns before it) until EOS or seq_len;
SFTSource leaves out conversations without an assistant token within seq_len, so every prompt has room; packed rows'
conversations are answered each on its own and the answered ones packed again. Generation
runs on the inference engine built on the very student being trained, as the RL rollouts do
(seekstack/posttrain/rollout.py): an optimizer step changes the weights in place and the next generation uses
them, with no copy. Each row has its own seed, drawn from the global generator the trainer saves and restores,
so a resumed run writes what the uninterrupted one did.

Shapes: B rows, T tokens, P prompt tokens; a (B, T - 1) mask selects positions (position t predicts token t + 1).
"""

from __future__ import annotations

import torch

from seekstack.infer import Engine, SamplingParams
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.model.transformer import Transformer
from seekstack.posttrain.packing import best_fit_decreasing, pack_labelled
from seekstack.posttrain.padding import within_lengths
from seekstack.tokenizer import Tokenizer


def generated_positions(prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width - 1) mask of the positions predicting generated tokens: p - 1 .. p + c - 2 for a row whose prompt
    has p tokens and whose completion c."""
    positions = torch.arange(width - 1, device=prompt_lengths.device)[None, :]
    first = prompt_lengths[:, None] - 1
    return (positions >= first) & (positions < first + completion_lengths[:, None])


def on_policy_targets(rows: torch.Tensor, prompt_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B, T) and compared positions (B, T - 1) of continued corpus rows: the cross-entropy counts the corpus
    prompt alone, the divergence the positions predicting generated tokens."""
    B, T = rows.shape
    positions = torch.arange(T, device=rows.device).expand_as(rows)
    labels = rows.masked_fill(positions >= prompt_tokens, IGNORE_INDEX)
    prompt_lengths = torch.full((B,), prompt_tokens, device=rows.device)
    return labels, generated_positions(prompt_lengths, prompt_lengths.new_full((B,), T - prompt_tokens), T)


def conversation_prompts(
    input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> list[list[int]]:
    """Each conversation's tokens before its last trained assistant turn (the last run of labelled tokens: its
    content, tool calls and EOS), the earlier turns its context, as TRL's GKD prompts with a conversation's messages
    but the last: one a row, or several a row packed by `positions` (B, T), each starting where its positions restart
    at 0."""
    prompts = []
    for row, (ids, row_labels) in enumerate(zip(input_ids.tolist(), labels.tolist(), strict=True)):
        starts = [0] if positions is None else (positions[row] == 0).nonzero().flatten().tolist()
        for start, end in zip(starts, [*starts[1:], len(ids)], strict=True):
            answer = max(t for t in range(start, end) if row_labels[t] != IGNORE_INDEX)
            while answer > start and row_labels[answer - 1] != IGNORE_INDEX:  # back to the turn's first token
                answer -= 1
            prompts.append(ids[start:answer])
    return prompts


class StudentGenerations:
    """GKD's on-policy micro-batches: (rows, labels, positions) -> the student's own rows, their labels (the corpus
    prompt for continued corpus rows, nothing for answered conversations), the positions the teacher is compared on
    (the generated tokens), the tokens the student's MoE statistics count (None: all; answered conversations leave
    their padding out) and the new rows' positions: conversations packed by `positions` are answered each on its own
    and the answered ones packed again (best-fit decreasing, as packing.py packs), else None. `prompt_tokens` None =
    conversations; rows hold at most `max_tokens` tokens."""

    def __init__(
        self,
        student: Transformer,
        tokenizer: Tokenizer,
        rows: int,
        max_tokens: int,
        prompt_tokens: int | None,
        temperature: float,
    ):
        self.student, self.prompt_tokens, self.temperature = student, prompt_tokens, temperature
        self.tokenizer, self.max_tokens, self.pad_id = tokenizer, max_tokens, tokenizer.pad_id
        self.engine = self._engine(rows)

    @torch.no_grad()
    def __call__(
        self, rows: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.prompt_tokens is not None:  # corpus rows: continue the first P tokens to max_tokens
            prompts = rows[:, : self.prompt_tokens].tolist()
            completions = self._sample(prompts, [self.max_tokens - self.prompt_tokens] * len(prompts), ignore_eos=True)
            generated = torch.tensor([p + c for p, c in zip(prompts, completions, strict=True)], device=rows.device)
            return generated, *on_policy_targets(generated, self.prompt_tokens), None, None
        prompts = conversation_prompts(rows, labels, positions)
        completions = self._sample(prompts, [self.max_tokens - len(p) for p in prompts], ignore_eos=False)
        # each answered conversation, its generated tokens marked by their own ids as labels (the prompt's unmarked)
        answered = [(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in zip(prompts, completions, strict=True)]
        if positions is None:
            packs = [[row] for row in answered]
        else:
            packs = [
                [answered[i] for i in pack]
                for pack in best_fit_decreasing([len(a) for a, _ in answered], self.max_tokens)
            ]
        generated, marks, new_positions = (
            t.to(rows.device) for t in pack_labelled(packs, self.pad_id, self.max_tokens)
        )
        no_labels = torch.full_like(generated, IGNORE_INDEX)  # nothing here is a reference answer
        compared = marks[:, 1:] != IGNORE_INDEX  # (B, T - 1): the positions predicting generated tokens
        lengths = torch.tensor([sum(len(ids) for ids, _ in pack) for pack in packs], device=rows.device)
        counted = within_lengths(lengths, generated.shape[1])
        return generated, no_labels, compared, counted, None if positions is None else new_positions

    def _engine(self, rows: int) -> Engine:
        """An engine of the student answering `rows` prompts at once, each up to max_tokens."""
        return Engine(self.student, self.tokenizer, max_batch_size=rows, max_model_len=self.max_tokens)

    def _sample(self, prompts: list[list[int]], max_new_tokens: list[int], ignore_eos: bool) -> list[list[int]]:
        """The student's completion of each prompt, each with its own seed (EOS included when it stopped there), all
        at once: packed rows hold more conversations than the engine was made for, which is then made again for
        them, its cache holding each at max_tokens as it held each row."""
        if len(prompts) > self.engine.max_batch_size:
            self.engine = self._engine(len(prompts))
        self.engine.reset_prefix_cache()  # prompt blocks cached before the last optimizer step hold stale values
        seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        params = [
            SamplingParams(max_new_tokens=room, temperature=self.temperature, seed=seed, ignore_eos=ignore_eos)
            for room, seed in zip(max_new_tokens, seeds, strict=True)
        ]
        completions = self.engine.generate(prompts, params)
        return [completion.token_ids for completion in completions]
