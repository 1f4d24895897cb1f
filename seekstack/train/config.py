"""The training run's configuration: one `TrainConfig`, read from YAML or TOML plus `key=value` overrides.

The resolved configuration is written beside the run as `train_config.json`, so a run says how it was made;
`--resume` starts from it, and each override on top of it is reported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

from annotated_types import Interval

from seekstack.config import MTP_LOSS_WEIGHT, PRESETS, ConfigError, ModelConfig, preset
from seekstack.schema import (
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    apply_overrides,
    check,
    is_path_field,
    nested_config,
    overridden_field,
    read_config_file,
    recheck,
    require,
    require_known_fields,
    resolve_paths,
    same_value,
    settable_fields,
    write_config,
)

if TYPE_CHECKING:
    from seekstack.tokens.bandit import Exp3Mixture
    from seekstack.tokens.mixture import MixtureSchedule

CONFIG_FILE = "train_config.json"
TRAIN_SPLIT = "train"
VAL_SPLIT = "val"  # the split evaluations score
Beta = Annotated[float, Interval(ge=0, lt=1)]
Seed = Annotated[int, Interval(ge=0, lt=2**32)]  # numpy's seeds are 32-bit
T = TypeVar("T", bound="TrainConfig")


@dataclass
class TrainConfig:
    """Everything a pre-training run needs. Batch sizes count sequences of `seq_len` tokens, over all ranks."""

    # Fields naming a checkpoint folder (or, tokenizer, one holding its tokenizer.json), where a run's out_dir stands
    # for its newest checkpoint (resolve_train_config)
    checkpoint_fields: ClassVar[tuple[str, ...]] = ("init_from", "tokenizer")
    model: str = "tiny"  # a preset name of seekstack.config.PRESETS
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the preset
    # A checkpoint folder (Hugging Face format: ours, an export, a DeepSeek release), or a run's out_dir for its newest
    # checkpoint, whose weights start the run; model and model_overrides, when given, must then describe its model.
    init_from: str = ""
    data_dir: str = "data/tokens"  # holds train_index.json (and val_index.json): where `data tokenize` writes
    # Splits of data_dir to draw from, each with a weight or one weight per phase (phases cut training evenly),
    # e.g. {train_easy: [0.7, 0.2, 0.1], train_medium: [0.2, 0.5, 0.3], train_hard: [0.1, 0.3, 0.6]}; {} = train
    mixture: dict[str, Any] = field(default_factory=dict)
    # schedule: the weights `mixture` gives; bandit: EXP3 learns them from each source's training loss (Online Data
    # Mixing, tokens/bandit.py), starting from the uniform mix, so give every source of `mixture` the same weight
    mixture_mode: Literal["schedule", "bandit"] = "schedule"
    bandit_reward_scale: PositiveFloat = 0.1  # bandit: reward = this x the loss (ODM's 1/10); larger moves faster
    # tokenizer.json (or its folder: a checkpoint's, or a run's out_dir for its newest checkpoint's) copied into
    # checkpoints; "" = the one data_dir records
    tokenizer: str = ""
    out_dir: str = "runs/tiny"  # metrics.jsonl, train_config.json, checkpoints/step_N
    seq_len: Positive = 256
    batch_size: Positive = 32  # sequences per micro-batch, summed over ranks
    # Conversations (sft; distill on data or task; lora train on a chat file): several in each row of up to seq_len
    # tokens (best-fit decreasing, TRL's packing=True with its "bfd" strategy), each attending within itself alone,
    # its positions from 0: the same loss and gradients as the conversations padded, without computing the padding.
    # batch_size then counts rows, each packing several. Token shards' windows hold no padding: refused there.
    packing: bool = False
    grad_accum_steps: Positive = 1  # micro-batches per optimizer step
    max_steps: Positive = 1000
    # Optimizer and schedule
    lr: PositiveFloat = 3e-3
    min_lr: NonNegativeFloat = 3e-4  # <= lr
    warmup_steps: NonNegative = 100
    schedule: Literal["cosine", "wsd"] = "cosine"  # cosine | wsd (warmup-stable-decay)
    # wsd: the last fraction of steps (after warmup) decays linearly to min_lr; 0: none (a stable phase to extend)
    wsd_decay_fraction: Fraction = 0.2
    weight_decay: NonNegativeFloat = 0.1
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    grad_clip: NonNegativeFloat = 1.0  # 0 disables clipping (the norm is still logged)
    # DeepSeek-V3 losses and balance
    mtp_loss_weight: NonNegativeFloat = MTP_LOSS_WEIGHT  # lambda early in training (V3 §4.2)
    mtp_loss_weight_late: NonNegativeFloat = 0.1  # lambda after `mtp_switch_fraction` of the steps
    mtp_switch_fraction: Fraction = 0.7
    bias_update_rate: NonNegativeFloat = 0.001  # gamma of the auxiliary-loss-free bias update; 0 disables it
    aux_loss_alpha: NonNegativeFloat = 1e-4  # sequence-wise balance loss weight, written into the model config
    # Evaluation and checkpoints
    eval_every: NonNegative = 100  # and at the last step; 0 disables evaluation
    eval_batches: Positive = 20  # global batches each evaluation scores (batch_size x grad_accum_steps rows each)
    save_every: NonNegative = 500  # a checkpoint is also written at the last step and on Ctrl-C
    keep_checkpoints: NonNegative = 3  # the newest kept, the older deleted; 0 keeps all (torchtitan's keep_latest_k)
    seed: Seed = 0
    # float32 | bfloat16 (autocast on CUDA and CPU; weights and optimizer stay float32) | auto: bfloat16 on a CPU
    # that trains the run faster in it (trainer.step_dtype: avx512_bf16 or amx_bf16 and micro-batches of 13+ GFLOP,
    # batch_size / ranks x seq_len tokens), else float32 (GPUs included), decided at the run's start: a resumed run
    # goes on in the dtype its checkpoint computed in (train_state.pt's `dtype`), on any machine
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # CPU threads of the steps. "auto": torch's setting while the machine's other cores sit idle, fewer while other
    # processes keep them busy: a split op ends in a barrier that then waits a time slice for a descheduled thread
    # (`tiny` trained at ~1,200 tok/s on 2 threads beside one busy process, ~2,700 on 1); every 20th step runs on one
    # thread to look (infer/threads.py LoadAwareThreads; a step's sums then differ in the last bits). N: every step
    # on N threads. 0: torch's setting throughout.
    threads: NonNegative | Literal["auto"] = "auto"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    compile: bool = False  # torch.compile each block
    float8: bool = False  # train the blocks' linear layers in float8 (torchao; GPUs with FP8 tensor cores only)
    # Scale-out under torchrun (one process ignores these): seekstack/parallel/
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 (ZeRO-3), parameters, gradients, optimizer sharded
    cpu_offload: bool = False  # fsdp: keep the sharded parameters and optimizer state in CPU memory
    expert_parallel: Positive = 1  # split routed experts over this many ranks (1, or all of them); ddp or fsdp
    # ddp: gradient all-reduce compression (parallel/compression.py)
    grad_compression: Literal["none", "bf16", "fp16", "powersgd", "int8", "int8_no_ef"] = "none"
    powersgd_rank: Positive = 4  # rank of PowerSGD's factors
    powersgd_start: Annotated[int, Interval(ge=2)] = 10  # steps of plain all-reduce before PowerSGD starts (>= 2)
    peak_flops: NonNegativeFloat = (
        0.0  # per device, for the MFU estimate: a card, or a machine's CPUs (its ranks share them); 0 = a default for
        # the device (see train/mfu.py)
    )

    def validate(self, source: str | None = None, resume: bool = False) -> TrainConfig:
        """This config checked: every field's type and range, the model overrides, the rules across fields. A run to
        `resume` needs its `init_from` only where it still reads something of it (`read_from_init_from_on_resume`)."""
        config = recheck(self, source)
        try:
            require(config.model in PRESETS, "model", f"a preset, one of {', '.join(PRESETS)}, not {config.model!r}")
            require(config.min_lr <= config.lr, "min_lr", f"at most lr={config.lr}, not {config.min_lr}")
            require(
                config.grad_compression == "none" or config.parallel == "ddp",
                "grad_compression",
                "'none' with parallel=fsdp (FSDP reduce-scatters; compression hooks are DDP's)",
            )
            require(not config.cpu_offload or config.parallel == "fsdp", "cpu_offload", "false unless parallel=fsdp")
            require_folder_path(config.out_dir, "out_dir")
            require(
                config.data_dir != "" or not config.reads_data_dir,
                "data_dir",
                "a folder of token shards, not '' (which would be the working folder; a shell variable left unset?)",
            )
            require(
                VAL_SPLIT not in config.mixture or not config.eval_every,
                "mixture",
                f"without the {VAL_SPLIT!r} split, which evaluations score (its val_loss would be a training loss); "
                "or set eval_every=0",
            )
            init_from, read_on_resume = config.init_from, config.read_from_init_from_on_resume()
            require(
                not init_from or Path(init_from).is_dir() or (resume and not read_on_resume),
                "init_from",
                f"an existing checkpoint folder, not {init_from!r}"
                + (f" (a resumed run reads {read_on_resume} from it)" if resume else ""),
            )
            if config.tokenizer:
                require_tokenizer_file(config.tokenizer, "tokenizer", "a tokenizer.json or a folder holding one")
            config.model_config()
            try:
                config.mixture_policy()
            except ValueError as error:
                raise ConfigError(f": {error}", field="mixture") from None
        except ConfigError as error:
            raise error.at(source) from None
        return config

    @property
    def reads_data_dir(self) -> bool:
        """Whether the run's rows come from `data_dir` (token shards; a LoRA run's chat file)."""
        return True

    def read_from_init_from_on_resume(self) -> str:
        """What a resumed run still reads from `init_from`, "" for nothing: pretraining trains on from its own
        checkpoint, so an init_from deleted since the run started does not stop it."""
        return ""

    def model_config(self) -> ModelConfig:
        """The model this run trains: the preset, `model_overrides` on top, and the run's balance-loss weight."""
        overrides = {**self.model_overrides, "aux_loss_alpha": self.aux_loss_alpha}
        try:
            return preset(self.model, **overrides)
        except ConfigError as error:
            raise ConfigError(f": {error}", field="model_overrides") from None

    def require_rows_within(self, context: int) -> None:
        """ConfigError naming seq_len when the run's rows (seq_len tokens) are longer than the model's `context`
        (max_position_embeddings); a stage whose rows are of another length (GRPO's: a prompt and a completion)
        checks its own."""
        if self.seq_len > context:
            raise ConfigError(
                f"has value {self.seq_len}: longer than the model's context (max_position_embeddings {context})",
                field="seq_len",
            )

    def trained_context(self) -> int:
        """The context (max_position_embeddings) of the model the run trains: init_from's, else the preset's with
        model_overrides."""
        if self.init_from:
            from seekstack.checkpoint import read_config

            return read_config(self.init_from).max_position_embeddings
        return self.model_config().max_position_embeddings

    def mixture_schedule(self) -> MixtureSchedule:
        """The schedule of `mixture`; the `train` split alone when it is empty."""
        from seekstack.tokens.mixture import MixtureSchedule

        return MixtureSchedule(self.mixture or {TRAIN_SPLIT: 1.0})

    def mixture_policy(self) -> MixtureSchedule | Exp3Mixture:
        """What draws the training rows' sources: the `mixture` schedule, or an EXP3 bandit over its sources."""
        from seekstack.tokens.bandit import Exp3Mixture

        schedule = self.mixture_schedule()
        return schedule if self.mixture_mode == "schedule" else Exp3Mixture.over(schedule, self.bandit_reward_scale)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, out_dir: str | Path) -> Path:
        """Write the resolved configuration to `out_dir/train_config.json`."""
        return write_config(self, Path(out_dir) / CONFIG_FILE)


nested_config(TrainConfig, "model_overrides", ModelConfig, prefix="model")


def require_folder_path(path: str, name: str) -> None:
    """A ConfigError naming the field `name` unless `path` is a folder or can be made one (no file in the way); an empty
    one (a shell variable left unset) would be the working folder."""
    require(path != "", name, "a folder, not '' (which would be the working folder; a shell variable left unset?)")
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    require(existing.is_dir(), name, f"a folder, not {path!r} ({existing} is a file)")


def require_tokenizer_file(path: str, name: str, expectation: str) -> None:
    """A ConfigError naming the field `name` unless its `path` is a tokenizer.json or a folder holding one."""
    from seekstack.tokenizer import tokenizer_json_path

    file = tokenizer_json_path(path)
    require(file.is_file(), name, f"{expectation}, not {path!r} (no such file: {file})")


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML/TOML/JSON file (or start from the defaults), apply `key=value` overrides, validate.

    `model.hidden_size=64` sets one entry of `model_overrides` and must name a ModelConfig field.
    """
    return resolve_train_config(path, overrides)


def resolve_train_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool | Path = False,
    warn: Callable[[str], None] | None = None,
    cls: type[T] = TrainConfig,
    resume_reads_init_from: bool = False,
) -> T:
    """The config of a run (a TrainConfig, or a stage's subclass of it). With `resume` (True, or the checkpoint
    folder to resume from), the run's saved `train_config.json` (in the `out_dir` the file or the overrides name,
    else the default; it holds the config of the run's last start or resume) is the base, and `warn` hears of every
    field the file or overrides change. A checkpoint folder of a run resumed into an out_dir holding no run yet takes
    that run's `train_config.json` (`_saved_config_file`).
    A resumed run trains on from its own checkpoint, so an `init_from` given then is not used: the run's own stays
    (what `warn` hears of), unless `resume_reads_init_from` (a LoRA run rebuilds its base from it) or the saved one
    names nothing any more (a relative path of a run copied or moved elsewhere).
    A run's out_dir given for a checkpoint (`init_from`) stands for its newest checkpoint, which `warn` hears of.
    Model settings the file or overrides give that are not the model of the checkpoint the run trains (`init_from`'s,
    or on resume its own) are refused: that model is trained whatever they say."""
    given = _given_values(path)
    source = str(path) if path is not None else None
    base: dict[str, Any] = {}
    if resume:
        probe = apply_overrides(cls, dict(given), [o for o in overrides if o.startswith("out_dir=")])
        saved_path = _saved_config_file(Path(probe.get("out_dir", cls.out_dir)), resume)
        base = _given_values(saved_path)
        require_known_fields(cls, base, str(saved_path))  # a field of another version, or edited in by hand
    values = apply_overrides(cls, {**base, **given}, overrides)
    if resume and not resume_reads_init_from:
        values = _kept_init_from(cls, values, base, warn)
    values = _checkpoints_of_runs(cls, values, warn, base)
    try:
        config = check(cls, values).validate(resume=bool(resume))
        _refuse_another_model(config, _model_settings(cls, given, overrides), resume)
        _require_rows_within_the_context(config)
        if resume:
            _require_data_dir(config)
            _require_saved_seed(config, base)
    except ConfigError as error:
        if resume and _kept_from_saved_config(cls, error, given, overrides):
            saved_value = read_config_file(saved_path).get(error.field) if is_path_field(error.field) else None
            moved = (  # a path the run saved relative to its folder; one saved absolute was deleted or moved itself
                " (its relative paths are relative to the run's folder, so a copied or moved run can lose what they "
                "name)"
                if isinstance(saved_value, str) and not Path(saved_value).is_absolute()
                else ""
            )
            raise ConfigError(
                f"{error.problem}; the run's saved config holds this value{moved}: give {error.field}=... on the "
                "command line to replace it",
                error.field,
            ).at(str(saved_path)) from None
        raise (error.at(_blamed(cls, error, overrides, source)) if source else error) from None
    if resume and warn is not None:
        saved = check(cls, base, str(saved_path))
        # another run's checkpoint goes on in the out_dir given, no change to warn of (the trainer's "resumed from"
        # line says where the run now writes); a saved path is relative to its file, the user's to the cwd
        own_run = saved_path.parent.resolve() == Path(config.out_dir).resolve()
        for f in dataclasses.fields(cls):
            old, new = getattr(saved, f.name), getattr(config, f.name)
            if not same_value(f.name, old, new) and (own_run or f.name != "out_dir"):
                warn(f"resuming with {f.name}={json.dumps(new)} (the run last ran with {json.dumps(old)})")
    return config


def _saved_config_file(out_dir: Path, resume: bool | Path) -> Path:
    """The train_config.json a resumed run starts from: its out_dir's, or where that holds none and `resume` is a
    checkpoint folder of another run (out_dir/checkpoints/step_N), that run's, as HF's
    `resume_from_checkpoint=path` and torchtitan's `initial_load_path` start an output folder from another run's
    checkpoint (the out_dir given stays the run's; none given, the checkpoint's own run trains on)."""
    from seekstack.train.runs import run_holding
    from seekstack.train.state import require_train_state

    own = out_dir / CONFIG_FILE
    if own.is_file():
        return own
    run = run_holding(resume) if isinstance(resume, Path) else None
    if run is not None and (run / CONFIG_FILE).is_file():
        return run / CONFIG_FILE
    if isinstance(resume, Path):  # a folder missing, or no training checkpoint, is told so before a config it lacks
        require_train_state(resume)
    elsewhere = (
        f"; {resume} is no checkpoint of a run holding one (out_dir/checkpoints/step_N beside out_dir/{CONFIG_FILE}): "
        f"copy its run's {CONFIG_FILE} into {out_dir}, or start a new run from its weights with init_from={resume}"
        if isinstance(resume, Path)
        else " (start without resume)"
    )
    raise ConfigError(f"{own}: no such file; a run to resume has its config there{elsewhere}")


def _kept_init_from(
    cls: type[TrainConfig], values: dict[str, Any], saved: dict[str, Any], warn: Callable[[str], None] | None
) -> dict[str, Any]:
    """`values` of a resumed run with the `saved` config's init_from in place of another given, which `warn` hears
    of: the run trains on from its own checkpoint, and its train_config.json keeps saying what it started from."""
    kept, given = saved.get("init_from", cls.init_from), values.get("init_from", cls.init_from)
    if same_value("init_from", kept, given) or (kept and not Path(kept).is_dir()):
        return values
    if warn is not None:
        started = f"from {kept}" if kept else "from scratch"
        warn(
            f"init_from={given} is not used on resume: the run trains on from its own checkpoint (it started "
            f"{started}, which its {CONFIG_FILE} keeps saying)"
        )
    return {**values, "init_from": kept}


def _checkpoints_of_runs(
    cls: type[TrainConfig], values: dict[str, Any], tell: Callable[[str], None] | None, saved: dict[str, Any]
) -> dict[str, Any]:
    """`values` with each checkpoint field that names a run's out_dir (`checkpoints/step_N` inside, no config.json;
    or its train_config.json or metrics.jsonl) set to the run's newest complete checkpoint, which `tell` hears of; a
    resumed run's `saved` config keeps the checkpoint of that run it took at its start (a distill teacher run that
    trained on since would otherwise swap the teacher mid-run)."""
    from seekstack.checkpoint.folder import CheckpointError
    from seekstack.train.runs import passed_over, run_checkpoint, run_folder, run_holding

    values = dict(values)
    for name in cls.checkpoint_fields:
        given = values.get(name)
        if not isinstance(given, str) or not given:
            continue
        run = run_folder(given)  # a run's train_config.json or metrics.jsonl: the run
        try:
            picked = run_checkpoint(run)
        except (FileNotFoundError, CheckpointError) as error:
            raise ConfigError(f": {error}", field=name) from None
        kept = saved.get(name)
        taken = run_holding(kept) if isinstance(kept, str) and kept and Path(kept).is_dir() else None
        if picked is not None and taken is not None and taken.resolve() == run.resolve():
            values[name] = kept
            if tell is not None and Path(kept).resolve() != picked.resolve():
                tell(f"{name}={given}: the resumed run keeps {kept}, the checkpoint it started with (newest: {picked})")
        elif picked is not None:
            values[name] = str(picked)
            if tell is not None:
                tell(f"{name}={given}: using the run's newest checkpoint, {picked}{passed_over(picked)}")
    return values


def _require_data_dir(config: TrainConfig) -> None:
    """A ConfigError naming data_dir when the run reads its rows there and nothing is there (a resumed run that was
    copied or moved loses a relative data_dir)."""
    data_dir = Path(config.data_dir)
    require(
        not config.reads_data_dir or data_dir.exists(),
        "data_dir",
        f"an existing folder of token shards, not {config.data_dir!r} (nothing at {data_dir.resolve()})",
    )


def _require_saved_seed(config: TrainConfig, saved: dict[str, Any]) -> None:
    """A ConfigError naming seed when a resumed run is given another than its `saved` config's: its data order and
    random state go on from its checkpoint, so the new seed would change nothing but what train_config.json says."""
    seed = saved.get("seed", type(config).seed)
    require(
        config.seed == seed,
        "seed",
        f"the run's {seed} on resume: a resumed run draws its data and random numbers on from its checkpoint, which "
        "no seed changes; for another seed start a new run (init_from= the checkpoint to keep its weights)",
    )


def _model_settings(cls: type[TrainConfig], given: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The model settings a config file or the overrides give, by key (`model`, `model.F` per ModelConfig field F).
    A file's `model` counts when it is not the default (--write-config writes every field, defaults included)."""
    model_fields = ("model", "model_overrides")
    on_command_line = [o for o in overrides if overridden_field(cls, o.partition("=")[0]) in model_fields]
    set_there = apply_overrides(cls, {}, on_command_line)
    preset_name = set_there.get("model", given.get("model", cls.model))
    settings = {"model": preset_name} if "model" in set_there or preset_name != cls.model else {}
    fields_set = {**given.get("model_overrides", {}), **set_there.get("model_overrides", {})}
    return settings | {f"model.{name}": value for name, value in fields_set.items()}


def _require_rows_within_the_context(config: TrainConfig) -> None:
    """The run's rows (`require_rows_within`) checked against the trained model's context before the run reads or
    tokenizes any data, or a config is written. An init_from without a readable config.json is left to the run, which
    names what it lacks."""
    from seekstack.checkpoint.keys import CheckpointError

    try:
        context = config.trained_context()
    except CheckpointError:
        return
    config.require_rows_within(context)


def _refuse_another_model(config: TrainConfig, settings: dict[str, Any], resume: bool | Path) -> None:
    """A ConfigError naming the first of the model `settings` given that the checkpoint the run trains holds otherwise
    (else the preset, `model`) when they describe another model than it (a new run from scratch builds what they
    say)."""
    from seekstack.checkpoint import read_config

    checkpoint = _trained_checkpoint(config, resume) if settings else None
    if checkpoint is None:
        return
    theirs, said = read_config(checkpoint), ModelConfig.from_dict(config.model_config().to_dict())  # as saved
    if "model" in settings:
        names = settable_fields(ModelConfig)
    else:
        names = [setting.removeprefix("model.") for setting in settings]
    differ = [name for name in names if name != "aux_loss_alpha" and getattr(said, name) != getattr(theirs, name)]
    if not differ:
        return
    given = ", ".join(f"{setting}={value}" for setting, value in settings.items())
    values = "; ".join(f"{name} {getattr(theirs, name)!r} there, {getattr(said, name)!r} here" for name in differ)
    how = "starts from it" if config.init_from else "is resumed from it"
    at_fault = [setting for setting in settings if setting.removeprefix("model.") in differ]
    raise ConfigError(
        f": {given} given, but the checkpoint {checkpoint} holds another model ({values}); a run that {how} trains "
        "its model: leave the model settings out",
        field=(at_fault or list(settings))[0],
    )


def _trained_checkpoint(config: TrainConfig, resume: bool | Path) -> Path | None:
    """The checkpoint whose model the run trains: `init_from`, else on resume the checkpoint folder given or the
    run's newest; None for a new run from scratch (or a resumed one that saved no checkpoint yet)."""
    from seekstack.train.runs import MODEL_CONFIG_FILE, list_checkpoints

    if config.init_from and Path(config.init_from).is_dir():  # on resume it may be gone, the run's checkpoint not
        return Path(config.init_from)
    if isinstance(resume, Path):  # one that is no checkpoint is named by the trainer, which reads it
        return resume if (resume / MODEL_CONFIG_FILE).is_file() else None
    found = list_checkpoints(config.out_dir) if resume else []
    return found[-1] if found else None


def _blamed(cls: type, error: ConfigError, overrides: Sequence[str], source: str) -> str:
    """Where the value of the field at fault came from: the command line's key=value, or else config file `source`.
    A key given is at fault where it is the field (`lr`), part of it (`betas.1` of `betas`), or the whole of it
    (`betas` of `betas.1`), not where it sets only the same top-level field (`model.num_hidden_layers` beside a
    `model.hidden_size` at fault, both in model_overrides); `model_overrides.hidden_size` is `model.hidden_size`."""
    if error.field is None:
        return source

    def path(key: str) -> list[str]:  # the field a key sets, then the keys within it
        return [overridden_field(cls, key), *key.strip().split(".")[1:]]

    field = path(error.field)
    keys = [path(override.partition("=")[0]) for override in overrides]
    at_fault = any(key[: len(field)] == field[: len(key)] for key in keys)  # one is the other or holds it
    return "key=value on the command line" if at_fault else source


def _kept_from_saved_config(cls: type, error: ConfigError, given: dict[str, Any], overrides: Sequence[str]) -> bool:
    """Whether the field at fault has the value a resumed run saved: neither the config file nor the command line
    gave one."""
    if error.field is None:
        return False
    given_fields = set(given) | {overridden_field(cls, override.partition("=")[0]) for override in overrides}
    return overridden_field(cls, error.field) not in given_fields


def _given_values(path: str | Path | None) -> dict[str, Any]:
    """The values a config file sets, its relative paths resolved against the file's folder."""
    if path is None:
        return {}
    path = Path(path)
    if path.is_dir():  # a run's out_dir, given as it is to the commands that take a run
        saved = path / CONFIG_FILE
        run = (
            f": a run's; continue it with `out_dir={path} --resume`, or start from its settings with {saved}"
            if saved.is_file()
            else ""
        )
        raise ConfigError(f"{path}: a folder, not a config file (.yaml, .yml, .toml or .json){run}")
    return resolve_paths(read_config_file(path), path.parent)
