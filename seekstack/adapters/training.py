"""`seekstack lora train`: a LoRA adapter trained by the pretraining trainer, the base model frozen.

The run is an ordinary training run (same loop, metrics.jsonl, progress, atomic checkpoints, exact resume) whose
`init_from` is the base and whose model hooks (`LoraHooks`) wrap the base with peft and write only the adapter into
each checkpoint. The adapter folder is the run's `out_dir`: checkpoints/step_N hold each saved adapter with its
train_state.pt, and the folder itself gets the last one's adapter_config.json and adapter_model.safetensors.
DATA is token shards, text or chat conversations (seekstack.adapters.data).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import nn

from seekstack.adapters.config import CONFIG_FILE, LORA_DEFAULTS, AdapterConfig
from seekstack.adapters.data import (
    chat_source,
    first_batches,
    frequent_tokens,
    prepare_data,
    require_text_windows,
    resumed_data,
)
from seekstack.adapters.files import (
    adapter_state,
    apply_lora,
    publish_adapter,
    quantized_base_error,
    restore_adapter,
    save_adapter,
)
from seekstack.adapters.flops import lora_training_flops
from seekstack.atomic import missing_folders, remove_while_empty
from seekstack.checkpoint import read_config, stores_quantized_weights
from seekstack.config import ModelConfig
from seekstack.model.transformer import Transformer
from seekstack.parallel.distributed import done_by_main, init_distributed, is_main_process, shutdown
from seekstack.posttrain.config import ConversationConfig
from seekstack.posttrain.conversations import HELD_OUT_FILE
from seekstack.schema import (
    ConfigError,
    field_notes,
    known_fields,
    load_config,
    refuse_empty_paths,
    require,
    same_value,
)
from seekstack.train.config import CONFIG_FILE as TRAIN_CONFIG_FILE
from seekstack.train.config import TrainConfig, resolve_train_config
from seekstack.train.runs import another_run, list_checkpoints, out_dir_held, refuse_new_run_into, run_holding
from seekstack.train.state import refuse_another_runs_checkpoint
from seekstack.train.trainer import TrainResult, train

if TYPE_CHECKING:
    import peft

PREFIX = "lora."  # overrides of AdapterConfig fields on the command line: lora.rank=16
START_BATCHES = 16  # init=eva: the first training batches whose layer inputs give A (cycled until it settles)


@dataclass
class LoraTrainConfig(TrainConfig):
    """The TrainConfig of a `lora train` run, whose unknown keys are told as `seekstack sft`'s are: TRL's SFTConfig
    names (learning_rate, per_device_train_batch_size, ...) and peft's and TRL's LoRA names (lora_r, lora_alpha, ...),
    each naming the field that is theirs."""

    field_notes: ClassVar[dict[str, str]] = {
        **ConversationConfig.field_notes,
        "max_length": "TRL's max_length is seq_len here (a conversation's row is cut there, keeping its start; text is "
        "read in windows of seq_len tokens)",
        **AdapterConfig.field_notes,
    }

    def read_from_init_from_on_resume(self) -> str:
        return "the base model its adapter trains on"


@dataclass
class LoraHooks:
    """The trainer's model hooks for LoRA: wrap the base with peft, checkpoint the adapter, restore it on resume.

    A PiSSA/OLoRA run (`init`) keeps the factors it started from, to save each adapter on the original base; an EVA
    run starts its A factors from the layers' inputs on `start_batches`; with LoRA+ (`loraplus_ratio`) every B factor
    carries the `lr_scale` the trainer's optimizer gives its group."""

    config: AdapterConfig
    base_path: str
    head_token_ids: Sequence[int] = ()  # the config's head_tokens most frequent training tokens
    embedding_token_ids: Sequence[int] = ()  # the config's embedding_tokens most frequent training tokens
    start_batches: Sequence[torch.Tensor] = ()  # init=eva: the run's first training batches (data.first_batches)
    initial: dict[str, torch.Tensor] | None = field(default=None, init=False)  # a PiSSA/OLoRA run's A0, B0

    def prepare(self, model: Transformer) -> nn.Module:
        eva = None
        if self.config.init == "eva":  # the base's layer inputs on the training data, before peft wraps the layers
            config = self.config.peft_config(model.config, self.head_token_ids, self.embedding_token_ids)
            eva = eva_components(model, config, self.start_batches)
        peft_model = apply_lora(model, self.config, self.base_path, self.head_token_ids, self.embedding_token_ids)
        if eva is not None:
            eva_start(peft_model, eva)
        if self.config.init in ("pissa", "olora"):
            self.initial = {key: tensor.detach().clone() for key, tensor in adapter_state(peft_model).items()}
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.lr_scale = self.config.loraplus_ratio
        return peft_model

    def write(self, model: nn.Module, folder: Path) -> None:
        save_adapter(model, folder, self.initial)

    def restore(self, model: nn.Module, folder: Path) -> None:
        restore_adapter(model, folder, converted=self.initial is not None)

    def training_flops(self, config: ModelConfig, positions: int, seq_len: int) -> int:
        return lora_training_flops(config, self.config, seq_len, positions)


def eva_components(
    model: Transformer, config: peft.LoraConfig, batches: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """EVA (peft's `get_eva_state_dict`) on the base: per adapted layer, the top right singular vectors of its inputs
    over `batches` (incremental PCA until they settle), as many as its rank; with eva_rho > 1 the layers' ranks are
    redistributed by explained variance at the same total (a layer may get 0). Only the LoRA layers are read, not
    the token-row wrappers (on the peft model they would take part of the total)."""
    from peft import get_eva_state_dict

    modules, parameters = config.target_modules or [], config.target_parameters or []
    config.target_modules = [*modules, *(name.rsplit(".", 1)[0] for name in parameters)]  # EVA finds layers by these
    components = get_eva_state_dict(
        model,
        list(batches),
        config,
        forward_fn=lambda base, batch: base(batch, keep_logits=False),
        prepare_model_inputs_fn=None,  # every position of a training window counts (no padding)
        prepare_layer_inputs_fn=lambda inputs, _, __: inputs[0].reshape(-1, inputs[0].shape[-1]),
        show_progress_bar=False,
    )
    return {f"base_model.model.{name}": vectors for name, vectors in components.items()}


def eva_start(model: peft.PeftModel, components: dict[str, torch.Tensor]) -> None:
    """Each LoRA layer's A = its EVA `components` (peft's `initialize_lora_eva_weights`; B = 0), at their rank. The
    saved config stays plain LoRA: the targets as given less those left at rank 0, EVA's ranks as rank_pattern
    (parameter targets by their parameter's name, as peft matches them; peft rewrites them as module targets)."""
    from peft import initialize_lora_eva_weights
    from peft.tuners.lora import LoraLayer

    config = model.peft_config["default"]
    modules, parameters = config.target_modules or [], config.target_parameters or []
    initialize_lora_eva_weights(model, eva_state_dict=components, show_progress_bar=False)
    kept = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    config.target_modules = sorted(name for name in modules if name in kept) or None
    config.target_parameters = sorted(name for name in parameters if name.rsplit(".", 1)[0] in kept) or None
    by_module = {name.rsplit(".", 1)[0]: name for name in config.target_parameters or []}
    for pattern in (config.rank_pattern, config.alpha_pattern):
        for module in [name for name in pattern if name in by_module]:
            pattern[by_module[module]] = pattern.pop(module)
    config.init_lora_weights, config.eva_config = True, None


class LoraRun(NamedTuple):
    """A `lora train` run as `lora_train_config` resolves it and `train_adapter` trains it."""

    config: TrainConfig
    adapter: AdapterConfig
    continued: Path | None  # the other run whose checkpoint this one continues into its out_dir (`started_run`)


def lora_train_config(
    base: str | Path | None,
    data_dir: str | Path | None,
    out: str | Path,
    overrides: Sequence[str] = (),
    resume: bool | Path = False,
    warn: Callable[[str], None] | None = None,
) -> LoraRun:
    """The run's TrainConfig and AdapterConfig: `lora.FIELD=V` overrides go to the adapter, the rest to training.

    Both are checked before DATA is prepared (text tokenized into `out`, seekstack.adapters.data). A resumed run
    starts from the configs saved in `out`, its adapter's as they are (its checkpoints hold factors of that shape), or
    where `out` holds no run and `resume` is another run's checkpoint folder, from that run's (`started_run`, returned
    as `continued`); a new run refuses an `out` that holds a run already. An override of a path field left empty
    (`init_from=`) is refused naming its key, as `seekstack train` refuses it."""
    refuse_empty_paths(overrides)
    adapter_overrides = _adapter_overrides(overrides)
    train_overrides = [o for o in overrides if not o.startswith(PREFIX)]
    run = started_run(resume, out) if resume else Path(out)
    saved = run / CONFIG_FILE
    if resume and data_dir is not None:  # the run's own tokens when DATA is the text they were tokenized from
        data_dir = resumed_data(data_dir, run)
    given = [f"{name}={value}" for name, value in (("init_from", base), ("data_dir", data_dir)) if value is not None]
    if resume:
        if adapter_overrides:
            raise ConfigError(
                f"{PREFIX}{adapter_overrides[0]}: a resumed run keeps the adapter settings it started with ({saved}); "
                "train a new adapter (another --out) to change them"
            )
        changes: list[str] = []  # told once the base and data are known to be the run's
        train_config = resolve_train_config(
            None,
            [f"out_dir={out}", *given, *train_overrides],
            resume,
            changes.append,
            cls=LoraTrainConfig,
            resume_reads_init_from=True,
        )
        refuse_another_base_or_data(train_config, run / TRAIN_CONFIG_FILE, resume)
        if warn is not None:
            for change in changes:
                warn(change)
        adapter, notes = load_config(AdapterConfig, saved, []).as_trained(read_config(train_config.init_from))
        if warn is not None:
            for note in notes:
                warn(f"{saved}: {note}")
        adapter = adapter.validate()
    else:
        if base is None or data_dir is None:
            raise ConfigError("a new LoRA run needs BASE (a checkpoint folder) and DATA (token shards, text or chat)")
        refuse_quantized_checkpoint(base)
        refuse_the_base_folder(base, out)
        refuse_new_run_into(out)  # a folder without a checkpoint starts anew, as with `seekstack train`
        with lora_keys():
            adapter = load_config(AdapterConfig, None, adapter_overrides).validate()
        refuse_more_rows_than_the_base_has(adapter, base)
        refuse_a_rank_the_init_cannot_give(adapter, base)
        overrides = [*LORA_DEFAULTS, f"out_dir={out}", *given, *train_overrides]
        train_config = resolve_train_config(None, overrides, cls=LoraTrainConfig)
    require(train_config.bias_update_rate == 0, "bias_update_rate", "0 for a LoRA run (the base stays frozen)")
    require(
        not (train_config.compile and (adapter.feed_forward or adapter.experts)),
        "compile",
        "false when lora.feed_forward or lora.experts are adapted: peft re-parametrizes those weights in every "
        "forward, which torch.compile recompiles layer by layer until it gives up and runs eager, slower than "
        "compile=false; "
        "set compile=false, or lora.feed_forward=[] lora.experts=[] to compile an attention-only adapter",
    )
    if not resume:  # keys checked first; under torchrun rank 0 alone tokenizes text
        ranks = init_distributed(cpu_collectives=train_config.cpu_offload)
        try:
            prepared = done_by_main(lambda: prepare_data(data_dir, base, out), ranks)
        finally:  # done or failed, the group is left: the trainer joins its own, and a refused run holds none
            shutdown(ranks)
        if prepared != Path(data_dir):  # text, tokenized into `out`: too little of it is named as the user gave it
            require_text_windows(data_dir, prepared, train_config)
        train_config = replace(train_config, data_dir=str(prepared))
    return LoraRun(train_config, adapter, None if run == Path(out) else run)


@contextmanager
def undone_if_refused(out: str | Path) -> Iterator[None]:
    """What a new run writes into `out` before its training starts (the tokenized text in data/, lora_config.json,
    `out` itself and the parents it made) is removed when the run is refused or interrupted before then, so that
    `out` is left as it was; once the trainer has passed its checks and written train_config.json, all of it stays.
    `out` is held meanwhile (`out_dir_held`): a run training there refuses this one before it writes anything, and
    what that run writes meanwhile is never taken for this one's."""
    out = Path(out).absolute()
    made = missing_folders(out)
    main = is_main_process()  # as the trainer: under torchrun, rank 0 alone holds `out` and undoes what was written
    with out_dir_held(out) if main else nullcontext():
        out.mkdir(parents=True, exist_ok=True)
        before = set(os.listdir(out))
        started = out / TRAIN_CONFIG_FILE
        stamp = started.stat().st_mtime_ns if started.exists() else None
        try:
            yield
        except BaseException:
            if main and (started.stat().st_mtime_ns if started.exists() else None) == stamp:
                for name in sorted(set(os.listdir(out)) - before):
                    path = out / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                remove_while_empty(made)
            raise


def refuse_more_rows_than_the_base_has(adapter: AdapterConfig, base: str | Path) -> None:
    """A ConfigError naming lora.head_tokens or lora.embedding_tokens, before the run writes anything, when it asks
    for more trained rows than the base's head and embedding have (its vocab_size)."""
    config, config_file = read_config(base), Path(base) / "config.json"
    for name in ("head_tokens", "embedding_tokens"):
        require(
            getattr(adapter, name) <= config.vocab_size,
            PREFIX + name,
            f"at most {config.vocab_size:,}, the rows of the base's head and embedding (vocab_size in {config_file})",
        )


def refuse_a_rank_the_init_cannot_give(adapter: AdapterConfig, base: str | Path) -> None:
    """A ConfigError naming lora.rank, before the run writes anything, when lora.init is pissa or olora and the rank is
    more than an adapted weight's smaller side: its SVD (QR) has no more directions, so peft starts that layer's
    factors at the smaller rank under adapter_config.json's r, and the adapter saved disagrees with its own r (generate,
    merge, serve and peft refuse it); or when lora.init is eva and round(rank x eva_rho), the singular vectors of a
    layer's inputs peft's EVA takes, is more than the inputs' width (peft's IncrementalPCA fails after the text is
    tokenized, naming no layer nor field)."""
    if adapter.init == "lora":
        return
    config = read_config(base)
    with torch.device("meta"):  # the weights' shapes alone
        model = Transformer(config)
    weights = {name: param.shape for name, param in model.named_parameters(remove_duplicate=False)}  # tied: both
    modules, parameters = adapter.targets(config)
    shapes = {name: weights[f"{name}.weight"] for name in modules}
    shapes.update((name.removesuffix(".weight"), weights[name]) for name in parameters)
    eva = adapter.init == "eva"
    side = (lambda shape: shape[1]) if eva else min  # EVA: a layer's inputs; pissa, olora: the weight's smaller side
    needed = round(adapter.rank * adapter.eva_rho) if eva else adapter.rank
    name, (rows, columns) = min(shapes.items(), key=lambda item: side(item[1]))
    limit = side((rows, columns))
    if eva:
        advice = (
            f"such that round(lora.rank x lora.eva_rho) = {needed} is at most {limit} with lora.init=eva: "
            f"{name}'s weight is {rows} x {columns}, whose {columns} inputs have no more singular vectors to start "
            "from; give a smaller lora.rank or lora.eva_rho, or leave that layer out (lora.attention, "
            "lora.feed_forward, lora.layers)"
        )
    else:
        advice = (
            f"at most {limit} with lora.init={adapter.init} (not {needed}): {name}'s weight is {rows} x {columns}, "
            f"whose {'SVD' if adapter.init == 'pissa' else 'QR decomposition'} gives no more directions to start "
            "from; give a smaller lora.rank, or leave that layer out (lora.attention, lora.feed_forward, "
            "lora.vocabulary, lora.layers)"
        )
    require(needed <= limit, PREFIX + "rank", advice)


def refuse_quantized_checkpoint(base: str | Path) -> None:
    """CheckpointError, before the run writes anything, when checkpoint `base` is stored quantized: the run would train
    on its dequantized weights an adapter that generate, merge and serve refuse on that base."""
    quantization = read_config(base).extra.get("quantization_config")
    if not stores_quantized_weights(quantization):  # none, or a transform_config alone (fused rotations)
        return
    groups = (quantization.get("config_groups") or {}).values()
    bits = sorted({group.get("weights", {}).get("num_bits") for group in groups} - {None}, reverse=True)
    scheme = ", ".join(f"int{b}" for b in bits) if bits else quantization.get("quant_method", "fp8")
    raise quantized_base_error(base, scheme)


def refuse_the_base_folder(base: str | Path, out: str | Path) -> None:
    """ConfigError, before the run writes anything, when `out` is the base checkpoint's own folder: transformers
    would then load that folder as base + adapter (it applies an adapter_config.json it finds beside config.json),
    and the run's files would mix with the model's."""
    if Path(out).resolve() == Path(base).resolve():
        raise ConfigError(
            f"--out {out} is the base checkpoint's folder: the adapter files there would make transformers load it as "
            "base + adapter; train the adapter into another folder (nothing was written)"
        )


@contextmanager
def lora_keys() -> Iterator[None]:
    """ConfigErrors about the AdapterConfig's fields name them as the command line sets them: `lora.rank`."""
    try:
        yield
    except ConfigError as error:
        if error.field is None:
            raise
        raise ConfigError(error.problem, PREFIX + error.field, error.source) from None


def _adapter_overrides(overrides: Sequence[str]) -> list[str]:
    """The `lora.FIELD=V` overrides as AdapterConfig's `FIELD=V`; a ConfigError for a FIELD it does not have."""
    known = [PREFIX + f.name for f in dataclasses.fields(AdapterConfig)]
    notes = {PREFIX + name: note for name, note in field_notes(AdapterConfig).items()}
    for override in (o for o in overrides if o.startswith(PREFIX)):
        key = override.partition("=")[0].strip()
        if key not in known:
            raise ConfigError(f"override {override!r}: unknown field {key!r}; {known_fields(key, known, notes)}")
    return [o.removeprefix(PREFIX) for o in overrides if o.startswith(PREFIX)]


def refuse_another_base_or_data(config: TrainConfig, saved: Path, resume: bool | Path) -> None:
    """A ConfigError when a resumed run's `config` names another base or DATA than the run it continues trains
    with (`saved`, its train_config.json): its adapter's factors are trained on that base and data. A saved path
    that names nothing any more (a relative one of a run copied or moved elsewhere) is the one given. The command it
    suggests resumes as `resume` asked (--resume, or --resume-from the checkpoint folder, which a run continued into
    an --out holding none needs)."""
    started = load_config(TrainConfig, saved)
    resumed = "--resume" if resume is True else f"--resume-from {shlex.quote(str(resume))}"
    command = f"seekstack lora train {resumed} --out {shlex.quote(config.out_dir)}"  # as a shell reads it
    for name, thing in (("init_from", "BASE"), ("data_dir", "DATA")):
        given, kept = getattr(config, name), getattr(started, name)
        if not same_value(name, kept, given) and Path(kept).exists():
            raise ConfigError(
                f"{given}: the run in {saved.parent} trains its adapter with {thing} {kept} ({saved}); resume it "
                f"with that {thing} (or none: `{command}`), or train a new adapter with this "
                f"{thing} into another --out"
            )


def started_run(resume: bool | Path, out: str | Path) -> Path:
    """The run folder whose configs (train_config.json, lora_config.json) and held-out record a resumed run in `out`
    goes on with: `out`'s own, or where `out` holds no run yet and `resume` is a checkpoint folder of another run
    (`lora train --resume-from FOLDER`), that run's, which continues into `out` as `seekstack train` and HF's
    `resume_from_checkpoint=path` continue another run's checkpoint into a new output folder. Refused: a checkpoint
    of another run when `out` holds one (`refuse_another_runs_checkpoint`, as `seekstack train` refuses it), or a
    folder no run holds (a ConfigError)."""
    out = Path(out)
    if not isinstance(resume, Path):
        return out  # `out`'s own newest checkpoint
    run = another_run(resume, out)
    if run is None and run_holding(resume) is not None:
        return out  # one of `out`'s own checkpoints
    refuse_another_runs_checkpoint(out, resume)
    if run is None or not (run / CONFIG_FILE).is_file():
        raise ConfigError(
            f"--resume-from {resume}: no checkpoint of a `lora train` run (out/checkpoints/step_N beside "
            f"out/{CONFIG_FILE}), whose adapter settings a run continued from it takes; give one, or train a new "
            f"adapter on a base of that checkpoint's weights (BASE {resume})"
        )
    return run


def train_adapter(
    train_config: TrainConfig, adapter: AdapterConfig, continued: Path | None, resume: bool | Path = False
) -> TrainResult:
    """Train the adapter (or continue the run in `out_dir`: from its newest checkpoint, or the checkpoint folder
    `resume` names, of the run `continued` when it is another's); the adapter files end up in `out_dir` itself, those
    of the checkpoint saved at the interruption when Ctrl-C stops the run."""
    rows = (adapter.head_tokens, adapter.embedding_tokens)
    head_ids, embedding_ids = (frequent_tokens(train_config.data_dir, count) if count else [] for count in rows)
    with lora_keys():
        adapter.peft_config(read_config(train_config.init_from), head_ids, embedding_ids)  # the targets fit the base
    batches = first_batches(train_config, START_BATCHES) if adapter.init == "eva" else []  # refuses chat data
    out = Path(train_config.out_dir)  # written only once the configuration holds
    out.mkdir(parents=True, exist_ok=True)
    if not resume or continued is not None:  # a new run, or another run's checkpoint continued in `out`
        adapter.save(out)
    held_out = continued / HELD_OUT_FILE if continued is not None else None
    if held_out is not None and not (out / HELD_OUT_FILE).is_file() and held_out.is_file():
        shutil.copyfile(held_out, out / HELD_OUT_FILE)  # the conversations the continued run holds out
    hooks = LoraHooks(adapter, str(Path(train_config.init_from).resolve()), head_ids, embedding_ids, batches)
    try:
        result = train(train_config, resume, hooks, chat_source(train_config, bool(resume)))
    except KeyboardInterrupt:  # the trainer saved a checkpoint first (once it trains): the folder's adapter is that
        saved = list_checkpoints(out)
        if saved:
            publish_adapter(saved[-1], out)
        raise
    if result.checkpoint is not None:
        publish_adapter(result.checkpoint, out)
    return result
