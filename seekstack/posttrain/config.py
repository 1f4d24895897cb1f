"""The configs of `seekstack sft` and `seekstack rl`: TrainConfig (loop, optimizer, checkpoints) plus each stage's
own fields, read and checked the same way (YAML/TOML/JSON + key=value, seekstack/schema.py)."""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, TypeVar

from annotated_types import Ge, Interval

from seekstack.config import ConfigError, ModelConfig
from seekstack.corpus.split import share_count
from seekstack.posttrain.tasks import DifficultyRefused, Task, make_task
from seekstack.posttrain.tasks.problems_file import is_problems_file
from seekstack.schema import (
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    nested_config,
    require,
)
from seekstack.train.config import TrainConfig, require_tokenizer_file

if TYPE_CHECKING:
    from seekstack.tokenizer import Tokenizer

# TRL's options for a LoRA adapter (its ModelConfig's --use_peft, --lora_r, ...), which sft and distill do not train
TRL_LORA_NAMES = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "use_dora")
# TRL's script arguments, which every `trl sft --model_name_or_path M --dataset_name D` gives: what sft and distill
# say of them (`lora train` takes its base and data as arguments)
TRL_SCRIPT_NOTES = {
    "model_name_or_path": "TRL's model_name_or_path (the model trained) is init_from here: a checkpoint folder or a "
    "run's out_dir (a Hugging Face Hub model is downloaded first: `hf download NAME` prints its folder)",
    "dataset_name": "TRL's dataset_name is data here: a JSONL file of conversations (a Hugging Face Hub dataset is "
    'written to one first: datasets\' load_dataset(NAME, split="train").to_json("chats.jsonl"))',
}
DEFAULT_VAL_FRACTION = 0.05  # of the conversations held out for val_loss, while eval_every > 0
PROMPT_TOKENS = 192  # room for a task's prompt in the engine's cache, per request: rl's default max_prompt_length
TOKENIZER_OF_INIT_FROM = "its tokenizer (tokenizer is unset)"  # what a run encoding with init_from's reads of it


Posttraining = TypeVar("Posttraining", "ConversationConfig", "GRPOConfig")  # a config with a task


@dataclass
class ConversationConfig(TrainConfig):
    """TrainConfig plus the conversations a run trains on (`data`, else `examples` generated traces of `task`) and
    those it holds out for `val_loss` (`val_data`, else `val_fraction` of them): `seekstack sft`'s, and `seekstack
    distill`'s on conversations."""

    # what to say of TRL's SFTConfig names (GKDConfig's too, an SFTConfig) that are none of these fields
    # (schema.known_fields)
    field_notes: ClassVar[dict[str, str]] = {
        "max_length": "TRL's max_length is seq_len here (a longer row is cut, keeping its start)",
        "padding_free": "TRL's padding_free (no padding computed) is packing=true here, rows of up to seq_len tokens",
        "packing_strategy": 'packing=true packs as TRL\'s "bfd" does (best-fit decreasing, each conversation on its '
        'own, cut at seq_len keeping its start); "bfd_split", which trains the rest of a longer one as a sequence of '
        'its own, and "wrapped", which lets them see each other, are not offered',
        "num_train_epochs": "a run is max_steps optimizer steps, whatever the epochs they make",
        "per_device_train_batch_size": "TRL's per_device_train_batch_size is batch_size here",
        "gradient_accumulation_steps": "TRL's gradient_accumulation_steps is grad_accum_steps here",
        "learning_rate": "TRL's learning_rate is lr here",
        # transformers' TrainingArguments names, which TRL's SFTConfig takes too
        "max_seq_length": "TRL's max_seq_length (max_length since TRL 0.20) is seq_len here",
        "eval_steps": "transformers' eval_steps (steps between evaluations) is eval_every here",
        "save_steps": "transformers' save_steps (steps between checkpoints) is save_every here",
        "max_grad_norm": "transformers' max_grad_norm is grad_clip here",
        "warmup_ratio": "transformers' warmup_ratio is a share of the steps; warmup_steps here counts them: "
        "warmup_steps = warmup_ratio x max_steps",
        "bf16": "transformers' bf16=true is dtype=bfloat16 here",
        "assistant_only_loss": "the loss is on the assistant's tokens alone, always (TRL's assistant_only_loss=True)",
        "completion_only_loss": "a prompt-completion line trains its completion alone, always",
        **{
            name: f"TRL's {name} is for a LoRA adapter; this trains the whole model: `seekstack lora train BASE "
            "DATA.jsonl` trains an adapter on the same conversations (lora.rank, lora.alpha, ...)"
            for name in TRL_LORA_NAMES
        },
        "eval_packing": "held-out conversations are packed when packing=true, as TRL's eval_packing (which follows "
        "packing) packs them; their val_loss is the one they give padded",
        # TRL's SFTConfig names with no field here (some were asked "did you mean" one that is another thing)
        "truncation_mode": "rows are cut at seq_len keeping their start, as TRL's truncation_mode=keep_start (its "
        "default and, since TRL 1.x, its only value) cuts them",
        "eos_token": "an assistant turn ends with the tokenizer's EOS, which the chat template writes and the loss "
        "trains (TRL's eos_token left at its default, the tokenizer's)",
        "pad_token": "padding is masked out of the loss and the balance loss, whatever its id: no pad token is set",
        "loss_type": "the loss is the cross-entropy on the trained tokens (TRL's SFT loss_type=nll, its default); "
        "dft is not offered",
        "activation_offloading": "TRL's activation_offloading (activations kept in CPU memory) is not offered; "
        "activation_checkpointing=true (recomputing them in the backward) saves that memory here",
    }
    # what a run holding none of its conversations out while evaluations are due is told to do
    held_out_advice: ClassVar[str] = "set val_data or val_fraction"
    # whether TRL's standard prompt-completion lines (text, no chat template) are read: `lora train`'s
    text_completions: ClassVar[bool] = False
    data: str = ""  # JSONL of {"messages": [...]} or {"prompt": [...], "completion": [...]}; "" = traces of `task`
    # A TASKS name, your own module:Class or a problems .jsonl; distill: "" with `data` "" = data_dir's token shards
    task: str = ""
    difficulty: Positive | None = None  # the task's knob (digits, numbers); None = its default
    examples: Positive = 4000  # generated conversations when `data` is ""
    val_data: str = ""  # JSONL of held-out conversations (as `data`) for val_loss; "" = val_fraction of the data
    # Share held out for val_loss: of `data`'s conversations (chosen by content hash, every copy of each, never
    # trained on), or with `task` that share of `examples` as distinct problems of the task's held-out split.
    # None = 0.05 while eval_every > 0 (rounded down: a file of fewer than 20 conversations holds none out), else 0.
    val_fraction: Fraction | None = None

    @property
    def conversational(self) -> bool:
        """Whether the rows are conversations (`data` or `task`); only distillation has another source."""
        return bool(self.data or self.task)

    @property
    def reads_data_dir(self) -> bool:
        return not self.conversational

    def read_from_init_from_on_resume(self) -> str:
        return TOKENIZER_OF_INIT_FROM if self.conversational and not self.tokenizer else ""

    @property
    def held_out_fraction(self) -> float:
        """The share of the conversations this run holds out (the module's `held_out_fraction` of its fields)."""
        return held_out_fraction(self.val_data, self.val_fraction, self.eval_every)

    def validate(self, source: str | None = None, resume: bool = False) -> ConversationConfig:
        return with_problems_file_absolute(super().validate(source, resume))

    def to_dict(self) -> dict:
        return _loop_fields(self)


@dataclass
class SFTConfig(ConversationConfig):
    """Chat SFT: TrainConfig's loop on conversations, the loss on assistant tokens only, evaluated every `eval_every`
    steps on up to `eval_batches` batches of held-out conversations (`val_loss`, assistant tokens only). `data_dir`
    and `mixture` are unused; `init_from` is the starting checkpoint ("" = a fresh `model` preset)."""

    field_notes: ClassVar[dict[str, str]] = {**ConversationConfig.field_notes, **TRL_SCRIPT_NOTES}

    out_dir: str = "runs/sft"
    seq_len: Positive = 256  # rows longer than this are cut
    batch_size: Positive = 16  # conversations per micro-batch, right-padded to the longest (packing: packed rows)
    max_steps: Positive = 300
    lr: PositiveFloat = 1e-3
    min_lr: NonNegativeFloat = 1e-4
    warmup_steps: NonNegative = 20
    eval_every: NonNegative = 50  # steps between evaluations on the held-out conversations; 0 = none
    save_every: NonNegative = 0
    keep_checkpoints: NonNegative = 1
    task: str = "addition"  # with `data` "": this task's generated traces

    def validate(self, source: str | None = None, resume: bool = False) -> SFTConfig:
        config = super().validate(source, resume)
        require_task(config.task, source, config.difficulty)
        _require_tokenizer(config, source)
        try:
            require_conversation_fields(config)
        except ConfigError as error:
            raise error.at(source) from None
        return config


@dataclass
class GRPOConfig(TrainConfig):
    """R1-style GRPO on a verifiable task (DeepSeek-Math §4.1, with TRL's options): each step samples
    `num_generations` completions for each of `batch_size` prompts from the policy being trained. The TrainConfig
    fields of UNUSED_BY_RL are refused at any value but their default; `data_dir` is unused too (not checked: a
    saved run's holds the default resolved where the run started)."""

    # what to say of TRL's GRPOConfig names that are none of these fields (schema.known_fields)
    field_notes: ClassVar[dict[str, str]] = {
        "learning_rate": "TRL's learning_rate is lr here",
        "per_device_train_batch_size": "TRL's per_device_train_batch_size counts completions; batch_size here counts "
        "prompts, each sampled num_generations times (a step trains on batch_size x num_generations completions)",
        "generation_batch_size": "TRL's generation_batch_size (completions sampled at once) is batch_size x "
        "num_generations here",
        "gradient_accumulation_steps": "TRL's gradient_accumulation_steps is grad_accum_steps here, which rl keeps at "
        "1: a step trains on its whole generation batch",
        "steps_per_generation": "a generation batch is trained whole by each of num_iterations optimizer steps (TRL's "
        "num_iterations); TRL's steps_per_generation, which splits it over several steps, is not offered",
        "num_train_epochs": "a run is max_steps optimizer steps, whatever the epochs they make",
        "reward_weights": "the reward is correctness + format_weight x format here, the task (task=) its verifier: "
        "TRL's reward_weights=[1, w] over an accuracy and a format reward is format_weight=w",
        "delta": "TRL's delta (INTELLECT-2's two-sided clipping) is not offered; epsilon_high (DAPO's clip-higher) is",
        "multi_objective_aggregation": "the reward terms are summed, then the sum normalised in its group, as TRL's "
        "multi_objective_aggregation=sum_then_normalize (its default) does; normalize_then_sum (GDPO's) is not offered",
        "repetition_penalty": "TRL's repetition_penalty is not offered: rollouts are sampled at temperature, top_p, "
        "top_k and min_p alone (TRL's default repetition_penalty=1.0 penalises nothing)",
        "reward_funcs": "the reward is the task's (task=: a built-in, your module:Class or a problems .jsonl), its "
        "verifier's correctness + format_weight x format",
        "use_vllm": "rollouts always run on seekstack's inference engine, built on the model being trained (no "
        "server, no weight sync; async_rollouts=true samples the next batch beside this one's training)",
        "log_completions": "rl logs no completions; `seekstack traces CHECKPOINT` samples a checkpoint's and writes "
        "the verified ones",
        "num_completions_to_print": "rl prints no completions; `seekstack traces CHECKPOINT` samples a checkpoint's "
        "and writes the verified ones",
        # _mode and the clips were asked "did you mean 'importance_sampling_level'?", another thing
        **dict.fromkeys(
            (
                "vllm_importance_sampling_correction",
                "vllm_importance_sampling_cap",
                "vllm_importance_sampling_mode",
                "vllm_importance_sampling_clip_min",
                "vllm_importance_sampling_clip_max",
            ),
            "TRL's vLLM importance sampling correction (its loss weighed by the trainer's over vLLM's probability of "
            "each sampled token) is not offered: rollouts are sampled by seekstack's engine on the trained model "
            "itself, not by vLLM, its log-probabilities the learner's within 1e-4 in float32 "
            "(importance_sampling_level is GSPO's ratio per token or sequence)",
        ),
        "generation_kwargs": "TRL's generation_kwargs is not offered; rollouts are sampled at temperature, top_p, "
        "top_k and min_p (fields here), the distribution the loss's log-probabilities are of",
        "top_entropy_quantile": "TRL's top_entropy_quantile (the loss on each completion's highest-entropy tokens "
        "alone) is not offered; every completion token is trained (mask_truncated_completions leaves cut ones out)",
        # TRL names whose closest field here is another thing ("did you mean" would lead a TRL user astray)
        "num_generations_eval": "TRL's num_generations_eval (completions per prompt at evaluation) is not offered: rl "
        "evaluates nothing during the run; `seekstack pass-at-k CHECKPOINT --samples K` scores a checkpoint's held-out "
        "problems (num_generations is the training group)",
        "vllm_max_model_length": "rollouts run on seekstack's engine, whose context is max_prompt_length + "
        "max_completion_length (within the model's)",
        **dict.fromkeys(
            ("sapo_temperature_pos", "sapo_temperature_neg"),
            "TRL's SAPO (loss_type=sapo, a soft gate in place of the clip) is not offered, nor its gate's "
            "temperatures (temperature here is the rollouts' sampling temperature)",
        ),
        # verl's names (actor_rollout_ref.actor, algorithm, data) for fields here
        "loss_agg_mode": "verl's loss_agg_mode is loss_type here: token-mean is dapo, seq-mean-token-mean grpo, "
        "seq-mean-token-sum-norm dr_grpo (whose constant is max_completion_length)",
        **dict.fromkeys(
            ("clip_ratio", "clip_ratio_low"),
            "verl's clip_ratio (clip_ratio_low) is epsilon here, the ratio's bound 1 - epsilon (and 1 + epsilon "
            "unless epsilon_high is given)",
        ),
        "clip_ratio_high": "verl's clip_ratio_high (DAPO's clip-higher) is epsilon_high here",
        "ppo_epochs": "verl's ppo_epochs (updates on each generation batch) is num_iterations here",
        "kl_loss_coef": "verl's kl_loss_coef (with use_kl_loss and kl_loss_type=low_var_kl, the k3 KL in the loss) is "
        "beta here",
        "use_kl_loss": "the k3 KL to the starting checkpoint is in the loss whenever beta > 0 (verl's use_kl_loss with "
        "kl_loss_coef=beta)",
        "max_response_length": "verl's max_response_length is max_completion_length here",
        "norm_adv_by_std_in_grpo": "verl's norm_adv_by_std_in_grpo=true is scale_rewards=group here, false (Dr. "
        "GRPO's) scale_rewards=none",
        "dataset_name": "TRL's dataset_name (prompts and the solution column its accuracy_reward verifies against) is "
        'task here: a problems .jsonl of {"question", "answer"}, {"problem", "solution"} or its own {"prompt", '
        '"solution"} lines (a Hugging Face Hub dataset is written to one first: datasets\' load_dataset(NAME, '
        'split="train").to_json("problems.jsonl"))',
        # transformers' TrainingArguments names, which TRL's GRPOConfig takes too, as sft names them
        **{
            name: ConversationConfig.field_notes[name]
            for name in ("save_steps", "max_grad_norm", "warmup_ratio", "bf16")
        },
        "model_name_or_path": TRL_SCRIPT_NOTES["model_name_or_path"],
    }
    # refused values that other tools take, with what to give here (schema.check adds the note to the refusal)
    value_notes: ClassVar[dict[str, dict[object, str]]] = {
        "scale_rewards": {
            True: "TRL's scale_rewards=true (its std within each group) is scale_rewards=group",
            False: "TRL's scale_rewards=false (no std) is scale_rewards=none",
        },
        "max_prompt_length": {
            None: "TRL's max_prompt_length=None (no prompt cut) is how rl takes every prompt: none is cut; "
            "max_prompt_length is the room the engine keeps for one, and a longer prompt is refused before the run "
            "naming its length: leave it at its default or give that length",
        },
        "loss_type": {
            "bnpo": "TRL's bnpo (the token mean over a micro-batch) is what dapo computes here, where a step trains "
            "on its whole generation batch at once: give loss_type=dapo",
            # verl's loss_agg_mode names
            "token-mean": "verl's token-mean (over the batch's tokens) is loss_type=dapo",
            "seq-mean-token-mean": "verl's seq-mean-token-mean (each completion's token mean, then their mean) is "
            "loss_type=grpo",
            "seq-mean-token-sum-norm": "verl's seq-mean-token-sum-norm (Dr. GRPO's: each completion's token sum over "
            "a constant length) is loss_type=dr_grpo, whose constant is max_completion_length",
            # TRL's losses that are no clipped surrogate of GRPO's
            **dict.fromkeys(
                ("cispo", "sapo", "luspo", "vespo"),
                "TRL's cispo, sapo, luspo and vespo losses are not offered: the loss here is GRPO's clipped surrogate, "
                "aggregated as grpo, dr_grpo or dapo (with importance_sampling_level=sequence, GSPO's)",
            ),
        },
    }
    out_dir: str = "runs/rl"
    batch_size: Positive = 4  # prompts per generation batch; each brings num_generations completions
    max_steps: Positive = 100
    lr: PositiveFloat = 1e-4
    min_lr: NonNegativeFloat = 1e-4
    warmup_steps: NonNegative = 0
    weight_decay: NonNegativeFloat = 0.0
    eval_every: NonNegative = 0
    save_every: NonNegative = 0
    keep_checkpoints: NonNegative = 1
    bias_update_rate: NonNegativeFloat = 0.0
    task: str = "addition"
    difficulty: Positive | None = None
    num_generations: Positive = 8  # G, completions per prompt (at least 2: advantages compare a group's rewards)
    # Tokens a rollout leaves each prompt (TRL's name): the engine's cache holds it and max_completion_length per
    # request, within the model's context. A longer prompt is refused, naming its length, not cut from the left as
    # TRL 0.x's GRPOTrainer and its 1.16 experimental trainers do (at 512): the cut would drop the start of the
    # question the verifier scores (TRL 1.16's GRPOTrainer cuts none and has no such field).
    max_prompt_length: Positive = PROMPT_TOKENS
    max_completion_length: Positive = 64
    temperature: PositiveFloat = 1.0
    # Rollouts sample among the likeliest tokens whose probability reaches top_p (1 = all), among the top_k likeliest
    # (0 = all; -1 too, vLLM's off and verl's rollout default, as the engine's SamplingParams takes it) and among
    # those at least min_p times the likeliest's probability (0 = all), as TRL's (and verl's); the loss's
    # log-probabilities are of the whole distribution at the temperature, as theirs are.
    top_p: Annotated[float, Interval(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Ge(-1)] = 0
    min_p: Fraction = 0.0
    num_iterations: Positive = 1  # policy updates (optimizer steps) per generation batch (mu)
    epsilon: Fraction = 0.2  # clip range below 1 of the importance ratio
    # clip range above 1 (DAPO's clip-higher), any size: the ratio's bound 1 + epsilon_high; None = epsilon
    epsilon_high: NonNegativeFloat | None = None
    beta: NonNegativeFloat = 0.0  # weight of the k3 KL to the starting policy; 0 keeps no reference model
    # DeepSeek-Math's per-completion mean (grpo) by default; TRL 1.16's default is dapo (the batch's token mean)
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    # The importance ratio of each token, or one per completion (GSPO, TRL's importance_sampling_level="sequence":
    # the exp of its tokens' mean log ratio, clipped as a whole; its paper clips at epsilon=3e-4, epsilon_high=4e-4)
    importance_sampling_level: Literal["token", "sequence"] = "token"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # what the advantages are divided by the std of
    format_weight: NonNegativeFloat = 0.1  # reward = correctness + format_weight * format
    # Leave completions cut at max_completion_length before their EOS out of the loss (DAPO's overlong filtering,
    # TRL's mask_truncated_completions): they still count in their group's advantages, where they score 0.
    mask_truncated_completions: bool = False
    # Rollouts decode through torch.compile, one graph for the run (logged as `compile_s`): on a 2-core Zen 3 a step
    # of 2 x 8 x 64 tokens saves ~0.15-0.2 s, a 300-step run more than the ~10-45 s compile. Not the engine's
    # compile-when-worth-it mode (compile=None): its switch to compiled logits falls at a wall-clock time, so a
    # seeded run could sample other tokens when repeated or resumed.
    compile_decode: bool = True
    # CPU threads. A small model's ops are thin: split over threads, each ends in a barrier, and with any other job
    # on the machine the barrier waits a time slice for a descheduled thread. On a 2-core Zen 3 at load ~3 the demo
    # checkpoint's forward + backward + AdamW step took 454 ms on 1 thread vs 9.6 s on 2 at 1k tokens, 6.4 s vs 30 s
    # at 16k; quiet, 2 threads took it from ~220 to ~185 ms. "auto": rollouts on one thread, and the training half
    # (old/reference log-probs, forward, backward, optimizer) on one more thread per core the machine left idle
    # while they ran (infer/threads.py IdleCores), at most torch's setting; N: the whole run on N; 0: on torch's.
    threads: NonNegative | Literal["auto"] = "auto"
    # Generate the next batch on a copy of the policy while this batch trains (one step off-policy, as verl's and
    # PipelineRL's asynchronous rollouts): each batch after the first is sampled by the weights one update behind
    # those it trains, its importance ratio taken against the sampling weights' log-probabilities. The two halves run
    # side by side on two threads of one process; with threads="auto" each takes one core, with N both share torch's N.
    async_rollouts: bool = False

    @property
    def reads_data_dir(self) -> bool:
        return False

    def read_from_init_from_on_resume(self) -> str:
        reference = "the reference model of its KL penalty (beta > 0)" if self.beta > 0 else ""
        return " and ".join(filter(None, (reference, "" if self.tokenizer else TOKENIZER_OF_INIT_FROM)))

    def validate(self, source: str | None = None, resume: bool = False) -> GRPOConfig:
        _refuse_unused_by_rl(self, source)  # first: TrainConfig's rules would speak of them as if rl used them
        config = with_problems_file_absolute(super().validate(source, resume))
        require_task(config.task, source, config.difficulty)
        _require_tokenizer(config, source)
        try:
            require(config.grad_accum_steps == 1, "grad_accum_steps", "1 (a step's rollouts are one batch)")
            require(
                config.num_generations >= 2,
                "num_generations",
                f"at least 2, not {config.num_generations}: a completion's advantage is its reward against the mean "
                "and std of its prompt's group, which one completion alone does not have",
            )
            require(
                config.beta == 0 or bool(config.init_from),
                "beta",
                f"0 without init_from, not {config.beta}: its k3 KL is to the reference model, the checkpoint the run "
                "starts from; set init_from, or leave beta at 0",
            )
        except ConfigError as error:
            raise error.at(source) from None
        return config

    def require_rows_within(self, context: int) -> None:
        """A ConfigError naming max_prompt_length or max_completion_length when a rollout's row (its prompt room and
        its completion; seq_len is unused) passes the model's `context`."""
        from seekstack.posttrain.rollout import require_completion_room

        model = self.init_from or f"model={self.model}"
        require_completion_room(
            context, model, self.max_completion_length, "max_completion_length", self.max_prompt_length
        )

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_dict(self) -> dict:
        return _loop_fields(self)


UNSHARDED = "rl samples its prompts from `task`, not from token shards"
NO_MTP = "the GRPO loss has no MTP term"
NO_EVALUATION = "rl evaluates nothing held out during the run; `seekstack pass-at-k` scores its checkpoints"
# TrainConfig fields GRPO never reads, and why. Runs and --write-config files carry them at their defaults.
UNUSED_BY_RL = {
    "seq_len": "a rollout's rows are a prompt and at most max_completion_length tokens",
    "packing": "a rollout's rows are each a prompt and its completion, padded",
    "mixture": UNSHARDED,
    "mixture_mode": UNSHARDED,
    "bandit_reward_scale": UNSHARDED,
    "mtp_loss_weight": NO_MTP,
    "mtp_loss_weight_late": NO_MTP,
    "mtp_switch_fraction": NO_MTP,
    "eval_every": NO_EVALUATION,
    "eval_batches": NO_EVALUATION,
}


def _refuse_unused_by_rl(config: GRPOConfig, source: str | None) -> None:
    """A ConfigError naming the first field of UNUSED_BY_RL set to other than its default, which rl would ignore."""
    defaults = GRPOConfig()
    for name, why in UNUSED_BY_RL.items():
        value, default = getattr(config, name), getattr(defaults, name)
        if value != default:
            problem = f"has value {value!r}: rl does not use it ({why}); leave it at its default {default!r}"
            raise ConfigError(problem, field=name, source=source)


def require_conversation_fields(config: ConversationConfig) -> None:
    """ConfigErrors naming data when it is no file, and val_data or val_fraction when they cannot hold conversations
    out of the run's `data` or `task`, or are set on a (distillation) run on token shards."""
    require_conversations_file(config.data)
    for name in ("val_data", "val_fraction"):
        require(
            config.conversational or getattr(config, name) in ("", None),
            name,
            "unset without data or task (a run on token shards is validated on data_dir's val split)",
        )
    if not config.conversational:
        return
    require_conversations_file(config.val_data, "val_data")
    require(
        not config.val_data or not config.data or not Path(config.val_data).samefile(config.data),
        "val_data",
        "another file than data (held-out conversations are never trained on)",
    )
    fraction = config.val_fraction
    require(fraction is None or fraction < 1, "val_fraction", "below 1 (1 leaves nothing to train on)")
    require(not (config.val_data and fraction), "val_fraction", "0 or unset when val_data is given")
    require(
        bool(config.data) or not fraction or held_out_count(fraction, config.examples) > 0,
        "val_fraction",
        f"0 or at least {least_fraction(1, config.examples)} (1 of examples={config.examples}), to hold out a problem "
        f"of task {config.task}",
    )


def held_out_fraction(val_data: str, val_fraction: float | None, eval_every: int) -> float:
    """The share of an SFT (or conversation distillation) run's data held out: `val_fraction`, or by default
    DEFAULT_VAL_FRACTION while evaluations read it; 0 when a `val_data` file holds the held-out conversations."""
    if val_data:
        return 0.0
    if val_fraction is not None:
        return val_fraction
    return DEFAULT_VAL_FRACTION if eval_every else 0.0


def held_out_count(fraction: float, count: int) -> int:
    """The conversations (or a task's problems) `fraction` holds out of `count`: its share as written, rounded down
    (`share_count`: 0.29 of 100 is 29, where the float product is 28.999999999999996)."""
    return share_count(fraction, count, ROUND_DOWN)


def least_fraction(held: int, count: int) -> str:
    """The least val_fraction of one more decimal place than `count` has digits that holds out `held` of `count`
    (`held_out_count`), as a user writes it: 1 of 3 is 0.34 (0.33 holds out none, and 1/3 is no number the field
    reads), 1 of 7 is 0.15."""
    places = len(str(count)) + 1
    return f"{Decimal(-(-held * 10**places // count)).scaleb(-places).normalize():f}"


def _loop_fields(config: TrainConfig) -> dict:
    """The TrainConfig part of a post-training config: what the trainer's state records (and reads on resume)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}


nested_config(SFTConfig, "model_overrides", ModelConfig, prefix="model")
nested_config(GRPOConfig, "model_overrides", ModelConfig, prefix="model")


def with_problems_file_absolute(config: Posttraining) -> Posttraining:
    """`config` whose task, where it names a file of problems there is, holds its absolute path: train_config.json
    keeps it so, and resume, report and sample find it from any folder (one a train_config.json holds relative is read
    from the working directory)."""
    if is_problems_file(config.task) and Path(config.task).is_file():
        return dataclasses.replace(config, task=str(Path(config.task).absolute()))
    return config


def require_task(task: str, source: str | None = None, difficulty: int | None = None) -> Task:
    """The task `make_task` makes; a ConfigError naming the field task unless `task` names one of TASKS, your own
    module:Class (`task_class`) or a file of problems (read whole), and naming the field difficulty where the task
    refuses `difficulty`."""
    try:
        return make_task(task, difficulty)
    except ValueError as error:
        field = "difficulty" if isinstance(error, DifficultyRefused) else "task"
        raise ConfigError(f": {error}", field=field, source=source) from None


def _require_tokenizer(config: TrainConfig, source: str | None) -> None:
    if not config.tokenizer and not config.init_from:
        problem = "must name a tokenizer.json (or set init_from to a checkpoint)"
        raise ConfigError(problem, field="tokenizer", source=source)


def require_conversations_file(path: str, name: str = "data") -> None:
    """A ConfigError naming the field `name` unless `path` is "" or a file (a folder or a missing path is refused
    up front)."""
    given, why = Path(path), "no such file"
    files = str(given / "*.jsonl") if given.is_dir() else path  # what datasets' data_files would read as one dataset
    matched = glob.glob(files, recursive=True) if given.is_dir() or glob.has_magic(path) else []
    if given.is_dir() or matched:
        held = "a folder" if given.is_dir() else "a pattern"
        why = f"{held}; a run reads one JSONL file"
        if matched and all(name.endswith(".jsonl") for name in matched):  # not a Hub download's *.parquet
            why += f": join its files, cat {files} > conversations.jsonl"
    elif given.exists():  # a pipe (`<(zcat chats.jsonl.gz)`), a device: was told "no such file"
        why = "a named pipe or device, which a run reads again when it resumes: write the conversations to a file"
    require(not path or given.is_file(), name, f"a JSONL file of conversations, not {path!r} ({why})")


def run_tokenizer(config: TrainConfig) -> Tokenizer:
    """The tokenizer a post-training run encodes with: `tokenizer`, else the one in `init_from` (a ConfigError naming
    init_from when it holds none; TrainConfig.validate checked a given `tokenizer`). A `tokenizer` other than the one
    `init_from` holds is a ConfigError naming both: the checkpoint's embeddings would read its ids as other tokens."""
    from seekstack.tokenizer import Tokenizer, tokenizer_json_path

    if not config.tokenizer:
        expectation = "a checkpoint folder with its tokenizer.json (or set tokenizer)"
        require_tokenizer_file(config.init_from, "init_from", expectation)
        return Tokenizer.from_file(tokenizer_json_path(config.init_from))
    tokenizer = Tokenizer.from_file(tokenizer_json_path(config.tokenizer))
    if config.init_from:
        _require_the_checkpoints_tokenizer(tokenizer, config.tokenizer, config.init_from)
    return tokenizer


def _require_the_checkpoints_tokenizer(given: Tokenizer, tokenizer: str, checkpoint: str) -> None:
    """A ConfigError naming `tokenizer` (read as `given`) when `checkpoint` holds a tokenizer.json that is another
    tokenizer (nothing to compare when it holds none)."""
    from seekstack.tokenizer import Tokenizer, tokenizer_json_path

    held = tokenizer_json_path(checkpoint)
    if held.is_file() and given.fingerprint != Tokenizer.from_file(held).fingerprint:
        raise ConfigError(
            f"is {tokenizer!r} ({tokenizer_json_path(tokenizer)}), another tokenizer than {held}, the one "
            f"init_from={checkpoint!r} was trained with: its embeddings would read every id as another token. Leave "
            "tokenizer unset (the checkpoint's is used) or name that one",
            field="tokenizer",
        )
