"""Training checkpoints: a `save_pretrained` directory plus `train_state.pt`, written atomically.

    out_dir/checkpoints/step_{N}/  config.json, model.safetensors (routing biases included), train_state.pt,
                                   tokenizer.json + tokenizer_config.json when the run knows its tokenizer
train_state.pt holds the step, the optimizer, the data position, the torch/numpy/python RNG states, the dtype the
steps computed in and whether the step's evaluation is still due (Ctrl-C during it); the schedules are functions of
the step (train/schedule.py), so no scheduler object is stored, only the anchors of a run resumed with another
max_steps.
"""

from __future__ import annotations

import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seekstack.atomic import (
    atomic_directory,
    clear_killed_writes,
    delete_directory,
    refusals_named,
    refuse_to_replace,
)
from seekstack.checkpoint import (
    MODEL_FOLDER_FILES,
    CheckpointError,
    CheckpointReader,
    check_safetensors,
    load_pretrained,
    read_config,
    refuse_hf_export,
    write_generation_config,
    write_pretrained_files,
)
from seekstack.checkpoint.keys import refused_global
from seekstack.infer.generation_config import GENERATION_CONFIG_FILE
from seekstack.model.transformer import Transformer
from seekstack.parallel.distributed import Ranks, barrier, broadcast_text
from seekstack.schema import ConfigError
from seekstack.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from seekstack.tokenizer import TOKENIZER_FILE, copy_tokenizer_config
from seekstack.train.config import CONFIG_FILE
from seekstack.train.runs import (
    STEP_DIR,
    TRAIN_STATE_FILE,
    another_run,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    run_holding,
    step_dir,
    step_number,
)

OPTIMIZER_DIR = "optimizer"  # sharded optimizer state of an FSDP run (torch.distributed.checkpoint)
TRAIN_STATE_KEYS = ("step", "data", "rng", "config")  # what every save writes in train_state.pt and a resume reads
# What a training file holds besides tensors, numbers, strings and containers: numpy's RNG state, an array of uint32,
# pickled by numpy 1 (numpy.core) or 2 (numpy._core)
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
NUMPY_ARRAY = [
    *((_RECONSTRUCT, f"{core}.multiarray._reconstruct") for core in ("numpy.core", "numpy._core")),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]
ModelWriter = Callable[[nn.Module, Path], None]  # writes a model's files into a checkpoint folder


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), numpy and python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states `rng_state` saved (CUDA's onto the devices visible here: `_set_cuda_rng_states`)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        _set_cuda_rng_states(state["cuda"])


def _set_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """The saved CUDA generator states onto the visible devices of the same index. A run saved where another number
    of GPUs was visible (resumed at another number of ranks, or CUDA_VISIBLE_DEVICES narrowed) restores the devices
    both have, with a warning: this rank's device is what its dropout draws on."""
    visible = torch.cuda.device_count()
    if len(states) != visible:
        warnings.warn(
            f"the checkpoint holds the CUDA RNG states of {len(states)} devices and {visible} are visible here: "
            f"restoring the first {min(len(states), visible)}; random draws on any other device differ from an "
            "uninterrupted run's",
            stacklevel=3,
        )
    for index, saved in enumerate(states[:visible]):
        torch.cuda.set_rng_state(saved, index)


def save_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    train_state: dict[str, Any],
    keep: int,
    extra_files: list[Path] = (),
    write_model: ModelWriter = write_pretrained_files,
    left_after: int | None = None,
) -> Path:
    """Write `checkpoints/step_{step}` whole or not at all (`atomic_directory`); keep the last `keep` (and delete
    those after step `left_after`: `prune_checkpoints`).

    `extra_files` (the tokenizer's) are copied in, so the directory is also a model an inference engine loads.
    `write_model` writes the model's files (by default the whole model; a LoRA run writes its adapter).
    """
    final = step_dir(out_dir, train_state["step"])
    with atomic_directory(final) as staging:
        write_training_files(staging, model, train_state, extra_files, write_model)
    prune_checkpoints(out_dir, keep, final, left_after)
    return final


def write_training_files(
    folder: Path,
    model: nn.Module,
    train_state: dict[str, Any],
    extra_files=(),
    write_model: ModelWriter = write_pretrained_files,
) -> None:
    """The model (config.json, safetensors; or what `write_model` writes), train_state.pt and `extra_files` (the
    tokenizer's JSON, under any name, its tokenizer_config.json, and a generation_config.json), into `folder`."""
    write_model(model, folder)
    torch.save(train_state, folder / TRAIN_STATE_FILE)
    for extra in map(Path, extra_files):
        if extra.name in (TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE):
            copy_model_folder_file(extra, folder, model.config.max_position_embeddings)
        else:  # the name every loader reads, whatever the file was called (`data tokenize --tokenizer dir/my.json`)
            shutil.copyfile(extra, folder / TOKENIZER_FILE)


def copy_model_folder_file(source: Path, folder: Path, context: int) -> None:
    """Copy file `source` into model folder `folder`; a tokenizer_config.json gets the model's `context` as its
    model_max_length (the length transformers' truncation cuts at), whatever the one copied said."""
    if source.name == TOKENIZER_CONFIG_FILE:
        copy_tokenizer_config(source, folder, context)
    else:
        shutil.copyfile(source, folder / source.name)


def rank_optimizer_file(rank: int) -> str:
    """The optimizer state of one rank of an expert-parallel run (its experts' moments differ from the others')."""
    return f"optimizer_rank{rank}.pt"


def rank_compression_file(rank: int) -> str:
    """What one rank's gradient compression keeps between steps (int8's residuals, PowerSGD's errors and factors)."""
    return f"compression_rank{rank}.pt"


def prune_checkpoints(out_dir: str | Path, keep: int, saved: Path, left_after: int | None = None) -> None:
    """Keep checkpoint `saved`, the one just written, and the `keep` - 1 before it; delete the others, each gone whole
    at once (`delete_directory`: a kill during the deletion leaves no step_N with some files gone for a resume or
    export to pick), and what saves and deletions killed outright left of any step's. Those after `saved` go too: a
    run resumed from an earlier checkpoint has left their history (and trimmed its metrics), and kept they would
    outrank the new ones, for this deletion and for the next --resume; so do, at a resumed run's first save, those
    after the step it resumed from (`left_after`), whatever their step: none of them is of its history."""
    saved_step = step_number(saved)
    if left_after is not None and left_after > saved_step:
        raise ValueError(
            f"prune_checkpoints: left_after={left_after} is after the step saved, {saved}; a resumed run saves after "
            "the step it went on from"
        )
    went_on_from = left_after if left_after is not None else saved_step  # no step is after it and before saved's

    def of_history(step: int) -> bool:  # at or below the one saved, and not of the history a resumed run left
        return step <= saved_step and not went_on_from < step < saved_step

    checkpoints = list_checkpoints(out_dir)
    kept = [checkpoint for checkpoint in checkpoints if of_history(step_number(checkpoint))][-keep:]
    for old in checkpoints:
        if old not in kept:
            delete_directory(old)
    clear_killed_writes(checkpoint_dir(out_dir), STEP_DIR.pattern)


@contextmanager
def shared_staging(final: Path, ranks: Ranks) -> Iterator[Path]:
    """`atomic_directory` for a folder every rank writes into (a sharded checkpoint, on storage all ranks see):
    rank 0 creates the hidden folder and tells the others where it is; it replaces `final` once all are done."""
    if ranks.is_main:
        with atomic_directory(final) as staging:
            broadcast_text(str(staging), ranks)
            yield staging
            barrier(ranks)
    else:
        staging = Path(broadcast_text("", ranks))
        with refusals_named(lambda: str(final)):  # a disk refusing this rank's part, named as rank 0 names it
            yield staging
        barrier(ranks)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """The model (float32, on `device`) and the train state saved in checkpoint directory `path`."""
    path = Path(path)
    require_train_state(path)
    try:
        model = load_pretrained(path, dtype=torch.float32, device=device)
    except CheckpointError as error:  # a truncated, damaged or missing file of the weights or their config
        raise CheckpointError(f"{error}; or, to go on training, {resume_before(path)}") from None
    return model, read_train_state(path)


def read_train_state(path: str | Path) -> dict[str, Any]:
    """The train state saved in checkpoint directory `path` (step, optimizer, data position, RNG states); a
    CheckpointError naming the file and the keys it lacks of those every save writes and every resume reads
    (`TRAIN_STATE_KEYS`), where a resume failed with a bare KeyError: 'rng'."""
    require_train_state(Path(path))
    file = Path(path) / TRAIN_STATE_FILE
    state = load_training_file(file)
    held = list(state) if isinstance(state, dict) else []
    missing = [key for key in TRAIN_STATE_KEYS if key not in held]
    if missing:
        what = f"keys {', '.join(map(str, held))}" if held else f"a {type(state).__name__}, not a dict of them"
        raise CheckpointError(
            f"{file}: no {', '.join(missing)} in it (it holds {what}): not a train state seekstack saved, or altered "
            f"since; {resume_before(path)}"
        )
    return state


def resumed_checkpoint(out_dir: str | Path, resume: bool | Path) -> Path:
    """The checkpoint a run in `out_dir` resumes from (`resume`: True, its newest; or a checkpoint folder), refused
    (FileNotFoundError, `require_train_state`) where there is none to resume from, and where it is another run's while
    `out_dir` holds a run (`refuse_another_runs_checkpoint`)."""
    path = latest_checkpoint(out_dir) if resume is True else Path(resume)
    require_train_state(path)
    refuse_another_runs_checkpoint(out_dir, path)
    return path


def refuse_another_runs_checkpoint(out_dir: str | Path, checkpoint: Path) -> None:
    """ValueError where `checkpoint` is another run's while `out_dir` holds a run (its train_config.json): continued
    there, it would trim that run's metrics.jsonl and log the other run's steps after it (another run's checkpoint goes
    on in an out_dir that holds no run yet). `seekstack train` and the other stages, and `lora train`, refuse it."""
    out_dir, run = Path(out_dir), another_run(checkpoint, out_dir)
    if run is not None and (out_dir / CONFIG_FILE).is_file():
        raise ValueError(
            f"{checkpoint} is a checkpoint of the run {run}, and {out_dir} holds another run (its {CONFIG_FILE}): "
            f"going on from it there would trim that run's metrics.jsonl and log {run}'s steps after it, two runs in "
            f"one; continue {run} into a folder that holds no run yet, or {out_dir} from one of its own checkpoints "
            f"({checkpoint_dir(out_dir)}/step_N: --resume-from N, or --resume)"
        )


def require_train_state(path: Path) -> None:
    """FileNotFoundError saying why `path`, given as a training checkpoint, is none: no such folder, or a folder
    without train_state.pt (a save cut short, a model folder, another folder), and which checkpoints its run holds."""
    if (path / TRAIN_STATE_FILE).is_file():
        return
    run = run_holding(path)
    if not path.exists():
        what = "no such folder"
    elif not path.is_dir():
        what = "a file, not a checkpoint folder"
    elif run is not None:
        what = f"holds no {TRAIN_STATE_FILE}: a save cut short, or a model copied there"
    elif (path / "config.json").is_file():
        what = (
            f"holds no {TRAIN_STATE_FILE}: it is a model checkpoint, not a training one (load it with "
            f"load_pretrained, or start a new run from it with init_from={path})"
        )
    else:
        what = f"holds no {TRAIN_STATE_FILE} (nor a model's config.json): not a training checkpoint"
    if run is None and checkpoint_dir(path).is_dir():
        run = path
    raise FileNotFoundError(f"{path}: {what}{checkpoints_of(run)}")


def checkpoints_of(run: Path | None) -> str:
    """The complete checkpoints run `run` holds, as the end of a message ('' for no run)."""
    if run is None:
        return ""
    found = [checkpoint.name for checkpoint in list_checkpoints(run)]
    if not found:
        return f"; the run {run} holds no complete checkpoint"
    return f"; the run {run} holds {', '.join(found)} (--resume, resume=True, continues from the newest, {found[-1]})"


def load_training_file(file: Path, map_location: torch.device | str = "cpu") -> Any:
    """A file of a training checkpoint besides its model (train_state.pt, a rank's optimizer or gradient compression
    state), read as `torch.load(weights_only=True)` reads: a file holding anything else than what such a file holds
    (a pickle that runs code as it loads) is refused, not run; CheckpointError naming it, and one cut short."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY):
            return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle and zip errors of a truncated or damaged file, or of one holding code
        unsafe = refused_global(error)
        if unsafe is not None:
            raise CheckpointError(
                f"{file}: holds a Python object of {unsafe}, which no training checkpoint holds and which loading "
                "would run: refused (torch.load weights_only=True); it was not written by seekstack, or altered since"
            ) from None
        raise CheckpointError(
            f"{file}: not a readable training state ({error}); it is truncated or damaged: {resume_before(file.parent)}"
        ) from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], source: Path) -> None:
    """`optimizer.load_state_dict(saved)`, the state read from file `source`; CheckpointError naming it where that
    state is another optimizer's (other parameter groups, or groups of other sizes), where torch's error named none."""
    try:
        optimizer.load_state_dict(saved)
    except ValueError as error:
        raise CheckpointError(
            f"{source}: its optimizer state does not fit this run's optimizer ({error}): it was saved for other "
            f"parameters; start a new run from the checkpoint's weights with init_from={source.parent}"
        ) from None


@contextmanager
def restoring(
    path: Path,
    key: str,
    errors: tuple[type[Exception], ...] = (LookupError, TypeError, ValueError, AttributeError, RuntimeError),
) -> Iterator[None]:
    """Restoring entry `key` of checkpoint `path`'s train_state.pt: the `errors` torch, numpy or python raise on a value
    altered by hand (a bare KeyError: 'seed', a tensor of another size) as a CheckpointError naming the file and the
    key; a ConfigError or CheckpointError passes as it is."""
    try:
        yield
    except (ConfigError, CheckpointError):
        raise
    except errors as error:
        raise CheckpointError(
            f"{path / TRAIN_STATE_FILE}: its {key!r} cannot be restored ({type(error).__name__}: {error}): it is not "
            f"as seekstack saves it (altered since, or damaged); {resume_before(path)}"
        ) from None


def resume_before(path: str | Path) -> str:
    """What to do about a damaged training checkpoint `path`: resume from the one before it."""
    return (
        f"move {path} out of {Path(path).parent}, and --resume continues from the checkpoint before it (if the run "
        "kept one)"
    )


def export_checkpoint(source: str | Path, out: str | Path) -> Path:
    """The model of a training checkpoint (or of a run's newest one) as a plain Hugging Face-format folder: the
    same config, safetensors and tokenizer files, without the training state. The tokenizer_config.json's
    model_max_length becomes the model's context (a checkpoint written before 3 December 2026 says the tokenizer's
    4096), and a checkpoint without a generation_config.json (saved before 5 December 2026) gets the one
    transformers writes (`write_generation_config`). `init_from` reads it back."""
    source = Path(source)
    if not (source / TRAIN_STATE_FILE).is_file():
        source = latest_checkpoint(source)
    config = read_config(source)
    refuse_hf_export(config, out)
    refuse_to_replace(out, MODEL_FOLDER_FILES, inputs=(source,))
    out = Path(out)
    # the model's files alone: not train_state.pt, a post-training run's own state (distill_state.pt), eval/
    files = [e for e in source.iterdir() if e.is_file() and any(fnmatch(e.name, p) for p in MODEL_FOLDER_FILES)]
    with CheckpointReader(source, None):  # weights missing (no model.safetensors, or a shard its index names)
        pass
    for weights in (e for e in files if e.suffix == ".safetensors"):
        check_safetensors(weights)  # a damaged checkpoint is refused here, not when the export is loaded
    with atomic_directory(out) as staging:
        for entry in files:
            copy_model_folder_file(entry, staging, config.max_position_embeddings)
        if not (staging / GENERATION_CONFIG_FILE).is_file():  # a checkpoint saved before they held one
            write_generation_config(config, staging)
    return out
