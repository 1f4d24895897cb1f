"""Where a run keeps its checkpoints, found without torch: the command line resolves a run's out_dir to its newest
checkpoint while it parses its arguments, before a command imports the model (a Ctrl-C there is the command's own).

    out_dir/train_config.json       written at the run's start, before its first checkpoint
    out_dir/checkpoints/step_{N}/   complete while train_state.pt and its model's files are in it (train/state.py
                                    writes the folder whole; a file deleted or a copy cut short since makes it
                                    incomplete, and listings and resumes pass over it)
A run holds its out_dir (`out_dir_held`) from its first write into it to its end, so that no second run writes there
meanwhile.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from seekstack.checkpoint.folder import CONFIG_FILE as MODEL_CONFIG_FILE
from seekstack.checkpoint.folder import INDEX_FILE, SINGLE_FILE, CheckpointError, missing_shards, read_weight_map
from seekstack.schema import ConfigError
from seekstack.train.config import CONFIG_FILE
from seekstack.train.metrics import METRICS_FILE

TRAIN_STATE_FILE = "train_state.pt"
STEP_DIR = re.compile(r"step_(\d+)")
# A LoRA run's checkpoint holds its adapter's config and weights (adapters/files.py, named here without torch).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def run_folder(given: str | Path) -> Path:
    """The run folder `given` names: itself, or, where it names a run's train_config.json or metrics.jsonl (a file of
    that name) or its checkpoints/ folder (step_N inside, no config.json: torchtitan's checkpoint folder), the folder
    holding it, so that a command taking a run takes each for it (report, plot, and every command taking a run's
    out_dir for its newest checkpoint) and names what it writes after the run, not the file or folder given."""
    given = Path(given)
    if given.name in (CONFIG_FILE, METRICS_FILE) and given.is_file():
        return given.parent
    if given == checkpoint_dir(given.parent) and _step_named(given):
        return given if (given / MODEL_CONFIG_FILE).is_file() else given.parent
    return given


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: str | Path, step: int) -> Path:
    """The folder of step `step` under `out_dir`'s checkpoints: the step folder of that number there, however its
    number is written (step_04, renamed by hand: `--resume-from 4` and `step_04`, as the run's listings name it, take
    it, and a save of step 4 replaces it rather than making a second step 4 beside it), else step_{step}."""
    same = (folder for folder in step_folders(out_dir) if step_number(folder) == step)
    return next(same, checkpoint_dir(out_dir) / f"step_{step}")


def step_number(folder: Path) -> int:
    """N of a step_N folder."""
    return int(STEP_DIR.fullmatch(folder.name).group(1))


def step_folders(out_dir: str | Path) -> list[Path]:
    """The step_N folders under `out_dir`'s checkpoints, complete or not, oldest first. CheckpointError naming them
    where two are one step (step_3 and step_03: a copy renamed by hand), as torchtitan would not guess which of its
    step folders a step is either: every listing, resume and load of the run would pick one by the order the file
    system lists them."""
    root = checkpoint_dir(out_dir)
    found = sorted(_step_named(root), key=lambda p: (step_number(p), p.name))
    for older, newer in itertools.pairwise(found):
        if step_number(older) == step_number(newer):
            raise CheckpointError(
                f"{root}: {older.name} and {newer.name} are both step {step_number(older)}: remove or rename one "
                f"(a run saves step_{step_number(older)}), so that the step names one checkpoint"
            )
    return found


def _step_named(root: Path) -> list[Path]:
    """The entries of folder `root` named step_N, in no order, unchecked (none where `root` is no folder): what tells
    a run's checkpoints/ folder for one, whatever its step folders hold."""
    return [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name)] if root.is_dir() else []


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `out_dir` (`missing_files` none), oldest first."""
    return [folder for folder in step_folders(out_dir) if not missing_files(folder)]


def missing_files(folder: Path) -> list[str]:
    """The files step folder `folder` lacks to be a checkpoint: train_state.pt (a save cut short), its model's
    config.json and weights (a LoRA run's: its adapter's), or, with no model.safetensors, a shard its index names
    (deleted, or a copy cut short). A model.safetensors beside an index whose shards are gone is read past it, as
    the reader (and transformers) read it, so its shards are not asked for. An index the reader refuses (not JSON, no
    weight_map, a file name that is none) leaves the folder incomplete, lacking a valid index: a damaged older step
    folder is passed over as one cut short is, and keeps no run from its newer checkpoints."""
    missing = [] if (folder / TRAIN_STATE_FILE).is_file() else [TRAIN_STATE_FILE]
    if any((folder / name).is_file() for name in ADAPTER_FILES):
        return missing + [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if not (folder / MODEL_CONFIG_FILE).is_file():
        missing.append(MODEL_CONFIG_FILE)
    if (folder / SINGLE_FILE).is_file():
        return missing
    if (folder / INDEX_FILE).is_file():
        try:
            missing += missing_shards(folder / INDEX_FILE, read_weight_map(folder / INDEX_FILE))
        except CheckpointError:
            return missing + [f"valid {INDEX_FILE}"]
    else:
        missing.append(SINGLE_FILE)
    return missing


def passed_over(checkpoint: Path) -> str:
    """The incomplete step folders beside `checkpoint`, newer than it, each with what it lacks, as the end of a message
    naming `checkpoint` as a run's newest ('; passed over step_6 (no model.safetensors), incomplete'; '' for none): a
    resume from `checkpoint` overwrites them."""
    if not STEP_DIR.fullmatch(checkpoint.name):
        return ""
    newer = [p for p in step_folders(checkpoint.parent.parent) if step_number(p) > step_number(checkpoint)]
    incomplete = [_with_missing_files(p) for p in newer if missing_files(p)]
    return f"; passed over {', '.join(incomplete)}, incomplete" if incomplete else ""


def _with_missing_files(folder: Path) -> str:
    return f"{folder.name} (no {', '.join(missing_files(folder))})"


def refuse_new_run_into(out_dir: str | Path) -> None:
    """A new run into a folder that holds a run would trim its metrics and prune its checkpoints: refused, before the
    run builds anything (its data, its model, a post-training source). A run whose step folders are all incomplete
    (its weights deleted since) is one too: it is named with what they lack."""
    complete, saved = list_checkpoints(out_dir), step_folders(out_dir)
    if not saved:
        return
    held = f"checkpoint {complete[-1].name}" if complete else f"{_with_missing_files(saved[-1])}, incomplete"
    raise ConfigError(
        f"out_dir {out_dir} holds a run ({held}); continue it with --resume, or train into another out_dir"
    )


class RunInProgress(OSError):
    """Another run is training into the out_dir a run was to write."""


_HELD: set[tuple[int, int]] = set()  # (device, inode) of the out_dirs this process holds


@contextmanager
def out_dir_held(out_dir: Path) -> Iterator[None]:
    """Hold folder `out_dir` (made if missing) while a run writes into it; RunInProgress, naming it, while another
    run holds it (one started into the same out_dir at once, or a --resume of a run still training), where both would
    append to one metrics.jsonl and save checkpoints over each other's. An exclusive flock on the folder, which the
    kernel drops when the run ends, even killed; a file system without flock keeps no run out. A folder this process
    holds already (`lora train` holds its --out before its trainer does) is held again at no cost."""
    out_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(out_dir, os.O_RDONLY)
    status = os.fstat(descriptor)
    identity = (status.st_dev, status.st_ino)
    try:
        if identity in _HELD:
            yield
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInProgress(
                f"out_dir {out_dir}: another run is training into it now; wait for it to end (then --resume it), "
                "or train into another out_dir"
            ) from None
        except OSError:  # no flock here (NFS refuses one on a folder's read-only descriptor)
            pass
        _HELD.add(identity)
        try:
            yield
        finally:
            _HELD.discard(identity)
    finally:
        os.close(descriptor)


def latest_checkpoint(out_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run (`passed_over` names the incomplete step folders newer than it);
    FileNotFoundError naming the directory when there is none."""
    found = list_checkpoints(out_dir)
    if found:
        return found[-1]
    root = checkpoint_dir(out_dir)
    incomplete = [_with_missing_files(p) for p in step_folders(out_dir)]
    if incomplete:
        raise FileNotFoundError(
            f"{out_dir}: no complete checkpoint: {', '.join(incomplete)} under {root} (a save cut short, a file "
            "deleted or a copy cut short; or a model copied there without train_state.pt: pass such a model folder "
            "itself)"
        )
    if (Path(out_dir) / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{out_dir}: the run has saved no checkpoint yet (it holds its {CONFIG_FILE} but no {root.name}/step_N): "
            "a run saves one every save_every steps, at its last step and on Ctrl-C or SIGTERM"
        )
    raise FileNotFoundError(
        f"{out_dir}: no checkpoint (neither a checkpoint folder with {TRAIN_STATE_FILE} nor a run with "
        f"{root.name}/step_N)"
    )


def run_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint when `path` names a run (`run_folder`: its out_dir, `checkpoints/` or
    train_config.json inside, no config.json; its checkpoints/ folder, as torchtitan's checkpoint folder stands for its
    newest step; its train_config.json or metrics.jsonl), else None; FileNotFoundError naming the run when it has
    none."""
    path = run_folder(path)
    is_run = checkpoint_dir(path).is_dir() or (path / CONFIG_FILE).is_file()
    if (path / MODEL_CONFIG_FILE).is_file() or not is_run:
        return None
    return latest_checkpoint(path)


def run_holding(checkpoint: str | Path) -> Path | None:
    """The run's out_dir when `checkpoint` is one of its checkpoints (out_dir/checkpoints/step_N), else None."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent
    return run if STEP_DIR.fullmatch(checkpoint.name) and checkpoint.parent == checkpoint_dir(run) else None


def another_run(checkpoint: str | Path, out_dir: str | Path) -> Path | None:
    """The out_dir of the run `checkpoint` is a checkpoint of (`run_holding`) when that run is not the one in
    `out_dir`; None for one of `out_dir`'s own checkpoints, or a folder no run holds."""
    run = run_holding(checkpoint)
    return run if run is not None and run.resolve() != Path(out_dir).resolve() else None


def checkpoint_or_latest(path: str | Path) -> Path:
    """`path` itself if it is a model directory (has config.json), else the newest checkpoint of run `path`."""
    path = Path(path)
    return path if (path / MODEL_CONFIG_FILE).is_file() else latest_checkpoint(path)
