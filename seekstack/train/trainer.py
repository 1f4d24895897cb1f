"""The pre-training loop: AdamW, gradient accumulation and clipping, DeepSeek-V3 losses and bias balancing.

Per optimizer step: `grad_accum_steps` micro-batches of loss = L_next + lambda * L_MTP + L_balance (the model
computes it), each weighted by its share of the step's labelled targets (a per-token mean over the step, as
transformers' `num_items_in_batch`; token windows all weigh the same), a clipped AdamW update, then the
auxiliary-loss-free bias update from the step's expert loads, summed over all micro-batches and ranks: the MaxVio
logged is that of the whole step's batch, per MoE layer. Rows come from a mixture of splits whose weights follow a
schedule (the curriculum) or are learned by an EXP3 bandit from each micro-batch's loss (tokens/bandit.py); the
weights in effect are logged. Each step appends one JSON line to `out_dir/metrics.jsonl`; each evaluation appends
one with `val_loss`, over the val split's token windows or a batch source's validation batches (SFT's held-out
conversations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from seekstack.accounting import training_flops_per_token
from seekstack.atomic import WriteRefused, write_atomic
from seekstack.checkpoint import load_pretrained, write_pretrained_files
from seekstack.checkpoint.keys import CONFIG_FILE as MODEL_CONFIG_FILE
from seekstack.checkpoint.keys import CheckpointError
from seekstack.config import ModelConfig
from seekstack.infer.generation_config import GENERATION_CONFIG_FILE
from seekstack.infer.precision import FAST_BF16_CPU_FEATURES, asked_dtype_caveat, present_features
from seekstack.infer.threads import LoadAwareThreads, configured_threads
from seekstack.interrupts import interrupts_deferred, sigterm_as_ctrl_c
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.model.moe import MoE
from seekstack.model.transformer import ModelOutput, Transformer
from seekstack.parallel import distributed
from seekstack.parallel.compression import Compression, register_compression
from seekstack.parallel.expert import (
    apply_expert_parallel,
    clip_gradients,
    gather_expert_state,
    sharded_expert_params,
)
from seekstack.parallel.fsdp import (
    apply_fsdp,
    full_model_state,
    is_sharded,
    load_optimizer,
    load_whole_optimizer,
    rank_memory,
    require_offload_device,
    save_optimizer,
)
from seekstack.parallel.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_float8,
    require_float8_support,
)
from seekstack.schema import ConfigError
from seekstack.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from seekstack.tokenizer import Tokenizer, tokenizer_json_path
from seekstack.tokens.mixture import MixtureWindows
from seekstack.tokens.provenance import require_checkpoint_tokenizer, retokenize_command
from seekstack.tokens.shards import TokenWindows, shard_listing
from seekstack.tokens.token_bytes import scored_text_bytes, split_byte_lengths, text_targets
from seekstack.train.balance import max_violation, update_expert_bias
from seekstack.train.config import CONFIG_FILE, VAL_SPLIT, TrainConfig
from seekstack.train.metrics import METRICS_FILE, append_metrics, is_evaluation, read_metrics_file
from seekstack.train.mfu import (
    Peak,
    core_matmul_flops,
    default_peak_flops,
    flops_text,
    mfu_text,
    model_flops_utilisation,
    probed_in_turns,
    shared_cpu_peak_flops,
    thread_cores,
)
from seekstack.train.runs import (
    TRAIN_STATE_FILE,
    another_run,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    out_dir_held,
    passed_over,
    refuse_new_run_into,
    step_dir,
    step_number,
)
from seekstack.train.schedule import (
    LrAnchor,
    ProgressAnchor,
    learning_rate,
    mtp_weight_at,
    resumed_lr_anchor,
    resumed_progress_anchor,
    training_progress,
)
from seekstack.train.state import (
    OPTIMIZER_DIR,
    load_checkpoint,
    load_optimizer_state,
    load_training_file,
    prune_checkpoints,
    rank_compression_file,
    rank_optimizer_file,
    read_train_state,
    restoring,
    resume_before,
    resumed_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    shared_staging,
    write_training_files,
)

PROGRESS_EVERY = 10  # steps between progress lines when stderr is not a terminal (a log file, CI)
ERASE_TO_ROW_END = "\x1b[K"  # ANSI EL: erase from the cursor to the end of the terminal's row
PEAK_PROBES = 3  # matmul probes a CPU run makes again when a step's MFU beats the peak (each ~0.3-0.9 s of 2 cores)


def eta_text(seconds: float) -> str:
    """The time left as HH:MM:SS, led by its whole days from one day on (`2d 03:04:05`): a clock time wraps at 24 h."""
    days, left = divmod(int(seconds), 86_400)
    hours, left = divmod(left, 3600)
    clock = f"{hours:02d}:{left // 60:02d}:{left % 60:02d}"
    return f"{days}d {clock}" if days else clock


def redrawn_in_place(line: str, columns: int) -> str:
    """`line` as a terminal `columns` wide redraws it over the one before: back to the row's start, cut to one row (a
    wrapped line leaves its first rows behind at every redraw), the rest of the row erased (a shorter line showed the
    end of the longer one before it)."""
    return "\r" + line[: columns - 1] + ERASE_TO_ROW_END


def stderr_columns() -> int:
    """The width of the terminal stderr shows on, whatever stdout goes to (`train | tee log`); where stderr is no
    terminal, shutil's (COLUMNS, stdout's terminal, else 80)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):  # no terminal; a stream without a file descriptor
        return shutil.get_terminal_size().columns


class EtaClock:
    """The time a run has left, at the pace of its steps since the first one this process ran: that one pays once for
    what later steps do not (torch.compile, kernel builds, first allocations), and counted in, a first step of 7 s
    before steps of 0.19 s put the ETA at step 10 of 60 at 45 s where 9.6 s were left."""

    def __init__(self, step: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock  # seconds since some fixed moment
        self.since = clock(), step  # the time and step the pace is measured from
        self.warm = False

    def eta(self, step: int, max_steps: int) -> float:
        """Seconds left once `step` of `max_steps` is done (after the first step: that step's own pace)."""
        now = self.clock()
        since, since_step = self.since
        seconds = (now - since) / (step - since_step) * (max_steps - step)
        if not self.warm:
            self.since, self.warm = (now, step), True
        return seconds


class ModelHooks(Protocol):
    """How a run trains something made from the model rather than the model itself (LoRA adapters,
    seekstack.adapters): the module it trains, what its checkpoints hold, how a resume restores it. Hooks with a
    `begin_step(model, step)` method are told the steps completed before each step draws its micro-batches (distill's
    on-policy warm-up counts them): the trainer's count, which a resume restores and an interrupted step leaves as it
    was, where a count of the module's own would go on counting the micro-batches of a step Ctrl-C cut short. Hooks
    with a `step_terms(model)` method give, after the step's micro-batches, terms of its loss to log beside lm_loss
    (distillation's divergence): each name's (sum over positions, positions) on the rank, the same names on every
    rank; the step's record holds each one's mean over the positions of all ranks."""

    def prepare(self, model: Transformer) -> nn.Module:
        """The module to train (its trainable parameters are those with requires_grad), made from the built model."""
        ...

    def write(self, model: nn.Module, folder: Path) -> None:
        """Write the trained module's files into a checkpoint folder."""
        ...

    def restore(self, model: nn.Module, folder: Path) -> None:
        """Load what `write` wrote back into a module `prepare` made (resume)."""
        ...

    def training_flops(self, config: ModelConfig, positions: int, seq_len: int) -> int:
        """Training FLOPs of a micro-batch of `positions` trained tokens in rows of `seq_len` of the model `config`
        describes (for MFU)."""
        ...


class BatchSource(Protocol):
    """Where a run's batches come from instead of token shards (SFT conversations, RL rollouts,
    seekstack.posttrain): it sees the module being trained, computes each micro-batch's loss, and saves its
    position for an exact resume. One process only. A source with `chooses_threads` true sets torch's threads itself
    (RL: from how idle the machine left the cores during its rollouts) instead of the run's `LoadAwareThreads`. A
    source with a `validation_batches(batch_size, count)` method (SFT) is evaluated on what it returns, the same
    `ValidationBatch`es every time, or not at all when it returns None or has no such method (RL); its
    `validation_rows()` gives how many rows those hold, what they are and where from, which the run says at its start
    when they are fewer than `eval_batches` asks. A source with a
    `labelled_tokens(batch)` method (SFT) weighs each micro-batch's loss by that count's share of the step's (a
    per-token mean over the step); without one (RL) its micro-batches weigh the same. A source with a
    `sequences(batch)` method (SFT) weighs each micro-batch's balance loss, a mean over its sequences, by their share of
    the step's (packed rows hold unequal numbers); without one, the same. A source with a `record(out_dir)` method
    (SFT) writes files of its own into a new run's out_dir beside its config, once the run has passed every check (a
    refused run writes nothing). A source with `progress_metrics` (names of metrics its `loss` returns) has them shown
    on the progress line after the loss (RL: reward and accuracy, where GRPO's loss is ~0 by construction). A source
    with `position()` and `rewind(position)` (RL) gives the mark taken at each step's start, which a Ctrl-C in the
    step rewinds to, without the work its `state_dict` would wait for (RL's batch sampled ahead: the step's own wait
    for it is then counted in the step's time); without them `state_dict` and `load_state_dict` serve."""

    tokenizer_info: dict[str, Any]  # vocab_size, bos_id, eos_id; path and sha256 of the tokenizer checkpoints carry

    def attach(self, model: nn.Module) -> None:
        """Called once the trained module exists (built, or restored by a resume), before the first batch."""
        ...

    def batch(self, batch_size: int, progress: float) -> Any:
        """The next micro-batch; `progress` is the fraction of the run's steps done (step / max_steps)."""
        ...

    def loss(self, model: nn.Module, batch: Any, mtp_loss_weight: float) -> tuple[ModelOutput, dict[str, float]]:
        """The micro-batch's model output with `loss` set, and `lm_loss` unless it trained no labelled token (then
        None: a step with none logs no lm_loss), and metrics of its own to log, averaged over micro-batches; a key
        ending in `_tokens` is a count, logged as the step's total; one ending in `_s` is seconds of the step, also
        logged as its share (`_share`)."""
        ...

    def tokens(self, batch: Any) -> tuple[int, int]:
        """The token positions the micro-batch's training forward runs (padding included: it is computed) and the
        length of its sequences, for tokens/s and MFU: a padded batch is as long as its longest row, not seq_len."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class ValidationBatch:
    """Rows an evaluation scores: the loss counts the targets whose label is not IGNORE_INDEX (all of a token
    window's; an SFT row's assistant tokens), and `text_bytes` is the UTF-8 bytes they stand for (bits per byte)."""

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T); labels[:, t] is predicted from position t - 1
    text_bytes: float
    counted: bool = True  # False on the ranks but 0 for a short last batch each rank scores whole (their forwards meet)
    positions: torch.Tensor | None = None  # (B, T) of packed rows, each sequence's from 0; None: each row one sequence
    real: torch.Tensor | None = None  # (B, T) bool: the tokens that are not padding, all the expert load counts


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run did: the last completed step, the training loss of each step it ran, its last checkpoint."""

    step: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or other 1-D parameters); a parameter with an
    `lr_scale` attribute (LoRA+'s B factors, seekstack.adapters) gets a group whose lr is the schedule's x lr_scale."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    scales = sorted({getattr(p, "lr_scale", 1.0) for p in params})
    if scales != [1.0]:
        groups = [
            {**group, "params": [p for p in group["params"] if getattr(p, "lr_scale", 1.0) == scale], "lr_scale": scale}
            for group in groups
            for scale in scales
        ]
    if any(isinstance(p, DTensor) for p in params) and not all(isinstance(p, DTensor) for p in params):
        # FSDP with expert parallel: sharded DTensors beside rank-local experts, which one foreach call cannot mix
        groups = [
            {**group, "params": [p for p in group["params"] if isinstance(p, DTensor) == sharded]}
            for group in groups
            for sharded in (True, False)
        ]
    # The fused kernel updates each tensor in one pass (on a CPU ~10x faster than foreach for `small`'s 52M
    # parameters); sharded DTensors on a CPU (FSDP over gloo) keep foreach, the path the distributed tests cover.
    sharded_on_cpu = device.type == "cpu" and any(isinstance(p, DTensor) for p in params)
    fast = {"foreach": True} if sharded_on_cpu else {"fused": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, **fast)


# bf16 autocast speeds a training step on a CPU with native bf16 dot products only once a micro-batch multiplies
# enough: below, the casts around each op and bf16's costlier small matmuls outweigh its faster multiplies. Measured
# (whole steps, forward + backward + AdamW, bf16 and float32 alternating, one thread, CPU clock, an avx512_bf16 CPU
# without AMX): bf16 faster for `tiny` at 4 x 256 tokens (14 GFLOP), `small` at 1 x 128 (24), a 1M-parameter `tiny`
# at 16 x 256 (30) and the demo's `tiny` at 16 x 256 (58); even or slower for `tiny` at 16 x 64 (12.5) and 4 x 32, and
# for the tests' 0.13M-parameter model at 16 x 256.
MIN_BF16_TRAINING_FLOPS = 13e9  # training FLOPs of one rank's micro-batch (accounting.training_flops_per_token)


def step_dtype(
    dtype: str,
    device: torch.device,
    micro_batch_flops: float,
    features: Mapping[str, object] | None = None,
    started: str | None = None,
) -> tuple[str, str]:
    """("float32" or "bfloat16", why) a run's steps compute in: the config's `dtype` (why: '' unless it is bfloat16 on
    a device without native bf16, where it can run slower than float32: `asked_dtype_caveat`), or for `auto` bfloat16
    on a CPU with FAST_BF16_CPU_FEATURES (`features`: the CPU's, default detected) whose micro-batches multiply
    `micro_batch_flops` of MIN_BF16_TRAINING_FLOPS or more, float32 elsewhere (on other devices, where no default other
    than float32 has been measured). `auto` decides at a run's start: a resumed run goes on in the dtype its steps
    computed in (`started`), on any machine."""
    if dtype == "bfloat16":
        caveat = asked_dtype_caveat(dtype, [str(device)], None, features)
        return dtype, "" if caveat is None else f"given, but {caveat}: bf16 can run slower there than float32"
    if dtype != "auto":
        return dtype, ""
    chosen, why = auto_training_dtype(device, micro_batch_flops, features)
    if started is None or started == chosen:
        return chosen, why
    return started, f"the run's since its start, which a resume keeps; a new run here would take {chosen}: {why}"


def auto_training_dtype(
    device: torch.device, micro_batch_flops: float, features: Mapping[str, object] | None = None
) -> tuple[str, str]:
    """("bfloat16" or "float32", why) `dtype=auto` trains in on `device` (MIN_BF16_TRAINING_FLOPS)."""
    if device.type != "cpu":
        return "float32", f"the default on {device.type} (bf16 autocast is chosen by default on CPUs only)"
    present = present_features(FAST_BF16_CPU_FEATURES, features)
    if not present:
        return "float32", f"this CPU has none of {', '.join(FAST_BF16_CPU_FEATURES)}"
    size = f"a micro-batch of {micro_batch_flops / 1e9:.1f} GFLOP"
    if micro_batch_flops < MIN_BF16_TRAINING_FLOPS:
        threshold = f"under {MIN_BF16_TRAINING_FLOPS / 1e9:.0f}"
        return "float32", f"this CPU has {' and '.join(present)}, but {size} ({threshold}) trains faster in float32"
    return "bfloat16", f"this CPU has {' and '.join(present)} and {size} trains faster in bf16"


def build_model(config: TrainConfig, tokenizer_info: dict[str, Any]) -> Transformer:
    """A fresh model from the preset and overrides, or the checkpoint `init_from` names, with the run's
    balance-loss weight, whose vocabulary fits the `vocab_size` ids of the tokenizer `tokenizer_info` describes
    (`require_vocabulary`); a fresh one has that tokenizer's BOS and EOS ids (`special_token_ids`)."""
    vocab_needed = tokenizer_info["vocab_size"]
    if config.init_from:
        try:
            model = load_pretrained(config.init_from, dequantize=True)
        except CheckpointError as error:  # the setting that names the folder, beside the file at fault
            raise CheckpointError(f"init_from={config.init_from}: {error}") from None
        set_balance_weight(model, config.aux_loss_alpha)
        model_config = model.config
    else:
        model_config = config.model_config().replace(**special_token_ids(tokenizer_info))
        model = None
    # rl, and sft on conversations, read no data_dir: their rows are encoded by `tokenizer` (else init_from's)
    tokenized_by = config.data_dir if config.reads_data_dir else config.tokenizer or config.init_from
    require_vocabulary(model_config.vocab_size, vocab_needed, tokenized_by, config.init_from)
    return model if model is not None else Transformer(model_config)


def special_token_ids(tokenizer_info: dict[str, Any]) -> dict[str, int]:
    """config.json's `bos_token_id` and `eos_token_id`: those of the tokenizer the data was encoded with (its
    `bos_id` and `eos_id`, which a shard index records), where transformers' generate starts and stops (a preset's
    are DeepSeek-V3's 0 and 1, DeepSeek-V2-Lite's 100000 and 100001, whatever the tokenizer)."""
    fields = {"bos_token_id": "bos_id", "eos_token_id": "eos_id"}
    return {field: tokenizer_info[key] for field, key in fields.items() if key in tokenizer_info}


def set_balance_weight(model: Transformer, aux_loss_alpha: float) -> None:
    """A loaded model trained with the run's sequence-wise balance-loss weight: in each MoE layer, and in its config,
    which the run's checkpoints save."""
    model.config = model.config.replace(aux_loss_alpha=aux_loss_alpha)
    for moe in (module for module in model.modules() if isinstance(module, MoE)):
        moe.aux_loss_alpha = aux_loss_alpha


def require_vocabulary(vocab_size: int, vocab_needed: int, data_dir: str | Path, init_from: str | Path = "") -> None:
    """ConfigError unless a model of `vocab_size` ids (the checkpoint `init_from`, else a fresh one) can train on the
    shards in `data_dir` (or the rows of the tokenizer it names), of a tokenizer of `vocab_needed` ids: fewer cannot
    embed the data, and a fresh model's must be exactly those, as more would let it emit ids that decode to no token."""
    if vocab_size < vocab_needed:
        advice = (
            f"the checkpoint {init_from} cannot grow its vocabulary: tokenize the text with the checkpoint's "
            f"tokenizer, {retokenize_command(data_dir, init_from)}, and train on that folder"
            if init_from
            else f"set model.vocab_size={vocab_needed}"
        )
        raise ConfigError(
            f"{data_dir}: its tokenizer has {vocab_needed} ids, more than model vocab_size={vocab_size} embeds; "
            f"{advice}"
        )
    if not init_from and vocab_size > vocab_needed:
        raise ConfigError(
            f"{data_dir}: its tokenizer has {vocab_needed} tokens, fewer than model vocab_size={vocab_size}: ids "
            f"{vocab_needed}..{vocab_size - 1} decode to no token; set model.vocab_size={vocab_needed}"
        )


def require_unpacked(config: TrainConfig) -> None:
    """A ConfigError naming packing when it is asked of token windows: seq_len tokens of documents back to back,
    which hold no padding to pack away (TRL's "wrapped" packing, which `data tokenize` shards already are)."""
    if config.packing:
        raise ConfigError(
            f"is true, but data_dir={config.data_dir} is read as token shards, whose windows are seq_len tokens of "
            "documents back to back with no padding to save; packing packs conversations (sft, distill with data or "
            "task, lora train on a chat .jsonl): set packing=false",
            field="packing",
        )


def require_val_split(config: TrainConfig) -> None:
    """ConfigError when evaluations are due (`eval_every`) and the val split of `data_dir` is missing or too small for
    one window: the run would train without ever logging a val_loss."""
    if not config.eval_every:
        return
    try:
        TokenWindows(config.data_dir, VAL_SPLIT, config.seq_len)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{error}; or set eval_every=0 to train without evaluations") from None


def require_saved_seq_len(config: TrainConfig, saved: dict[str, Any], checkpoint: Path) -> None:
    """ConfigError naming seq_len when a run resumed on token windows is given another than its checkpoint's
    (`saved` config): the data position counts windows of that length in an order drawn over them, and windows of
    another length come in another order, so no position in them continues the data pass without skipping or
    repeating part of it."""
    seq_len = saved.get("seq_len", config.seq_len)
    if config.seq_len == seq_len:
        return
    holds_a_model = (checkpoint / MODEL_CONFIG_FILE).is_file()  # not a LoRA run's, which holds its adapter alone
    new_run = (
        f"start a new run from its weights with init_from={checkpoint} seq_len={config.seq_len}"
        if holds_a_model
        else f"start a new run into another out_dir at seq_len={config.seq_len}"
    )
    raise ConfigError(
        f"has value {config.seq_len}, but the checkpoint {checkpoint} the run resumes from holds its data position "
        f"in windows of seq_len={seq_len} ({checkpoint / TRAIN_STATE_FILE}), drawn in an order over that length: "
        f"at another seq_len the run would skip or repeat part of its data pass; resume with seq_len={seq_len} "
        f"(the run's {CONFIG_FILE} held it at that save), or {new_run}",
        field="seq_len",
    )


def tokenizer_files(config: TrainConfig, tokenizer_info: dict) -> list[Path]:
    """tokenizer.json and tokenizer_config.json to copy into every checkpoint, so that it loads for inference.

    From `config.tokenizer`, else from the path `data tokenize` recorded; none when neither exists (a bare
    token stream). The tokenizer must be the one the data was encoded with.
    """
    recorded = tokenizer_info.get("path")
    if not config.tokenizer and not (recorded and Path(recorded).is_file()):
        return []
    path = tokenizer_json_path(config.tokenizer or recorded)
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.fingerprint != tokenizer_info["sha256"]:
        raise ConfigError(f"tokenizer {path} is not the one {config.data_dir} was tokenized with; set `tokenizer`")
    config_file = path.parent / TOKENIZER_CONFIG_FILE
    return [path, config_file] if config_file.is_file() else [path]


@contextlib.contextmanager
def told_if_interrupted_before_training(resume: bool | str | Path = False) -> Iterator[None]:
    """Ctrl-C inside, in a run's start-up before its first step (the model built or loaded, the data read and checked,
    the peak probed; post-training's conversations tokenized or rollout engine built), is said on stderr by the main
    process, where the command's exit 130 says nothing; then raised again."""
    try:
        yield
    except KeyboardInterrupt:
        if distributed.is_main_process():
            kept = " (the checkpoint it resumes from is as it was)" if resume else ""
            print(f"\ninterrupted before its first step: nothing saved{kept}", file=sys.stderr, flush=True)
        raise


def train(
    config: TrainConfig,
    resume: bool | str | Path = False,
    hooks: ModelHooks | None = None,
    source: BatchSource | None = None,
    resumable: bool = True,
) -> TrainResult:
    """Run (or, with `resume`, continue from the latest or a given checkpoint) the pre-training `config` describes.

    Works in one process or under torchrun; only rank 0 writes files. `hooks` train a module made from the model
    (e.g. LoRA) instead of the whole model; `source` supplies batches and their loss instead of `data_dir`.
    Ctrl-C, or SIGTERM (a scheduler's preemption), saves a checkpoint to continue from with --resume, unless the run
    is not `resumable` (a temporary run inside another command, which says itself what an interrupt means).
    """
    config = config.validate(resume=bool(resume))
    handled = sys.exception()  # by the caller's `except` this is called in: its frames stay the caller's to debug
    ranks = distributed.init_distributed(cpu_collectives=config.cpu_offload)  # FSDP's offloaded gradients
    try:
        # every rank trains the same run; only its torch threads may suit its own machine
        settings = {key: value for key, value in config.to_dict().items() if key != "threads"}
        distributed.require_same_settings({**settings, "--resume": str(resume)}, ranks)
        if source is None:  # token windows
            require_unpacked(config)
            # a rank on a machine of its own may see another copy of data_dir, or a partial one
            distributed.require_same_settings(
                shard_listing(config.data_dir), ranks, what="token shards in data_dir",
                advice="every rank must read the same files: a file system they share, or the same copy on each "
                "machine",
            )  # fmt: skip
        with configured_threads(config.threads), sigterm_as_ctrl_c(), contextlib.ExitStack() as held:
            with told_if_interrupted_before_training(resume) if resumable else contextlib.nullcontext():
                run = _Run(config, ranks, resume, hooks, source, held)  # the model built or loaded, the data checked
            return run.run(resumable)
    except BaseException as error:
        cut_by = distributed.told_failure(error, ranks)  # None, or the error of the rank that failed first
        if ranks.distributed:  # the frames of its traceback hold the run (self, model) for as long as the caller
            # keeps the error (a notebook's last one): their locals go, the DDP model too, up to the error handled;
            # the run's own frames alone (seekstack's and torch's, DDP's forward among them), not the caller's code
            # it ran (hooks), whose locals are the caller's to debug
            while error is not None and error is not handled:
                for frame, _ in traceback.walk_tb(error.__traceback__):
                    if frame.f_globals.get("__name__", "").partition(".")[0] in ("seekstack", "torch"):
                        with contextlib.suppress(RuntimeError):  # train()'s own, still running
                            frame.clear()
                error = error.__context__
        if cut_by is not None:
            raise cut_by from None
        raise
    finally:
        run = None  # its DDP model first, which holds the process group (see distributed.shutdown)
        distributed.shutdown(ranks)


class _Run:
    line_open = False  # stderr's cursor is at the end of a progress line redrawn in place (on a terminal)

    def __init__(
        self,
        config: TrainConfig,
        ranks: distributed.Ranks,
        resume: bool | str | Path,
        hooks: ModelHooks | None,
        source: BatchSource | None,
        held: contextlib.ExitStack,  # what the run holds until it ends: its out_dir
    ):
        self.config, self.ranks, self.hooks, self.source = config, ranks, hooks, source
        if hooks is not None and ranks.distributed and config.parallel == "fsdp":
            raise ConfigError(
                ": fsdp does not train a model a stage wraps (hooks: LoRA adapters, distill's student); use ddp",
                field="parallel",
            )
        if source is not None and ranks.distributed:  # every rank meets it alike: told once, as a setting's error
            raise ConfigError(
                "conversations (sft, rl and distill's data= or task=, lora train's chat DATA) are trained in one "
                "process; start the run without torchrun (token shards are trained under it: distill's data_dir=, "
                "lora train's shards or text)"
            )
        # before a model is built to find them out
        distributed.require_rows_divisible(config.batch_size, ranks)
        if config.expert_parallel > 1 and not ranks.distributed:
            raise ConfigError(
                f"expert_parallel={config.expert_parallel} splits the routed experts over as many ranks; this run is "
                f"one process: start it with torchrun --nproc-per-node {config.expert_parallel}, or set "
                "expert_parallel=1"
            )
        if config.expert_parallel > 1 and config.expert_parallel != ranks.world_size:
            raise ConfigError(
                f"expert_parallel={config.expert_parallel} must equal the number of ranks ({ranks.world_size}): "
                "experts are split over all of them"
            )
        if config.float8:
            require_float8_support()
        require_offload_device(config.cpu_offload, ranks.device)
        self.out_dir = Path(config.out_dir)
        sets_threads = getattr(source, "chooses_threads", False)
        load_aware = config.threads == "auto" and ranks.device.type == "cpu" and not sets_threads
        self.threads = LoadAwareThreads(torch.get_num_threads(), enabled=load_aware)
        self.data = source or MixtureWindows(config.data_dir, config.mixture_policy(), config.seq_len, config.seed)
        if source is None:  # a val split missing or too small to evaluate fails now, not at its first use
            require_val_split(config)
        if source is None and config.init_from and not resume:  # a start from a checkpoint reads the shards with
            require_checkpoint_tokenizer(config.init_from, config.data_dir, self.data.tokenizer_info)  # its embeddings
        self.tokenizer_files = tokenizer_files(config, self.data.tokenizer_info)
        if not self.tokenizer_files:
            self._say(f"note: no tokenizer.json known for {config.data_dir}; set `tokenizer` to put one in checkpoints")
        # copied into every checkpoint beside the model: the tokenizer, and the sampling init_from's authors ship (none
        # where init_from is gone on resume: the model loaded from the run's checkpoint keeps that checkpoint's copy)
        generation_config = Path(config.init_from).glob(GENERATION_CONFIG_FILE) if config.init_from else ()
        self.checkpoint_files = [*self.tokenizer_files, *generation_config]
        self.val_byte_lengths = self._val_byte_lengths()
        self._note_a_short_validation_set()
        self.step = 0
        self.lr_anchor: LrAnchor | None = None  # where a resumed run with more steps continues its decay
        self.progress_anchor: ProgressAnchor | None = None  # where it continues its mixture phases and MTP weight
        self.evaluation_pending = False  # this step's evaluation is due and not yet logged
        # data position (a source's `position`, else its state_dict) and RNG states, inside a step
        self.step_start: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.resumed_from: Path | None = None
        self.history_left_after: int | None = None  # the step a resumed run went on from, until its first save
        train_state: dict[str, Any] | None = None
        if resume:
            path = resumed_checkpoint(self.out_dir, resume)  # before a stage's hooks read the folder
            if hooks is None:
                model, train_state = load_checkpoint(path, ranks.device)
                set_balance_weight(model, config.aux_loss_alpha)  # the one model setting a resumed run may change
            else:
                model = hooks.prepare(build_model(config, self.data.tokenizer_info).to(ranks.device))
                hooks.restore(model, path)
                train_state = read_train_state(path)
            with restoring(path, "step"):
                self.step = int(train_state["step"])
            distributed.require_same_settings(  # a rank with an out_dir of its own finds its own newest checkpoint
                {"step": self.step}, ranks, what="checkpoints to resume from",
                advice="every rank must resume from the same checkpoint: give an out_dir on a file system every rank "
                "shares",
            )  # fmt: skip
            if self.step > config.max_steps:  # else the run would train nothing and say it trained to its step
                raise ConfigError(
                    f"has value {config.max_steps}, below step {self.step} of the checkpoint {path} the run resumes "
                    f"from: it would train nothing; give max_steps above {self.step} to train on",
                    field="max_steps",
                )
            if source is None:  # token windows, whose position the checkpoint counts at its seq_len, of its tokenizer
                require_saved_seq_len(config, train_state["config"], path)
                require_checkpoint_tokenizer(path, config.data_dir, self.data.tokenizer_info)
            try:
                with restoring(path, "data", (LookupError, TypeError, AttributeError)):
                    self.data.load_state_dict(train_state["data"])
            except ValueError as error:  # a token mixture that cannot go on from it (another mixture_mode)
                if source is not None or isinstance(error, CheckpointError):  # these say themselves how to go on
                    raise
                raise ValueError(
                    f"{path / TRAIN_STATE_FILE}: {error}; resume with the run's mixture and mixture_mode, or start a "
                    f"new run from its weights with init_from={path}"
                ) from None
            with restoring(path, "lr_anchor"):
                self.lr_anchor = resumed_lr_anchor(train_state, config)
            with restoring(path, "progress_anchor"):
                self.progress_anchor = resumed_progress_anchor(train_state, config)
            self.evaluation_pending = bool(train_state.get("evaluation_pending")) and config.eval_every > 0
            note = passed_over(path) if resume is True else self._later_checkpoints_note() + self._other_run_note(path)
            if self.step == config.max_steps:  # allowed: an evaluation the run owes still runs
                note += f"; the run is at max_steps={config.max_steps} already: give max_steps above it to train on"
            self._say(f"resumed from step {self.step} ({path}){note}")
            self.resumed_from = path
            self.history_left_after = self.step
        else:
            refuse_new_run_into(self.out_dir)
            torch.manual_seed(config.seed)
            np.random.seed(config.seed)
            random.seed(config.seed)
            model = build_model(config, self.data.tokenizer_info).to(ranks.device)
            if hooks is not None:
                model = hooks.prepare(model)
        config.require_rows_within(model.config.max_position_embeddings)
        self.model = model.train()  # a checkpoint's (init_from, resume) loads in eval mode
        # the dtype a resumed run's steps computed in: its train state's, else (a checkpoint saved before train states
        # recorded it) its config's, unless `auto`, whose choice such a checkpoint does not record
        started = None if train_state is None else train_state.get("dtype", train_state["config"].get("dtype"))
        started = started if started in ("float32", "bfloat16") else None
        rank_tokens = config.batch_size // ranks.world_size * config.seq_len  # rows divide evenly over the ranks
        micro_batch_flops = training_flops_per_token(model.config, config.seq_len) * rank_tokens
        dtype, why = step_dtype(config.dtype, ranks.device, micro_batch_flops, started=started)
        self.dtype, self.autocast_dtype = dtype, torch.bfloat16 if dtype == "bfloat16" else None
        if source is not None:
            source.attach(model)
        if config.float8:
            apply_float8(model)
        if config.activation_checkpointing:
            apply_activation_checkpointing(model)
        if config.compile:
            apply_compile(model)
        self.comm: Compression | None = None  # DDP's gradient all-reduce: the bytes it sent, what it keeps
        rank_local = self._apply_expert_parallel(model)  # sets self.expert_parallel
        if ranks.distributed and config.parallel == "fsdp":
            apply_fsdp(
                model, ranks, bfloat16=dtype == "bfloat16", cpu_offload=config.cpu_offload,
                ignored=set(sharded_expert_params(model)),
            )  # fmt: skip
            self.wrapped = model
        else:
            self.wrapped = distributed.wrap_model(model, ranks, rank_local)
            if ranks.distributed:
                self.comm = register_compression(
                    self.wrapped, config.grad_compression, config.powersgd_rank, config.powersgd_start
                )
            elif config.grad_compression != "none":
                self._say(
                    f"note: grad_compression={config.grad_compression} compresses the gradients ranks exchange; this "
                    "run is one process, which exchanges none (start it with torchrun to use it)"
                )
            elif config.parallel == "fsdp":
                self._say(
                    "note: parallel=fsdp shards the parameters, gradients and optimizer state over the ranks; this run "
                    "is one process, which holds them whole (start it with torchrun to shard them)"
                )
        self.optimizer = build_optimizer(model, config, ranks.device)
        if train_state is not None:
            self._load_optimizer(train_state, path)
            self._load_compression(train_state.get("config", {}), path)
            with restoring(path, "rng"):
                set_rng_state(train_state["rng"])
        self.comm_bytes_before = 0
        self.ranks_cpus = distributed.ranks_cpus(ranks) if ranks.device.type == "cpu" else []
        # a finished run resumed (at max_steps) trains no step: no dtype to name, no peak to measure for its MFU, no
        # schedule to warn of
        trains = self.step < config.max_steps
        if trains:
            if why:
                other = "float32" if dtype == "bfloat16" else "bfloat16"
                chosen = "auto: " if config.dtype == "auto" else ""
                self._say(f"dtype {dtype} ({chosen}{why}); dtype={other} to train in {other}")
            if config.peak_flops:
                # per device: a card's, once per rank; a machine's CPUs, which its ranks share, once per machine
                devices = len({machine for machine, _ in self.ranks_cpus}) if self.ranks_cpus else ranks.world_size
                peak = Peak(config.peak_flops, f"peak_flops, as the config gives it, per {self._device_kind()}")
                self.peak_flops = config.peak_flops * devices
            else:
                peak = probed_in_turns(
                    lambda: default_peak_flops(ranks.device, self.autocast_dtype or torch.float32), ranks
                )
                self.peak_flops = self._ranks_peak(peak.flops)
            # logged with this process's first step, and as it changes
            self.peak_origin = self.peak_source = peak.source
            self.logged_peak_source: str | None = None
            self.peak_probes_left = PEAK_PROBES if not config.peak_flops and ranks.device.type == "cpu" else 0
            ranks_note = f" for {ranks.world_size} ranks" if ranks.distributed else ""
            self._say(f"MFU against a peak of {flops_text(self.peak_flops)}{ranks_note}: {peak.source}")
        # a run refused here (a damaged metrics.jsonl, an out_dir ranks do not share) writes nothing: a refused
        # resume leaves the run's train_config.json and metrics.jsonl as they were
        kept_metrics: list[dict[str, Any]] | None = None  # rank 0's alone, which writes the run's files

        def hold_and_read_metrics() -> None:
            nonlocal kept_metrics
            held.enter_context(out_dir_held(self.out_dir))  # before the run's first write into it
            kept_metrics = self._kept_metrics()

        distributed.done_by_main(hold_and_read_metrics, ranks)  # its refusal met by every rank, none left waiting
        if is_sharded(model) or self.expert_parallel or (self.comm is not None and self.comm.keeps_state):
            distributed.require_shared_folder(self.out_dir, ranks)  # each rank writes its part of every checkpoint
        if ranks.is_main:
            config.save(self.out_dir)
            if not resume and hasattr(source, "record"):
                source.record(self.out_dir)
            if kept_metrics is not None:
                write_atomic(self.out_dir / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in kept_metrics))
        if trains and config.warmup_steps >= config.max_steps:
            last = learning_rate(config.max_steps - 1, config)
            ending = (
                f"ends at {last:.3g}, short of lr={config.lr:g}; lower warmup_steps to reach it"
                if last < config.lr
                else f"reaches lr={config.lr:g} at the last step, never decaying to min_lr={config.min_lr:g}; lower "
                "warmup_steps to decay it"
            )
            self._say(
                f"warning: warmup_steps={config.warmup_steps} is not below max_steps={config.max_steps}: the learning "
                f"rate rises for the whole run and {ending}"
            )

    # ------------------------------------------------------------------------------ loop
    def run(self, resumable: bool = True) -> TrainResult:
        result = TrainResult(self.step, checkpoint=self.resumed_from)  # a finished run resumed trains nothing
        clock = EtaClock(self.step)
        start = self.step
        with distributed.interrupts_agreed(self.ranks) as stop_if_interrupted:
            try:
                self._evaluate_pending()  # a run interrupted during its last step's evaluation runs it first
                while self.step < self.config.max_steps:
                    stop_if_interrupted()  # several ranks: all stop here once Ctrl-C reached any of them
                    self._train_one_step(result, clock)
            except KeyboardInterrupt:
                if not resumable:
                    raise
                if self.resumed_from is not None and self.step == start:  # the checkpoint holds the run as it is: a
                    # save would only write it again, and delete the later ones of a resume from an earlier one
                    self._say(f"\ninterrupted before its first step: nothing saved ({self.resumed_from} is as it was)")
                    raise
                if self.step_start is not None:  # the interrupted step is re-run on resume, drawing what it drew
                    getattr(self.data, "rewind", self.data.load_state_dict)(self.step_start[0])
                    set_rng_state(self.step_start[1])
                with interrupts_deferred():  # a second Ctrl-C does not throw away the checkpoint being saved
                    result.checkpoint = self.save()
                    self._say(f"\ninterrupted: saved {result.checkpoint}; continue with --resume")
                raise
            except Exception:
                if self.line_open:  # the error the command prints starts a row of its own
                    self._say("")
                raise
        result.step = self.step
        return result

    def _train_one_step(self, result: TrainResult, clock: EtaClock) -> None:
        """A step, its progress line, the evaluation and the checkpoint due after it."""
        self.step_start = getattr(self.data, "position", self.data.state_dict)(), rng_state()
        with self.threads.step(self.step):
            metrics = self.train_step()  # counts the step once its update is made
        result.losses.append(metrics["loss"])
        first = not clock.warm  # the first step this process ran (a resumed run's too): its line is told in a log
        self._progress(metrics, clock.eta(self.step, self.config.max_steps), first)
        self._evaluate_pending()
        if self.config.save_every and self.step % self.config.save_every == 0 or self.is_last_step:
            result.checkpoint = self.save()

    def _evaluate_pending(self) -> None:
        """The evaluation of the step just done, when one is due; a checkpoint saved on Ctrl-C during it says it is
        still due, so the resumed run logs it as an uninterrupted one does."""
        if self.evaluation_pending:
            self.evaluate()
            self.evaluation_pending = False

    @property
    def is_last_step(self) -> bool:
        return self.step == self.config.max_steps

    def _trained_tokens(self, rows: Any) -> tuple[int, int]:
        """A micro-batch's trained token positions and their sequence length: shard rows are seq_len long, a batch
        source's batch says its own."""
        if self.source is None:
            return self.config.batch_size * self.config.seq_len, self.config.seq_len
        return self.source.tokens(rows)

    def _labelled_targets(self, rows: Any) -> int:
        """The targets a micro-batch's loss averages over on this rank: every position of a token window but the
        first, or a batch source's `labelled_tokens`; 1 for a source without it (its micro-batches weigh the same)."""
        if self.source is None:
            windows = distributed.local_rows(rows, self.ranks)
            return windows.shape[0] * (windows.shape[1] - 1)
        labelled_tokens = getattr(self.source, "labelled_tokens", None)
        return 1 if labelled_tokens is None else labelled_tokens(rows)

    def _sequences(self, rows: Any) -> int:
        """The sequences a micro-batch's balance loss averages over: a batch source's `sequences` (SFT's packed rows
        hold unequal numbers); 1 without it (token windows, padded rows: every micro-batch holds as many)."""
        sequences = getattr(self.source, "sequences", None)
        return 1 if sequences is None else sequences(rows)

    def _loss_shares(self, micro_batches: list[Any]) -> list[tuple[float, float]]:
        """Each micro-batch's weights in the step's loss: its share of the labelled targets of all the step's
        micro-batches on all ranks (all-reduced, as transformers' `num_items_in_batch`), and of their sequences (for
        its balance loss), each times the number of ranks, whose gradients DDP and FSDP average. 1 / grad_accum_steps
        each for token windows, which hold as many of both."""
        counts = [(self._labelled_targets(rows), self._sequences(rows)) for rows in micro_batches]
        totals = torch.tensor([sum(column) for column in zip(*counts, strict=True)], device=self.ranks.device)
        targets, sequences = distributed.all_reduce_sum(totals, self.ranks).tolist()
        world = self.ranks.world_size
        return [(count * world / max(targets, 1), held * world / max(sequences, 1)) for count, held in counts]

    def _weighted_loss(self, out: ModelOutput, share: float, sequence_share: float) -> torch.Tensor:
        """A micro-batch's part of the step's loss: its per-token terms weighted by `share`, its balance loss, a mean
        over its sequences (V3 eq. 20), by `sequence_share`, its share of the step's sequences (`_loss_shares`): how
        the step's rows are split leaves both terms as they are."""
        if out.balance_loss is None:
            return out.loss * share
        # the balance loss moved from `share` to its own: + 0 exactly where they agree (token windows' equal shares)
        return out.loss * share + out.balance_loss * (sequence_share - share)

    def train_step(self) -> dict[str, Any]:
        config, model = self.config, self.model
        step_start = time.perf_counter()
        lr = learning_rate(self.step, config, self.lr_anchor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        progress = training_progress(self.step, config, self.progress_anchor)  # of the mixture and MTP schedules
        mtp_weight = mtp_weight_at(progress, config)
        data_progress = progress if self.source is None else self.step / config.max_steps  # a source counts steps
        # loss, lm_loss, mtp_loss weighted by each micro-batch's share, and the shares of those with an lm_loss and of
        # those with an mtp_loss (none without MTP modules, or on rows too short for them)
        sums = torch.zeros(5, device=self.ranks.device)
        micro_losses = torch.zeros(config.grad_accum_steps, device=self.ranks.device)  # lm_loss of each micro-batch
        expert_load: torch.Tensor | None = None
        extra: dict[str, float] = {}  # a batch source's own metrics, summed over micro-batches
        tokens, flops = 0, 0  # trained token positions and their training FLOPs, over micro-batches and ranks
        self.optimizer.zero_grad(set_to_none=True)
        begin_step = getattr(self.hooks, "begin_step", None)
        if begin_step is not None:
            begin_step(model, self.step)
        micro_batches = [
            self.data.batch(config.batch_size, progress=data_progress) for _ in range(config.grad_accum_steps)
        ]
        shares = self._loss_shares(micro_batches)
        for micro, (rows, (share, sequence_share)) in enumerate(zip(micro_batches, shares, strict=True)):
            positions, length = self._trained_tokens(rows)
            tokens += positions
            if self.hooks is None:
                flops += positions * training_flops_per_token(model.config, length)
            else:  # a module made from the model: a LoRA run computes no weight gradients for the frozen base
                flops += self.hooks.training_flops(model.config, positions, length)
            last = micro == config.grad_accum_steps - 1
            with distributed.gradient_sync(self.wrapped, sync=last), self._autocast():
                if self.source is None:
                    batch = distributed.local_rows(rows, self.ranks).to(self.ranks.device)
                    out = self.wrapped(batch, labels=batch, mtp_loss_weight=mtp_weight, keep_logits=False)
                else:
                    out, own = self.source.loss(self.wrapped, rows, mtp_weight)
                    extra = {name: extra.get(name, 0.0) + value for name, value in own.items()}
            objective = self._weighted_loss(out, share, sequence_share)
            objective.backward()
            zero = torch.zeros_like(out.loss)
            mtp, mtp_share = (out.mtp_loss, share) if out.mtp_loss is not None else (zero, 0.0)
            lm_loss, lm_share = (out.lm_loss, share) if out.lm_loss is not None else (zero, 0.0)
            shares_had = out.loss.new_tensor([lm_share, mtp_share])
            weighted = torch.cat([torch.stack([objective, lm_loss * lm_share, mtp * mtp_share]), shares_had])
            sums += weighted.detach().float()
            micro_losses[micro] = lm_loss.detach().float()
            if out.expert_load is not None:
                load = out.expert_load.detach().float()
                expert_load = load if expert_load is None else expert_load + load
        step_terms = getattr(self.hooks, "step_terms", None)
        terms = step_terms(model) if step_terms is not None else {}  # each (sum, positions), summed in the same call
        sums = torch.cat([sums, *(term.float() for term in terms.values())])
        # Means over the step's labelled targets: the shares of all micro-batches on all ranks sum to the ranks.
        distributed.all_reduce_sum(sums, self.ranks)
        loss, lm_loss_sum, mtp_loss_sum, lm_shares, mtp_shares, *term_totals = sums.tolist()
        term_means = {
            name: total / count
            for name, total, count in zip(terms, term_totals[::2], term_totals[1::2], strict=True)
            if count
        }
        loss = loss / self.ranks.world_size
        clip = config.grad_clip if config.grad_clip > 0 else math.inf
        if self.expert_parallel:
            grad_norm = clip_gradients(model, clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        if not (math.isfinite(loss) and math.isfinite(grad_norm.item())):
            raise TrainingDiverged(
                f"step {self.step + 1}: loss={loss} grad_norm={grad_norm.item()} is not finite; the weights were "
                f"not updated. Last good checkpoint: {self._last_checkpoint_text()}. Lower lr or raise warmup_steps."
            )
        with interrupts_deferred():  # the update, its log line and the step count happen whole
            self.optimizer.step()
            if self.source is None and self.data.adaptive:  # a bandit mixture: each micro-batch's loss is its reward
                distributed.all_reduce_sum(micro_losses, self.ranks)
                self.data.observe((micro_losses / self.ranks.world_size).tolist())
            metrics: dict[str, Any] = {"step": self.step + 1, "loss": loss}
            if mtp_shares > 0:
                metrics["mtp_loss"] = mtp_loss_sum / mtp_shares
            if lm_shares > 0:  # else no micro-batch trained a labelled token (on-policy answers): no cross-entropy
                metrics["lm_loss"] = lm_loss_sum / lm_shares
            metrics.update(term_means)
            if self.comm is not None:
                metrics["comm_bytes"] = self.comm.counter.bytes_sent - self.comm_bytes_before
                self.comm_bytes_before = self.comm.counter.bytes_sent
            if self.step == 0:
                memory = rank_memory(model, self.optimizer)
                metrics["rank_memory"] = dataclasses.asdict(memory)
                ranks = self.ranks
                layout = f"{config.parallel}, {ranks.world_size} ranks" if ranks.distributed else "1 process"
                self._say(
                    f"memory on rank 0 ({layout}): parameters {memory.parameters:,} B, gradients "
                    f"{memory.gradients:,} B, optimizer {memory.optimizer:,} B"
                )
            if expert_load is not None:
                distributed.all_reduce_sum(expert_load, self.ranks)
                if config.bias_update_rate > 0:
                    update_expert_bias(model, expert_load, config.bias_update_rate)
                per_layer = max_violation(expert_load)
                metrics["maxvio"] = per_layer.mean().item()  # averaged over MoE layers, as Wang et al. 2024 report it
                layer_ids = model.moe_layer_ids[: len(per_layer)]
                metrics["maxvio_per_layer"] = {str(i): v for i, v in zip(layer_ids, per_layer.tolist(), strict=True)}
            if self.source is None and len(self.data.sources) > 1:
                metrics["mix"] = self.data.schedule.weights_at(progress)
            step_seconds = time.perf_counter() - step_start
            for name, total in extra.items():
                metrics[name] = total if name.endswith("_tokens") else total / config.grad_accum_steps
                if name.endswith("_s"):
                    metrics[name.removesuffix("_s") + "_share"] = metrics[name] / step_seconds
            tokens_per_s = tokens / step_seconds
            mfu = model_flops_utilisation(tokens_per_s, flops / tokens, self.peak_flops)
            if self.peak_probes_left and self._peak_beaten(mfu):  # the start's probe ran on a busy machine: probe
                # again, keep the higher; a few times only: on a machine that stays busy every probe reads low and
                # costs a step's time
                self.peak_probes_left -= 1
                dtype = self.autocast_dtype or torch.float32
                core_peaks = probed_in_turns(lambda: core_matmul_flops(dtype), self.ranks)
                probe = self._ranks_peak(thread_cores(self.threads.most) * core_peaks)
                if probe > self.peak_flops:
                    self.peak_flops = probe
                    self.peak_source = f"{self.peak_origin}, measured again at step {self.step + 1}"
                mfu = model_flops_utilisation(tokens_per_s, flops / tokens, self.peak_flops)
            metrics |= {"lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s, "mfu": mfu}
            metrics["peak_flops"] = self.peak_flops
            if self.peak_source != self.logged_peak_source:
                metrics["peak_source"] = self.logged_peak_source = self.peak_source
            metrics["step_s"] = step_seconds
            metrics["threads"] = torch.get_num_threads()
            self._log(metrics)
            self.step += 1
            self.step_start = None  # the step is done: a Ctrl-C from here on keeps it
            # every eval_every steps and at the last, as nanochat does: a run's final weights always get a val_loss
            self.evaluation_pending = bool(config.eval_every) and (
                self.step % config.eval_every == 0 or self.is_last_step
            )
        return metrics

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Next-token loss over `eval_batches` global validation batches (the targets their labels count), bits per
        byte, and MaxVio over all those batches' tokens (Wang et al. 2024's MaxVio_global); each rank scores its rows
        of every batch, as it trains on them, and the sums are all-reduced. A model with
        `validation_terms(input_ids, labels, out)` (distillation; `positions` too for a batch of packed rows) has
        each term it returns, a mean over the batch's targets, averaged over all the targets and logged as
        `val_NAME`."""
        batches = self._validation_batches()
        if batches is None:
            return None
        self.model.eval()
        loss_sum, targets, text_bytes, expert_load = 0.0, 0, 0.0, None
        terms = getattr(self.model, "validation_terms", None)  # distillation's divergence to its teacher
        term_sums: dict[str, float] = {}
        for batch in batches:
            input_ids, labels = batch.input_ids.to(self.ranks.device), batch.labels.to(self.ranks.device)
            packed = {} if batch.positions is None else {"positions": batch.positions.to(self.ranks.device)}
            counted = {} if batch.real is None else {"counted": batch.real.to(self.ranks.device)}  # padding is routed
            with self._autocast():
                out = self.model(input_ids, labels=labels, keep_logits=False, **packed, **counted)
                batch_terms = terms(input_ids, labels, out, **packed) if terms is not None else {}
            count = int((labels[:, 1:] != IGNORE_INDEX).sum()) * batch.counted
            for name, value in batch_terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value.item() * count
            loss_sum += out.lm_loss.item() * count
            targets += count
            text_bytes += batch.text_bytes * batch.counted
            if out.expert_load is not None:
                load = out.expert_load.float() * batch.counted
                expert_load = load if expert_load is None else expert_load + load
        self.model.train()
        sums = torch.tensor([loss_sum, targets, text_bytes, *term_sums.values()], dtype=torch.float64)
        loss_sum, targets, text_bytes, *term_totals = distributed.all_reduce_sum(sums.to(self.ranks.device), self.ranks)
        term_sums = dict(zip(term_sums, (total.item() for total in term_totals), strict=True))
        loss_sum, targets, text_bytes = loss_sum.item(), targets.item(), text_bytes.item()
        if expert_load is not None:
            distributed.all_reduce_sum(expert_load, self.ranks)
        val_loss = loss_sum / targets
        bpb = loss_sum / (math.log(2) * text_bytes)  # bits per byte = nats summed over the targets / (ln 2 * bytes)
        metrics = {"step": self.step, "val_loss": val_loss, "val_bpb": bpb}
        metrics |= {f"val_{name}": total / targets for name, total in term_sums.items()}
        if expert_load is not None:
            per_layer = max_violation(expert_load)
            metrics["val_maxvio"] = per_layer.mean().item()
            layer_ids = self.model.moe_layer_ids[: len(per_layer)]
            metrics["val_maxvio_per_layer"] = {str(i): v for i, v in zip(layer_ids, per_layer.tolist(), strict=True)}
        self._log(metrics)
        on_progress_line = sys.stderr.isatty() and not self.is_last_step
        terms_text = "".join(f", {name} {metrics[f'val_{name}']:.4f}" for name in term_sums)  # distillation's
        self._say(
            ("\n" if on_progress_line else "")
            + f"step {self.step}: val loss {val_loss:.4f}, {bpb:.4f} bits/byte{terms_text}"
        )
        return metrics

    def _validation_batches(self) -> list[ValidationBatch] | None:
        """The first `eval_batches` global batches (each `grad_accum_steps` micro-batches of `batch_size` rows, the
        same rows however a step is split) of the val split's token windows, this rank's rows of each (their targets'
        bytes counted per token, `_val_byte_lengths`), or of the batch source's validation set; None when there is
        none."""
        config = self.config
        micro_batches = config.eval_batches * config.grad_accum_steps
        if self.source is not None:
            validation_batches = getattr(self.source, "validation_batches", None)
            return None if validation_batches is None else validation_batches(config.batch_size, micro_batches)
        val = TokenWindows(config.data_dir, VAL_SPLIT, config.seq_len)
        windows = itertools.islice(val.sequential(config.batch_size), micro_batches)
        return [self._rank_rows(w) for w in windows]

    def _note_a_short_validation_set(self) -> None:
        """Say once, at the start, when the validation set holds fewer rows than `eval_batches` asks of each
        evaluation (`_validation_batches` then scores all it holds): the val split's token windows (and the tokens
        past its last window), or a batch source's held-out rows (`validation_rows`); not per evaluation."""
        config = self.config
        if not config.eval_every:
            return
        if self.source is None:
            held = TokenWindows(config.data_dir, VAL_SPLIT, config.seq_len).num_windows
            rows, holder = f"validation windows of {config.seq_len} tokens", f"the val split of {config.data_dir}"
            scored = "those and the tokens after them"
        elif hasattr(self.source, "validation_rows"):
            held, rows, holder = self.source.validation_rows()
            scored = "those"
        else:
            return
        asked = config.eval_batches * config.grad_accum_steps * config.batch_size
        if 0 < held < asked:  # none held: the source said so, and no evaluation runs
            self._say(
                f"note: eval_batches={config.eval_batches} asks {asked:,} {rows} per evaluation ({config.eval_batches} "
                f"x batch_size {config.batch_size} x grad_accum_steps {config.grad_accum_steps}); {holder} holds "
                f"{held:,}: each evaluation scores {scored}"
            )

    def _rank_rows(self, windows: torch.Tensor) -> ValidationBatch:
        """This rank's rows of a batch of validation windows; all of a short last batch the ranks do not divide,
        counted by rank 0 alone."""
        whole = len(windows) % self.ranks.world_size != 0
        rows = windows if whole else distributed.local_rows(windows, self.ranks)
        labels = text_targets(self.val_byte_lengths, rows)  # EOS, which spells no text, is not scored
        text_bytes = scored_text_bytes(self.val_byte_lengths, labels)
        return ValidationBatch(rows, labels, text_bytes, counted=not whole or self.ranks.is_main)

    def _val_byte_lengths(self) -> torch.Tensor | None:
        """The UTF-8 bytes of each token id of the tokenizer the val split was encoded with (`split_byte_lengths`),
        for bits per byte over the bytes the scored windows spell; where it is not at hand (shards without a recorded
        tokenizer.json, a moved one), the split's mean bytes per token, said once. None for a batch source."""
        config = self.config
        if self.source is not None or not config.eval_every:
            return None
        tokenizer_file = self.tokenizer_files[0] if self.tokenizer_files else None
        byte_lengths, estimated = split_byte_lengths(config.data_dir, VAL_SPLIT, tokenizer_file)
        if estimated:
            self._say(f"note: {estimated}; set `tokenizer` to count the bytes val_bpb's tokens spell")
        return byte_lengths

    # ------------------------------------------------------------------------------ files and output
    def save(self) -> Path | None:
        """Write `checkpoints/step_N`; a checkpoint the storage refuses (a full disk) stops the run with an error
        that says which steps are lost and where to continue from."""
        try:
            return self._write_checkpoint()
        except WriteRefused as refused:
            raise WriteRefused(f"{refused}; training stopped at step {self.step}: {self._steps_lost()}") from refused

    def _steps_lost(self) -> str:
        """The steps a checkpoint that could not be written loses, and what to do."""
        saved = list_checkpoints(self.out_dir)
        if not saved:
            return "the run has no checkpoint, so all its steps are lost: free some space and start it again"
        return f"the steps since {saved[-1]} are lost: free some space and continue from it with --resume"

    def _write_checkpoint(self) -> Path | None:
        """Write `checkpoints/step_N` (rank 0; under FSDP or expert parallel every rank adds its optimizer part)."""
        state = {
            "step": self.step,
            "data": self.data.state_dict(),
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "lr_anchor": None if self.lr_anchor is None else dataclasses.asdict(self.lr_anchor),
            "progress_anchor": None if self.progress_anchor is None else dataclasses.asdict(self.progress_anchor),
            "evaluation_pending": self.evaluation_pending,
            "dtype": self.dtype,  # what the steps computed in, which a resume with dtype=auto goes on in
        }
        keep, path = self.config.keep_checkpoints, None
        if is_sharded(self.model) or self.expert_parallel or self.comm is not None and self.comm.keeps_state:
            path = self._save_in_parts(state)
        elif self.ranks.is_main:
            state["optimizer"] = self.optimizer.state_dict()
            write_model = write_pretrained_files if self.hooks is None else self.hooks.write
            path = save_checkpoint(
                self.out_dir, self.model, state, keep, self.checkpoint_files, write_model, self.history_left_after
            )
        distributed.barrier(self.ranks)
        self.history_left_after = None  # the later checkpoints of the history the run left are gone
        return path

    def _save_in_parts(self, state: dict[str, Any]) -> Path | None:
        """FSDP, expert parallel, or DDP with a compression that keeps state: every rank writes its part of the
        optimizer state (sharded by torch.distributed.checkpoint, or one file per rank; DDP's is whole, rank 0's) and
        what its gradient compression keeps, rank 0 the model (gathered from all ranks where they split it)."""
        gathered = self._gathered_model_state()
        final = step_dir(self.out_dir, self.step)
        with shared_staging(final, self.ranks) as staging:
            if self.expert_parallel:  # each rank's experts have their own moments: one file per rank
                torch.save(self.optimizer.state_dict(), staging / rank_optimizer_file(self.ranks.rank))
            elif is_sharded(self.model):
                save_optimizer(self.model, self.optimizer, staging / OPTIMIZER_DIR)
            else:
                state["optimizer"] = self.optimizer.state_dict()
            if self.comm is not None and self.comm.keeps_state:
                torch.save(self.comm.state_dict(), staging / rank_compression_file(self.ranks.rank))
            if self.ranks.is_main:
                self._write_model_and_state(staging, gathered, state)
        if not self.ranks.is_main:
            return None
        prune_checkpoints(self.out_dir, self.config.keep_checkpoints, final, self.history_left_after)
        return final

    def _gathered_model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict gathered from FSDP's shards and expert parallel's experts (all ranks call
        it); None where rank 0's model is whole (DDP)."""
        if not (is_sharded(self.model) or self.expert_parallel):
            return None
        whole_state = full_model_state(self.model) if is_sharded(self.model) else self.model.state_dict()
        return gather_expert_state(self.model, whole_state) if self.expert_parallel else whole_state

    def _write_model_and_state(
        self, folder: Path, gathered: dict[str, torch.Tensor] | None, state: dict[str, Any]
    ) -> None:
        """Rank 0: the model (`gathered`, or its own whole one) and the train state into a checkpoint folder."""
        if gathered is None:
            write_model = write_pretrained_files if self.hooks is None else self.hooks.write
            write_training_files(folder, self.model, state, self.checkpoint_files, write_model)
            return
        with torch.device("meta"):
            whole = Transformer(self.model.config)
        whole.load_state_dict(gathered, assign=True)
        whole.generation_config = self.model.generation_config
        write_training_files(folder, whole, state, self.checkpoint_files)

    def _apply_expert_parallel(self, model: Transformer) -> list[str]:
        """Split the routed experts over all ranks (as many as `expert_parallel`, checked at the start) when it asks;
        the rank-local parameter names."""
        self.expert_parallel: bool = self.config.expert_parallel > 1
        if not self.expert_parallel:
            return []
        return apply_expert_parallel(model, self.ranks)

    def _load_optimizer(self, train_state: dict[str, Any], path: Path) -> None:
        """The optimizer state of a resumed run: one file per rank (expert parallel), whole in train_state.pt (loaded
        into FSDP's shards when this run has them), or sharded beside it by FSDP (resharded to this run's ranks). Its
        moments go on under this run's settings (weight_decay, betas), which loading the saved groups would replace."""
        own_settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        saved = train_state.get("config", {})
        if self.expert_parallel:
            self._load_rank_optimizer(path, saved)
        elif (path / rank_optimizer_file(0)).exists():
            raise ConfigError(
                f"{path} holds the optimizer state of an expert-parallel run, one file per rank "
                f"({rank_optimizer_file(0)}, ...); resume it with expert_parallel={saved.get('expert_parallel')} on as "
                f"many ranks, or start a new run from its weights with init_from={path} (a fresh optimizer)"
            )
        elif "optimizer" not in train_state and not (path / OPTIMIZER_DIR).is_dir():  # stripped to save space
            raise CheckpointError(
                f"{path / TRAIN_STATE_FILE}: holds no optimizer state (no 'optimizer' key), and {path} no "
                f"{OPTIMIZER_DIR}/ folder of a sharded run's: the moments a resume goes on with were removed; start "
                f"a new run from the checkpoint's weights with init_from={path} (a fresh optimizer), or "
                f"{resume_before(path)}"
            )
        elif "optimizer" not in train_state:
            try:
                load_optimizer(self.model, self.optimizer, path / OPTIMIZER_DIR)
            except CheckpointError as error:
                raise CheckpointError(f"{error}; {resume_before(path)}") from None
        elif is_sharded(self.model):
            load_whole_optimizer(self.model, self.optimizer, train_state["optimizer"], path / TRAIN_STATE_FILE)
        else:
            load_optimizer_state(self.optimizer, train_state["optimizer"], path / TRAIN_STATE_FILE)
        for group, settings in zip(self.optimizer.param_groups, own_settings, strict=True):
            group.update(settings)

    def _load_rank_optimizer(self, path: Path, saved: dict[str, Any]) -> None:
        """This rank's file of an expert-parallel checkpoint saved at as many ranks and with the same `parallel`
        (FSDP's optimizer holds its shards in other parameter groups than DDP's). Its refusals are ConfigErrors that
        every rank meets alike: each looks at the same files, the last rank's among them, not at its own."""
        own_file = path / rank_optimizer_file(self.ranks.rank)
        if not (path / rank_optimizer_file(0)).exists():
            raise ConfigError(
                f"{path} holds a whole optimizer state (saved without expert parallel), which expert_parallel="
                f"{self.config.expert_parallel} cannot split over the ranks; resume it without expert_parallel, or "
                f"start a new run from its weights with init_from={path}"
            )
        last_rank, past_the_last = (
            path / rank_optimizer_file(r) for r in (self.ranks.world_size - 1, self.ranks.world_size)
        )
        if not last_rank.exists() or past_the_last.exists():
            raise ConfigError(
                f"{path} holds expert-parallel optimizer state of another number of ranks; resume it with "
                f"expert_parallel={saved.get('expert_parallel')} on as many ranks, or start a new run from its weights "
                f"with init_from={path} (a fresh optimizer)"
            )
        if saved.get("parallel", self.config.parallel) != self.config.parallel:
            raise ConfigError(
                f"{own_file} holds the optimizer state of an expert-parallel run with parallel={saved['parallel']}; "
                f"resume it with parallel={saved['parallel']} (this run has parallel={self.config.parallel})"
            )
        load_optimizer_state(self.optimizer, load_training_file(own_file), own_file)

    def _load_compression(self, saved: dict[str, Any], path: Path) -> None:
        """What this rank's gradient compression kept (int8's residuals, PowerSGD's step, errors and factors), saved
        with the same grad_compression at as many ranks; else it starts afresh, with a warning. Every rank decides
        alike: PowerSGD's step sets which collectives they run."""
        if self.comm is None or not self.comm.keeps_state:
            return
        files = (path / rank_compression_file(rank) for rank in itertools.count())
        saved_ranks = sum(1 for _ in itertools.takewhile(Path.exists, files))
        scheme = saved.get("grad_compression")
        if scheme != self.config.grad_compression:
            why = f"it was saved with grad_compression={scheme}"
        elif saved_ranks == 0:  # one process compresses nothing; torchrun ranks save their state in every checkpoint
            why = "it holds no compression state (saved by one process, which exchanges no gradients)"
        elif saved_ranks != self.ranks.world_size:
            why = f"it holds the compression state of {saved_ranks} ranks, not {self.ranks.world_size}"
        else:
            own_file = path / rank_compression_file(self.ranks.rank)
            self.comm.load_state_dict(load_training_file(own_file, self.ranks.device))
            return
        self._say(
            f"warning: {path}: {why}; grad_compression={self.config.grad_compression} starts afresh (error "
            "feedback, PowerSGD's warm-up), so the losses differ from those of an uninterrupted run"
        )

    def _later_checkpoints_note(self) -> str:
        """The end of the `resumed from` line of a run resumed from a checkpoint before its out_dir's newest: its
        first save deletes the later ones (`prune_checkpoints`)."""
        later = [saved.name for saved in list_checkpoints(self.out_dir) if step_number(saved) > self.step]
        if not later:
            return ""
        return (
            f"; its first save deletes the run's later checkpoints {', '.join(later)}, of the history it leaves (move "
            f"them out of {checkpoint_dir(self.out_dir)} to keep them)"
        )

    def _other_run_note(self, checkpoint: Path) -> str:
        """The end of the `resumed from` line of a run going on from another run's checkpoint (HF's
        resume_from_checkpoint into a new output_dir): where it now writes, and that the other run stays as it was."""
        run = another_run(checkpoint, self.out_dir)
        if run is None:
            return ""
        return (
            f"; a checkpoint of the run {run}, which is left as it was: this run goes on in {self.out_dir} (its "
            f"checkpoints, {METRICS_FILE} and {CONFIG_FILE}), where --resume continues it"
        )

    def _last_checkpoint_text(self) -> str:
        try:
            return str(latest_checkpoint(self.out_dir))
        except FileNotFoundError:
            return "none yet"

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ranks.device.type, dtype=self.autocast_dtype)

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.ranks.is_main:
            append_metrics(self.out_dir, metrics)

    def _kept_metrics(self) -> list[dict[str, Any]] | None:
        """The lines of metrics.jsonl the run keeps (None: it has none): those before the step a resumed run starts
        from (and that step's, less its evaluation when it runs again), so that it tells one history. A last line cut
        short (what a run killed while writing it leaves) is dropped with a warning; a damaged earlier one is an error
        naming it."""
        path = self.out_dir / METRICS_FILE
        if not path.is_file():
            return None
        records = read_metrics_file(path, on_torn_tail=lambda why: self._say(f"warning: {why}"))
        redone = self.evaluation_pending  # this step's evaluation runs again: one an earlier resume logged goes
        return [
            record
            for record in records
            if record["step"] < self.step or record["step"] == self.step and not (redone and is_evaluation(record))
        ]

    def _progress(self, metrics: dict[str, Any], eta_seconds: float, first: bool) -> None:
        loss = (  # a step that trained no labelled token (on-policy answers) has no next-token loss
            f"loss {metrics['lm_loss']:.4f} (total {metrics['loss']:.4f})"
            if "lm_loss" in metrics
            else f"loss (total) {metrics['loss']:.4f}"
        )
        shown = getattr(self.source, "progress_metrics", ())  # a batch source's own: RL's reward and accuracy
        own = "".join(f"  {name} {metrics[name]:.3f}" for name in shown if name in metrics)
        line = (
            f"step {self.step}/{self.config.max_steps}  {loss}{own}  "
            f"{metrics['tokens_per_s']:,.0f} tok/s  {mfu_text(metrics['mfu'])}  "
            f"ETA {eta_text(eta_seconds)}"
        )
        if self.threads.watches and metrics["threads"] < self.threads.most:
            line += f"  {metrics['threads']} of {self.threads.most} threads (other processes busy)"
        if "mix" in metrics:
            line += "  mix " + " ".join(f"{name.removeprefix('train_')} {w:.0%}" for name, w in metrics["mix"].items())
        if sys.stderr.isatty():
            self._say(redrawn_in_place(line, stderr_columns()), end="\n" if self.is_last_step else "")
        elif self.step % PROGRESS_EVERY == 0 or self.is_last_step or first:
            self._say(line)

    def _peak_beaten(self, mfu: float) -> bool:
        """Whether a step's MFU came out above 100% on any rank (each times its step): every rank then probes again,
        in turns as at the start, where each rank deciding alone probed on the cores others were probing on."""
        beaten = torch.tensor([float(mfu > 1)], device=self.ranks.device)
        return distributed.all_reduce_sum(beaten, self.ranks).item() > 0

    def _device_kind(self) -> str:
        """What `peak_flops` is the peak of: one card (a rank's), or one machine's CPUs (all its ranks')."""
        return "machine (its CPUs, which its ranks share)" if self.ranks_cpus else "card"

    def _ranks_peak(self, rank_peak: float) -> float:
        """All ranks' peak FLOP/s from this rank's: a card's once per rank, a CPU's bounded by the cores ranks share."""
        if not self.ranks_cpus:
            return rank_peak * self.ranks.world_size
        return shared_cpu_peak_flops(rank_peak, self.threads.most, self.ranks_cpus, self.ranks.rank)

    def _say(self, text: str, end: str = "\n") -> None:
        if self.ranks.is_main:
            print(text, end=end, file=sys.stderr, flush=True)
            self.line_open = not end
