"""`seekstack rl`: GRPO on a verifiable task, through the pretraining trainer's loop.

`GRPOSource` is the trainer's batch source (seekstack.train.trainer.BatchSource). Every `num_iterations` steps it
samples a generation batch (G completions for each of `batch_size` training prompts) from the policy being
trained, scores it, computes the group-normalised advantages and, when needed, the old policy's and the reference
model's log-probabilities; each step's loss is the GRPO objective on that batch (posttrain/grpo.py). With
`async_rollouts` the next batch is sampled on a thread of its own, by a copy of the policy whose weights are synced
before each batch, while the trainer trains on this one. Its state (position, the current batch, a batch sampled
ahead) is saved in checkpoints, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekstack.checkpoint import load_pretrained
from seekstack.config import ConfigError
from seekstack.infer import Engine
from seekstack.infer.threads import IdleCores, configured_threads, running_on, threads_beside
from seekstack.model.transformer import ModelOutput
from seekstack.posttrain.config import GRPOConfig, run_tokenizer
from seekstack.posttrain.grpo import ScaleRewards, group_advantages, policy_loss, reward_std
from seekstack.posttrain.rewards import RewardWeights
from seekstack.posttrain.rollout import (
    Rollout,
    completion_logps,
    require_prompt_room,
    sample_groups,
    task_prompts,
    trained_tokens,
)
from seekstack.posttrain.sft import tokenizer_info
from seekstack.posttrain.tasks import Problem, Task, make_task, sample_problems, split_of
from seekstack.posttrain.tasks.base import HELDOUT_PERCENT
from seekstack.posttrain.tasks.problems_file import ProblemsFile
from seekstack.train.runs import refuse_new_run_into
from seekstack.train.trainer import TrainResult, told_if_interrupted_before_training, train

PROMPT_SAMPLE = 256  # training problems whose prompts are measured against max_prompt_length before the run starts
# What a generation batch is made under: the distribution its completions and log-probabilities are of, its groups,
# the completions' cap, and the rewards and their normalisation that give its advantages.
BATCH_SETTINGS = ("temperature", "num_generations", "max_completion_length", "format_weight", "scale_rewards")


def measured_problems(task: Task, seed: int) -> list[Problem]:
    """The training problems whose prompts are measured against max_prompt_length before the run starts: all of a
    file of problems (its longest question may stand on any line), else PROMPT_SAMPLE draws of a generator (whose
    prompts at one difficulty are alike in length)."""
    if isinstance(task, ProblemsFile):
        training = [problem for problem in task.problems if split_of(problem.key) == "train"]
        if not training:
            raise ConfigError(
                f"has value {task.name}: its {len(task.problems)} questions are all held out (each question's split "
                f"is its hash's, {HELDOUT_PERCENT}% held out for pass-at-k and eval), leaving none to train on; add "
                "questions to the file",
                field="task",
            )
        return training
    return sample_problems(task, PROMPT_SAMPLE, "train", seed)


class GRPOSource:
    """Generation batches from the policy being trained, and the GRPO loss on them."""

    chooses_threads = True  # with threads="auto", each generation batch sets its training half's threads
    progress_metrics = ("reward", "accuracy")  # on the progress line: GRPO's loss is ~0 by construction

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.tokenizer = run_tokenizer(config)
        self.tokenizer_info = tokenizer_info(self.tokenizer)
        self.task = make_task(config.task, config.difficulty)
        sample = measured_problems(self.task, config.seed)
        prompts = task_prompts(self.tokenizer, sample)
        require_prompt_room(self.task, sample, prompts, config.max_prompt_length)
        self.weights = RewardWeights(correctness=1.0, format=config.format_weight)
        self.generation = 0  # generation batches started so far (counted on the trainer's thread as each starts)
        self.iteration = 0  # optimizer steps taken on the current batch
        self.current: dict[str, Any] | None = None
        self.ahead: Future | None = None  # with async_rollouts: the next generation batch, being sampled
        self.save_wait_s = 0.0  # checkpoints' waits for the batch sampled ahead since the last step logged them
        self.train_threads = 1  # with threads="auto": the training half's, chosen at each generation batch

    def attach(self, model: nn.Module) -> None:
        """Build the engine on the trained model itself (with async_rollouts on a copy of it), and the frozen
        reference when beta > 0."""
        self.model = model
        self.sampler = copy.deepcopy(model).eval().requires_grad_(False) if self.config.async_rollouts else model
        self.ahead_thread = ThreadPoolExecutor(1, thread_name_prefix="rollouts") if self.config.async_rollouts else None
        self.device = next(model.parameters()).device
        self.most_threads = torch.get_num_threads()  # with threads="auto", the training half's limit
        rows = self.config.batch_size * self.config.num_generations
        self.engine = Engine(
            self.sampler,
            self.tokenizer,
            max_batch_size=rows,
            max_model_len=self.config.max_prompt_length + self.config.max_completion_length,
            compile=self.config.compile_decode,
            eager_lone_row=True,  # a rollout's longest completion alone at its end: no second graph to compile
        )
        model.train()
        self.reference = None
        if self.config.beta > 0:  # GRPOConfig.validate: then init_from is given
            self.reference = load_pretrained(self.config.init_from, dtype=torch.float32, device=self.device).eval()
            self.reference.requires_grad_(False)

    def batch(self, batch_size: int, progress: float) -> dict[str, Any]:
        # `>=`: a run resumed at fewer num_iterations than its saved batch has had yet samples anew
        if self.current is None or self.iteration >= self.config.num_iterations or self._lacks_sampling_logps():
            self.current = self._next_generation(batch_size, progress)
            self.iteration = 0
        if self.reference is not None and self.current["ref_logps"] is None:  # sampled by a run resumed at beta > 0
            self.current["ref_logps"] = self._reference_logps(self.current["rollout"])
        self.iteration += 1
        if self.config.threads == "auto":
            torch.set_num_threads(self.train_threads)  # the trainer's forward, backward and step; run_rl restores
        return self.current

    def _lacks_sampling_logps(self) -> bool:
        """Whether the current batch, saved by a run at num_iterations=1 and resumed at more (or with async_rollouts),
        lacks its sampling weights' log-probabilities: those weights are gone, so it cannot be trained on again."""
        needs_them = self.config.num_iterations > 1 or self.sampler is not self.model
        return needs_them and self.current is not None and self.current["old_logps"] is None

    def _next_generation(self, batch_size: int, progress: float) -> dict[str, Any]:
        """This step's generation batch; with async_rollouts the one sampled ahead (the first run's is sampled here),
        and the next one starts on the rollout thread with the weights as they are now, unless no step will use it."""
        if self.ahead_thread is None:
            return self._generate(batch_size, self._started())
        threads = 1 if self.config.threads == "auto" else torch.get_num_threads()
        waited = time.perf_counter()
        batch = self._generate_on(threads, batch_size, self._started()) if self.ahead is None else self.ahead.result()
        batch["wait_s"] = time.perf_counter() - waited  # of the step: what the rollouts did not hide
        self.ahead = None
        step = round(progress * self.config.max_steps)
        if step + self.config.num_iterations < self.config.max_steps:
            self.sampler.load_state_dict(self.model.state_dict())  # in place: the engine's graph reads the same tensors
            self.ahead = self.ahead_thread.submit(self._generate_on, threads, batch_size, self._started())
        return batch

    def _started(self) -> int:
        """The number of the generation batch starting now (its seed's), counted here, on the trainer's thread: a
        rollout still running on the rollout thread never changes the count a rewind or a checkpoint reads."""
        self.generation += 1
        return self.generation - 1

    def _generate_on(self, threads: int, batch_size: int, generation: int) -> dict[str, Any]:
        """`_generate` on the rollout thread, which takes its own thread count (an OpenMP setting is per thread)."""
        torch.set_num_threads(threads)
        return self._generate(batch_size, generation)

    @torch.no_grad()
    def _generate(self, batch_size: int, generation: int) -> dict[str, Any]:
        config = self.config
        problems = sample_problems(self.task, batch_size, "train", seed=config.seed * 1_000_003 + generation)
        self.engine.reset_prefix_cache()  # prompt prefixes cached before the last optimizer step hold stale values
        self.sampler.eval()  # as the engine's compiled decode step was traced
        compile_s = self.engine.compile_s
        auto = config.threads == "auto" and self.ahead_thread is None  # torch's thread setting is the process's
        idle = IdleCores()
        with running_on(1) if auto else contextlib.nullcontext():
            rollout = sample_groups(
                self.engine,
                self.task,
                problems,
                config.num_generations,
                config.max_completion_length,
                config.temperature,
                seed=config.seed * 1_000_003 + generation,
                weights=self.weights,
                top_p=config.top_p,
                top_k=config.top_k,
                min_p=config.min_p,
                max_prompt_length=config.max_prompt_length,
            )
        if auto:
            self.train_threads = threads_beside(idle.idle(), self.most_threads)
            torch.set_num_threads(self.train_threads)
        self.sampler.train(self.sampler is self.model)  # the trained model back to training; a copy stays in eval
        batch: dict[str, Any] = {
            "rollout": rollout,
            "advantages": group_advantages(rollout.rewards, config.num_generations, config.scale_rewards),
            "old_logps": None,
            "ref_logps": None,
            "fresh": True,
            "compile_s": self.engine.compile_s - compile_s,  # of the rollout's generate_s
            "settings": self._batch_settings(),
        }
        if config.num_iterations > 1 or self.sampler is not self.model:  # else the old policy is the current one
            batch["old_logps"] = completion_logps(self.sampler, rollout, config.temperature, self.device)[0]
        if self.reference is not None:
            batch["ref_logps"] = self._reference_logps(rollout)
        return batch

    @torch.no_grad()
    def _reference_logps(self, rollout: Rollout) -> torch.Tensor:
        """(N, C) log-probabilities of the rollout's completions under the frozen starting checkpoint."""
        return completion_logps(self.reference, rollout, self.config.temperature, self.device)[0]

    def loss(self, model: nn.Module, batch: dict[str, Any], mtp_loss_weight: float) -> tuple[ModelOutput, dict]:
        config, rollout = self.config, batch["rollout"]
        logps, entropy, out = completion_logps(model, rollout, config.temperature, self.device)
        mask = rollout.completion_mask
        if config.mask_truncated_completions:
            mask = mask * rollout.ended(self.tokenizer.eos_id)[:, None]
        mask = mask.to(self.device)
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
            config.importance_sampling_level,
        )
        metrics = rollout_metrics(rollout, self.tokenizer.eos_id)
        metrics |= reward_spread_metrics(rollout.rewards, config.num_generations, config.scale_rewards)
        if result.kl is not None:  # beta > 0: at 0 no reference is scored, so there is no KL to log (as TRL logs none)
            metrics["kl"] = result.kl
        metrics |= {
            "clip_fraction": result.clip_fraction,
            "clip_low_fraction": result.clip_low_fraction,
            "clip_high_fraction": result.clip_high_fraction,
            "entropy": float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)),
            "completion_tokens": float(mask.sum()),  # the tokens the loss is on (summed over micro-batches)
            "generate_s": rollout.generate_s if batch["fresh"] else 0.0,
            "compile_s": batch.get("compile_s", 0.0) if batch["fresh"] else 0.0,  # absent in older checkpoints
            "threads": torch.get_num_threads(),  # of this training half
        }
        if "wait_s" in batch:  # async_rollouts: the step's wait for its batch, generate_s being beside the training
            metrics["wait_s"] = batch["wait_s"] if batch["fresh"] else 0.0
        if self.ahead_thread is not None:  # and a checkpoint's, before this step, for the batch it saved
            metrics["save_wait_s"], self.save_wait_s = self.save_wait_s, 0.0
        batch["fresh"] = False
        return dataclasses.replace(out, logits=None, loss=result.loss, lm_loss=result.loss.detach()), metrics

    def tokens(self, batch: dict[str, Any]) -> tuple[int, int]:
        return trained_tokens(batch["rollout"])

    def position(self) -> dict[str, Any]:
        """Where the source stands, for the trainer to rewind to in this process (its mark at each step's start): as
        `state_dict`, but a batch being sampled ahead is kept as its Future, not waited for, so the step's wait for
        it is the step's own, counted in its wait_s and step_s."""
        current = None if self.current is None else dict(self.current)  # its "fresh" as it is now
        return {"generation": self.generation, "iteration": self.iteration, "current": current, "ahead": self.ahead}

    def rewind(self, position: dict[str, Any]) -> None:
        """Back to `position()`. A rollout the interrupted step started after it is waited out first: it samples with
        the engine and the sampler a later rollout takes; its batch is dropped, its number to be drawn again."""
        if self.ahead is not None and self.ahead is not position["ahead"]:
            wait([self.ahead])
        self.generation, self.iteration = position["generation"], position["iteration"]
        self.current = None if position["current"] is None else dict(position["current"])
        self.ahead = position["ahead"]

    def state_dict(self) -> dict[str, Any]:
        """Position and batches; a batch being sampled ahead is waited for and saved with them (a checkpoint's wait,
        after its step, logged as the next step's save_wait_s: a step's own mark is `position`)."""
        waited = time.perf_counter()
        ahead = None if self.ahead is None else self.ahead.result()
        self.save_wait_s += time.perf_counter() - waited
        return {
            "generation": self.generation,
            "iteration": self.iteration,
            "current": None if self.current is None else _stored(self.current),
            "ahead": None if ahead is None else _stored(ahead),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Position and batches; a saved batch made under other BATCH_SETTINGS than this run's is dropped, and a new
        one sampled in its place: its log-probabilities (old policy's, reference's), groups or advantages are those
        settings', and the weights that sampled it, to score it again, are gone."""
        self.generation, self.iteration = state["generation"], state["iteration"]
        self.current = self._restored(state["current"])
        self.ahead = None
        ahead = self._restored(state.get("ahead"))  # absent in checkpoints of older versions
        if ahead is not None:
            self.ahead = Future()
            self.ahead.set_result(ahead)

    def _restored(self, stored: dict[str, Any] | None) -> dict[str, Any] | None:
        """A saved generation batch as `_generate` made it; None for none, or for one made under other settings (a
        batch of an older version records none: it is kept)."""
        if stored is None or stored.get("settings", self._batch_settings()) != self._batch_settings():
            return None
        return {**stored, "rollout": Rollout(**stored["rollout"])}

    def _batch_settings(self) -> dict[str, Any]:
        return {name: getattr(self.config, name) for name in BATCH_SETTINGS}


def _stored(batch: dict[str, Any]) -> dict[str, Any]:
    return {**batch, "rollout": dataclasses.asdict(batch["rollout"])}


def reward_spread_metrics(rewards: torch.Tensor, group_size: int, scale_rewards: ScaleRewards) -> dict[str, float]:
    """reward_std: the mean of the std the advantages divide by, the groups' (the batch's with scale_rewards=batch), as
    TRL 0.x logged it (TRL 1.16: the batch's at any scale_rewards); frac_reward_zero_std: the share of completions
    whose group's rewards are all equal, which gives them no advantage and no gradient at any scale_rewards (TRL 1.16
    at batch tests the batch's std instead, 0 unless every reward is equal)."""
    groups_std = reward_std(rewards, group_size, "group")
    return {
        "reward_std": float(reward_std(rewards, group_size, scale_rewards).mean()),
        "frac_reward_zero_std": float(torch.isclose(groups_std, torch.zeros_like(groups_std)).float().mean()),
    }


def rollout_metrics(rollout: Rollout, eos_id: int) -> dict[str, float]:
    """Reward mean, each term's mean and std, accuracy, completion lengths overall, of correct and of wrong ones, and
    the share of completions cut at max_completion_length before their EOS (TRL's completions/clipped_ratio), which
    score 0."""
    metrics = {"reward": float(rollout.rewards.mean())}
    for name, values in rollout.terms.items():
        metrics[f"reward_{name}"] = float(values.mean())
        metrics[f"reward_{name}_std"] = float(values.std())
    correct = rollout.terms["correctness"] > 0
    lengths = rollout.completion_lengths.float()
    metrics["accuracy"] = float(correct.float().mean())
    metrics["completion_length"] = float(lengths.mean())
    metrics["truncated_fraction"] = float((~rollout.ended(eos_id)).float().mean())
    if correct.any():
        metrics["completion_length_correct"] = float(lengths[correct].mean())
    if (~correct).any():
        metrics["completion_length_incorrect"] = float(lengths[~correct].mean())
    return metrics


def run_rl(config: GRPOConfig, resume: bool | str | Path = False) -> TrainResult:
    """GRPO from `init_from` (or a fresh preset) on the task `config` names."""
    config = config.validate(resume=bool(resume))
    if not resume:
        refuse_new_run_into(config.out_dir)  # before the rollout engine is built
    with configured_threads(config.threads):  # before the source: its engine starts on the run's threads
        with told_if_interrupted_before_training(resume):
            source = GRPOSource(config)
        return train(config, resume=resume, source=source)
