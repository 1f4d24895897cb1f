"""`seekstack rl`: GRPO on a verifiable task, through the pretraining trainer's loop.

`GRPOSource` is the trainer's batch source (seekstack.train.trainer.BatchSource). Every `num_iterations` steps it
samples a generation batch (G completions for each of `batch_size` training prompts) from the policy being
trained, scores it, computes the group-normalised advantages and, when needed, the old policy's and the reference
model's log-probabilities; each step's loss is the GRPO objective on that batch (posttrain/grpo.py). Its state
(position, the current batch) is saved in checkpoints, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekstack.checkpoint import load_pretrained
from seekstack.config import ConfigError
from seekstack.infer import Engine
from seekstack.infer.threads import IdleCores, checked_thread_count, running_on, threads_beside
from seekstack.model.transformer import ModelOutput
from seekstack.posttrain.config import GRPOConfig, tokenizer_path
from seekstack.posttrain.grpo import group_advantages, policy_loss
from seekstack.posttrain.rewards import RewardWeights
from seekstack.posttrain.rollout import Rollout, completion_logps, sample_groups, trained_tokens
from seekstack.posttrain.sft import tokenizer_info
from seekstack.posttrain.tasks import make_task, sample_problems
from seekstack.tokenizer import Tokenizer, tokenizer_json_path
from seekstack.train.trainer import TrainResult, train

PROMPT_TOKENS = 192  # room for a task's prompt in the engine's cache, per request


class GRPOSource:
    """Generation batches from the policy being trained, and the GRPO loss on them."""

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.tokenizer = Tokenizer.from_file(tokenizer_json_path(tokenizer_path(config)))
        self.tokenizer_info = tokenizer_info(self.tokenizer)
        self.task = make_task(config.task, config.difficulty)
        self.weights = RewardWeights(correctness=1.0, format=config.format_weight)
        self.generation = 0  # generation batches sampled so far
        self.iteration = 0  # optimizer steps taken on the current batch
        self.current: dict[str, Any] | None = None
        self.train_threads = 1  # with threads="auto": the training half's, chosen at each generation batch

    def attach(self, model: nn.Module) -> None:
        """Build the engine on the trained model itself, and the frozen reference when beta > 0."""
        self.model = model
        self.device = next(model.parameters()).device
        self.most_threads = torch.get_num_threads()  # with threads="auto", the training half's limit
        rows = self.config.batch_size * self.config.num_generations
        context = model.config.max_position_embeddings
        if PROMPT_TOKENS + self.config.max_completion_length > context:
            raise ConfigError(
                f"field 'max_completion_length' is {self.config.max_completion_length}: with a prompt's room "
                f"({PROMPT_TOKENS} tokens) that passes the model's context of {context} tokens; at most "
                f"{context - PROMPT_TOKENS}"
            )
        self.engine = Engine(
            model,
            self.tokenizer,
            max_batch_size=rows,
            max_model_len=PROMPT_TOKENS + self.config.max_completion_length,
            compile=self.config.compile_decode,
            eager_lone_row=True,  # a rollout's longest completion alone at its end: no second graph to compile
        )
        model.train()
        self.reference = None
        if self.config.beta > 0:
            if not self.config.init_from:
                raise ValueError("beta > 0 needs init_from: the reference model is the checkpoint the run starts from")
            self.reference = load_pretrained(self.config.init_from, dtype=torch.float32, device=self.device).eval()
            self.reference.requires_grad_(False)

    def batch(self, batch_size: int, progress: float) -> dict[str, Any]:
        if self.current is None or self.iteration == self.config.num_iterations:
            self.current = self._generate(batch_size)
            self.iteration = 0
        self.iteration += 1
        if self.config.threads == "auto":
            torch.set_num_threads(self.train_threads)  # the trainer's forward, backward and step; run_rl restores
        return self.current

    @torch.no_grad()
    def _generate(self, batch_size: int) -> dict[str, Any]:
        config = self.config
        problems = sample_problems(self.task, batch_size, "train", seed=config.seed * 1_000_003 + self.generation)
        self.engine.reset_prefix_cache()  # prompt prefixes cached before the last optimizer step hold stale values
        self.model.eval()  # as the engine's compiled decode step was traced
        compile_s = self.engine.compile_s
        auto = config.threads == "auto"
        idle = IdleCores()
        with running_on(1) if auto else contextlib.nullcontext():
            rollout = sample_groups(
                self.engine,
                self.task,
                problems,
                config.num_generations,
                config.max_completion_length,
                config.temperature,
                seed=config.seed * 1_000_003 + self.generation,
                weights=self.weights,
            )
        if auto:
            self.train_threads = threads_beside(idle.idle(), self.most_threads)
            torch.set_num_threads(self.train_threads)
        self.generation += 1
        self.model.train()
        batch: dict[str, Any] = {
            "rollout": rollout,
            "advantages": group_advantages(rollout.rewards, config.num_generations, config.scale_rewards),
            "old_logps": None,
            "ref_logps": None,
            "fresh": True,
            "compile_s": self.engine.compile_s - compile_s,  # of the rollout's generate_s
        }
        if config.num_iterations > 1:  # with one update per batch the old policy is the current one
            batch["old_logps"] = completion_logps(self.model, rollout, config.temperature, self.device)[0]
        if self.reference is not None:
            batch["ref_logps"] = completion_logps(self.reference, rollout, config.temperature, self.device)[0]
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any], mtp_loss_weight: float) -> tuple[ModelOutput, dict]:
        config, rollout = self.config, batch["rollout"]
        logps, entropy, out = completion_logps(model, rollout, config.temperature, self.device)
        mask = rollout.completion_mask.to(self.device)
        old_logps = batch["old_logps"] if batch["old_logps"] is not None else logps.detach()
        result = policy_loss(
            logps,
            old_logps.to(self.device),
            batch["advantages"].to(self.device),
            mask,
            config.loss_type,
            config.epsilon,
            config.clip_high,
            config.beta,
            None if batch["ref_logps"] is None else batch["ref_logps"].to(self.device),
            config.max_completion_length,
        )
        metrics = rollout_metrics(rollout)
        metrics |= {
            "kl": result.kl,
            "clip_fraction": result.clip_fraction,
            "clip_low_fraction": result.clip_low_fraction,
            "clip_high_fraction": result.clip_high_fraction,
            "entropy": float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)),
            "generate_s": rollout.generate_s if batch["fresh"] else 0.0,
            "compile_s": batch.get("compile_s", 0.0) if batch["fresh"] else 0.0,  # absent in older checkpoints
            "threads": torch.get_num_threads(),  # of this training half
        }
        batch["fresh"] = False
        return dataclasses.replace(out, logits=None, loss=result.loss, lm_loss=result.loss.detach()), metrics

    def tokens(self, batch: dict[str, Any]) -> tuple[int, int]:
        return trained_tokens(batch["rollout"])

    def state_dict(self) -> dict[str, Any]:
        current = None
        if self.current is not None:
            current = {**self.current, "rollout": dataclasses.asdict(self.current["rollout"])}
        return {"generation": self.generation, "iteration": self.iteration, "current": current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generation, self.iteration = state["generation"], state["iteration"]
        current = state["current"]
        self.current = None if current is None else {**current, "rollout": Rollout(**current["rollout"])}


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Reward mean/std overall and per term, accuracy, completion lengths overall, of correct and of wrong ones."""
    metrics = {"reward": float(rollout.rewards.mean()), "reward_std": float(rollout.rewards.std())}
    for name, values in rollout.terms.items():
        metrics[f"reward_{name}"] = float(values.mean())
        metrics[f"reward_{name}_std"] = float(values.std())
    correct = rollout.terms["correctness"] > 0
    lengths = rollout.completion_lengths.float()
    metrics["accuracy"] = float(correct.float().mean())
    metrics["completion_length"] = float(lengths.mean())
    if correct.any():
        metrics["completion_length_correct"] = float(lengths[correct].mean())
    if (~correct).any():
        metrics["completion_length_incorrect"] = float(lengths[~correct].mean())
    return metrics


def run_rl(config: GRPOConfig, resume: bool | str | Path = False) -> TrainResult:
    """GRPO from `init_from` (or a fresh preset) on the task `config` names."""
    config = config.validate()
    before = torch.get_num_threads()
    try:
        if config.threads != "auto" and config.threads > 0:
            torch.set_num_threads(checked_thread_count(config.threads, "field 'threads'"))
        return train(config, resume=resume, source=GRPOSource(config))
    finally:
        torch.set_num_threads(before)
