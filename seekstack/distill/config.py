"""The config of `seekstack distill`: TrainConfig (the student's model, data, loop, optimizer, checkpoints) plus the
teacher and the losses, read and checked the same way (YAML/TOML/JSON + key=value, seekstack/schema.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from seekstack.config import ConfigError, ModelConfig
from seekstack.posttrain.config import (
    TRL_SCRIPT_NOTES,
    ConversationConfig,
    require_conversation_fields,
    require_task,
)
from seekstack.schema import Fraction, NonNegative, NonNegativeFloat, Positive, PositiveFloat, nested_config, require
from seekstack.train.config import require_folder_path, require_tokenizer_file

FeatureLoss = Literal["mse", "cosine"]  # the distance between mapped hidden states
WHOLE_DISTRIBUTION = (  # TRL's DistillationConfig's top_k, top_p and min_p
    "on-policy, the student samples from its whole distribution at sample_temperature (TRL's top_p=1.0 and top_k=0, "
    "its defaults); there is no top-k or top-p here"
)


@dataclass
class DistillConfig(ConversationConfig):
    """Distillation: the student (`model` + `model_overrides`, or `init_from`) trained against a frozen `teacher`
    checkpoint on `data_dir`'s token shards, or on conversations (`data` or `task`, as `seekstack sft` reads them)
    with every loss on the assistant's tokens only. Per micro-batch the loss is ce_weight * CE + kd_weight * T^2 *
    JSD_beta(teacher, student) + sum over mapped layers of weight * feature distance (+ the student's MTP and
    balance terms, as in pretraining); validation scores the student's loss and its divergence from the teacher, on
    data_dir's val split or on the held-out conversations (`val_data` or `val_fraction`, as in `seekstack sft`). On
    conversations (e.g. the teacher's verified traces, `seekstack traces`) `tokenizer` "" is the teacher's, and
    on-policy the student answers each conversation's last trained assistant turn itself, the turns before it the
    prompt."""

    checkpoint_fields = (*ConversationConfig.checkpoint_fields, "teacher")  # a run's out_dir: its newest checkpoint
    # TRL's GKDConfig names that are none of these fields, beside its SFTConfig ones (schema.known_fields)
    field_notes: ClassVar[dict[str, str]] = {
        **ConversationConfig.field_notes,
        **TRL_SCRIPT_NOTES,
        "teacher_model_name_or_path": "TRL's teacher_model_name_or_path is teacher here (a checkpoint folder or a run)",
        "teacher_model_init_kwargs": "the teacher's one load option is teacher_dtype=float32|bfloat16",
        "max_new_tokens": "on-policy, the student answers a conversation's prompt until EOS or seq_len, and continues "
        "a corpus row's first prompt_tokens to seq_len: TRL's max_new_tokens is seq_len less the prompt",
        "seq_kd": "TRL's seq_kd (the teacher's samples in place of the data's answers) is done ahead of the run: "
        "`seekstack traces TEACHER --out traces.jsonl` samples them (kept when verified), then data=traces.jsonl",
        "disable_dropout": "the models have no dropout (TRL's disable_dropout=true)",
        # replaces SFT's note: distill's loss is not SFT's cross-entropy alone
        "loss_type": "the loss is ce_weight x CE + kd_weight x T^2 x JSD_beta(teacher, student) (+ the mapped "
        "layers' feature terms), set by ce_weight, kd_weight, beta and temperature; TRL's SFT loss_type (nll, dft) "
        "is not offered",
        # TRL's DistillationConfig's sampling names: top_k would otherwise be offered cache_top_k, the teacher cache's
        "top_k": f"{WHOLE_DISTRIBUTION} (cache_top_k is the teacher cache's, not sampling's)",
        "top_p": WHOLE_DISTRIBUTION,
        "min_p": f"{WHOLE_DISTRIBUTION}, nor min-p (TRL's min_p=None, its default)",
        **dict.fromkeys(
            ("log_completions", "num_completions_to_print"),
            "distill logs no completions; `seekstack generate` samples a checkpoint's",
        ),
        "max_completion_length": "on-policy, the student answers a conversation's prompt until EOS or seq_len, and "
        "continues a corpus row's first prompt_tokens to seq_len: TRL's max_completion_length is seq_len less the "
        "prompt",
    }

    out_dir: str = "runs/distill"
    teacher: str = ""  # the teacher's checkpoint folder (with its tokenizer.json, the student's tokenizer) or run
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"  # the frozen teacher's weights and arithmetic
    ce_weight: NonNegativeFloat = 0.5  # the student's next-token cross-entropy on the corpus
    kd_weight: NonNegativeFloat = 0.5  # the divergence from the teacher's next-token distribution
    # generalised JSD: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher); GKDConfig's default 0.5
    beta: Fraction = 0.0
    # T of both distributions in the divergence, which is scaled by T^2 (TRL's GKDConfig.temperature is the sampling
    # temperature, sample_temperature here: its divergence is at T=1)
    temperature: PositiveFloat = 1.0
    lmbda: Fraction = 0.0  # fraction of micro-batches that are the student's own generations (GKD; TRL's default 0.5)
    # steps of corpus/reference batches alone before the first on-policy one: a cold student's samples are noise the
    # teacher's judgement of teaches little (GKD starts from a supervised student)
    on_policy_after: NonNegative = 0
    prompt_tokens: Positive = 64  # on-policy, token shards: tokens of a corpus row kept as the prompt continued
    sample_temperature: PositiveFloat = 1.0  # on-policy: the student's sampling temperature (TRL's temperature, 0.9)
    # Hierarchical feature KD: student layer -> teacher layer whose output hidden state the student layer's output
    # learns through a learned projection to the teacher's width, e.g. {0: 1, 1: 3}; {} = off
    feature_layers: dict[int, int] = field(default_factory=dict)
    feature_weights: dict[int, NonNegativeFloat] = field(default_factory=dict)  # per student layer; unlisted = 1.0
    feature_loss: FeatureLoss = "mse"  # mse | cosine
    teacher_cache: str = ""  # folder of cached top-k teacher log-probabilities of corpus batches; "" = none
    cache_top_k: Positive = 64  # log-probabilities kept per position in the cache

    def read_from_init_from_on_resume(self) -> str:
        student = "the student's model (built from it, then given the checkpoint's weights)"
        return " and ".join(filter(None, (student, super().read_from_init_from_on_resume())))

    def validate(self, source: str | None = None, resume: bool = False) -> DistillConfig:
        config = super().validate(source, resume)
        try:
            require(bool(config.teacher), "teacher", "a checkpoint folder (the model to distill from)")
            require(Path(config.teacher).is_dir(), "teacher", f"an existing checkpoint folder, not {config.teacher!r}")
            from seekstack.checkpoint import CheckpointError, read_config  # torch's import: not at the CLI's start

            try:  # a folder that is no checkpoint is refused here, naming the field, not when the teacher loads
                read_config(config.teacher)
            except CheckpointError as error:
                raise ConfigError(f": {error}", field="teacher") from None
            if config.task:
                require_task(config.task, difficulty=config.difficulty)
            require(
                not (config.task and config.data), "task", "'' when data is given (conversations from one or other)"
            )
            require(
                config.ce_weight > 0 or config.kd_weight > 0 or bool(config.feature_layers),
                "kd_weight",
                "above 0 when ce_weight is 0 and no feature_layers are mapped (the student would learn nothing)",
            )
            require(
                config.lmbda == 0 or config.kd_weight > 0 or bool(config.feature_layers),
                "lmbda",
                "0 when kd_weight is 0 and no feature_layers are mapped: the cross-entropy counts none of the tokens "
                "the student writes on-policy (a corpus row's prompt alone), so nothing would learn from them",
            )
            require(
                config.lmbda == 0 or config.conversational or config.prompt_tokens < config.seq_len,
                "prompt_tokens",
                f"below seq_len={config.seq_len} when lmbda > 0 (the student writes the rest of each row)",
            )
            unmapped = sorted(set(config.feature_weights) - set(config.feature_layers))
            require(not unmapped, "feature_weights", f"keyed by student layers of feature_layers, not {unmapped}")
            if config.teacher_cache:
                require_folder_path(config.teacher_cache, "teacher_cache")
            require(
                not (config.teacher_cache and config.feature_layers),
                "teacher_cache",
                "'' with feature_layers (feature KD needs the teacher's hidden states at every step)",
            )
            require_conversation_fields(config)
            if config.conversational and not config.init_from and not config.tokenizer:
                expectation = (
                    "a checkpoint folder with its tokenizer.json (the conversations' tokenizer; or set tokenizer)"
                )
                require_tokenizer_file(config.teacher, "teacher", expectation)
                config = dataclasses.replace(config, tokenizer=config.teacher)  # teacher and student share it
        except ConfigError as error:
            raise error.at(source) from None
        return config

    def layer_weight(self, student_layer: int) -> float:
        """The weight of a mapped student layer's feature distance."""
        return self.feature_weights.get(student_layer, 1.0)


nested_config(DistillConfig, "model_overrides", ModelConfig, prefix="model")
