"""Atomic writes: a write that fails midway leaves the previous file or folder as it was and nothing else behind."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from seekstack.atomic import (
    RETIRED,
    WriteRefused,
    atomic_directory,
    clear_killed_writes,
    entries_besides,
    file_in_the_way,
    refuse_to_replace,
    staged_files,
    write_atomic,
)
from seekstack.checkpoint import CheckpointError, save_pretrained
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import train_tokenizer
from seekstack.train import state
from seekstack.train.runs import list_checkpoints
from seekstack.train.state import load_checkpoint, save_checkpoint
from tests.conftest import micro_config

SHA_NEW = hashlib.sha256(b"new").hexdigest()


class DiskFull(OSError):
    pass


def contents(folder: Path) -> dict[str, str]:
    """Every file under `folder`, hidden ones included, by relative path -> sha256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ------------------------------------------------------------------ one file
@pytest.mark.parametrize("data, expected", [("héllo\n", "héllo\n".encode()), (b"\x00\xff", b"\x00\xff")])
def test_write_atomic_writes_text_as_utf8_and_bytes_as_they_are(tmp_path, data, expected):
    path = write_atomic(tmp_path / "new" / "file", data)
    assert path == tmp_path / "new" / "file" and path.read_bytes() == expected
    assert entries(tmp_path / "new") == ["file"]


def test_write_atomic_under_a_file_names_the_file_in_the_way(tmp_path):
    """`data build --write-config notes.txt/cleaning.yaml` said "[Errno 17] File exists: 'notes.txt'"."""
    (tmp_path / "notes.txt").write_text("notes")
    for path in (tmp_path / "notes.txt" / "cleaning.yaml", tmp_path / "notes.txt" / "configs" / "cleaning.yaml"):
        with pytest.raises(NotADirectoryError, match=re.escape(f"{tmp_path / 'notes.txt'}: is a file, not a folder")):
            write_atomic(path, "text")
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_write_atomic_hands_a_function_the_path_to_write(tmp_path):
    write_atomic(tmp_path / "t.pt", lambda temporary: torch.save({"step": 3}, temporary))
    assert torch.load(tmp_path / "t.pt") == {"step": 3}
    assert entries(tmp_path) == ["t.pt"]


def test_a_write_that_fails_midway_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    write_atomic(tmp_path / "index.json", "old")

    def write_half_then_fail(temporary: Path) -> None:
        temporary.write_text("half of the new")
        raise DiskFull("no space left")

    with pytest.raises(DiskFull):
        write_atomic(tmp_path / "index.json", write_half_then_fail)
    assert (tmp_path / "index.json").read_text() == "old"
    assert entries(tmp_path) == ["index.json"]


def test_written_files_and_folders_get_the_usual_permissions_not_private_temporary_ones(tmp_path):
    (tmp_path / "plain").write_text("x")
    (tmp_path / "plain_folder").mkdir()
    write_atomic(tmp_path / "atomic", "x")
    with atomic_directory(tmp_path / "atomic_folder"):
        pass
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert (tmp_path / "atomic_folder").stat().st_mode == (tmp_path / "plain_folder").stat().st_mode


@contextmanager
def file_size_limit(limit: int):
    """`ulimit -f`: a write past `limit` bytes fails with EFBIG, as a full disk fails with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_write_the_storage_refuses_names_its_target_and_keeps_the_old_file(tmp_path):
    write_atomic(tmp_path / "index.json", "old")
    with pytest.raises(WriteRefused) as refused, file_size_limit(50_000):
        write_atomic(tmp_path / "index.json", b"x" * 100_000)
    assert str(refused.value) == (
        f"{tmp_path / 'index.json'}: not written (File too large: past the file size limit (ulimit -f) or the "
        "largest file the file system holds); nothing was written, and what was there is as it was"
    )
    assert isinstance(refused.value, OSError) and refused.value.errno == errno.EFBIG
    assert (tmp_path / "index.json").read_text() == "old" and entries(tmp_path) == ["index.json"]


def test_a_safetensors_file_the_storage_refuses_is_a_write_refused_naming_it(tmp_path):
    weights = {"weight": torch.zeros(100_000)}
    with pytest.raises(WriteRefused) as refused, file_size_limit(50_000):  # safetensors: "(os error 27)"
        write_atomic(tmp_path / "adapter_model.safetensors", lambda temporary: save_file(weights, temporary))
    assert str(refused.value).startswith(f"{tmp_path / 'adapter_model.safetensors'}: not written (File too large: ")
    assert refused.value.errno == errno.EFBIG and entries(tmp_path) == []
    with pytest.raises(WriteRefused) as refused, file_size_limit(50_000):
        with atomic_directory(tmp_path / "step_8") as staging:
            save_file(weights, staging / "model.safetensors")
    assert str(refused.value).startswith(f"{tmp_path / 'step_8'}: not written (File too large: ")
    assert entries(tmp_path) == []


def test_a_safetensors_error_in_the_wording_before_0_6_is_a_write_refused_too(tmp_path):
    from safetensors import SafetensorError

    def full_disk(temporary):  # what safetensors 0.4-0.5 raise: the io::Error's Debug form
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "" })')

    with pytest.raises(WriteRefused) as refused:
        write_atomic(tmp_path / "adapter_model.safetensors", full_disk)
    assert refused.value.errno == errno.ENOSPC and entries(tmp_path) == []


def test_a_refused_write_of_many_files_names_their_folder_the_first_files_and_how_many_more(tmp_path):
    with pytest.raises(WriteRefused) as refused, file_size_limit(50_000), staged_files(tmp_path) as staged:
        for shard in range(5):
            staged.path(f"train_{shard:05d}.bin").write_bytes(b"z")
        staged.path("train_00005.bin").write_bytes(b"z" * 100_000)
    assert str(refused.value).startswith(
        f"{tmp_path} (train_00000.bin, train_00001.bin, train_00002.bin and 3 more): not written (File too large"
    )
    assert entries(tmp_path) == []


@pytest.mark.parametrize(
    "code, reason",
    [
        (errno.ENOSPC, "No space left on device: the disk is full"),
        (errno.EDQUOT, "Disk quota exceeded: past the disk quota"),
        (errno.EIO, "Input/output error: the storage failed to write; check the disk"),
        (errno.EROFS, "Read-only file system: the storage is mounted read-only"),
    ],
)
def test_a_refused_write_says_why_the_storage_refused_it(tmp_path, code, reason):
    with pytest.raises(WriteRefused) as refused, staged_files(tmp_path) as staged:
        staged.path("train.jsonl").write_text("a\n")
        staged.path("val.jsonl").write_text("b\n")
        raise OSError(code, os.strerror(code))
    assert str(refused.value) == (
        f"{tmp_path} (train.jsonl and val.jsonl): not written ({reason}); nothing was written, and what was there "
        "is as it was"
    )


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_folder_this_user_may_not_write_in_is_named_with_the_target_not_a_temporary(tmp_path, monkeypatch, kind):
    """The error named the hidden temporary (`Permission denied: 'out/.q.f6f91da2.tmp'`), a file the user never
    asked for; as root, chmod 555 does not refuse, so the refusal is the system's as a user meets it."""
    out = tmp_path / "out"
    refuse_temporaries(monkeypatch, out, errno.EACCES)
    with pytest.raises(WriteRefused) as error:
        write_here(out / "step_8", kind)
    assert str(error.value) == (
        f"{out / 'step_8'}: not written (Permission denied: this user may not create files in {out}); nothing was "
        "written"
    )
    assert error.value.errno == errno.EACCES and entries(out) == []


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_name_the_file_system_refuses_with_the_temporarys_additions_is_named_with_the_target_and_its_limit(
    tmp_path, monkeypatch, kind
):
    """A legal name of 250 bytes (`plot --out`, `quantize --out`) failed as "File name too long:
    '.aaa...aaa.2e76478f.tmp'", and `--out /proc/x` as "No such file or directory: '/proc/.x.2e76478f.tmp'": the
    hidden temporary, a file the user never asked for."""
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "a" * (longest - 5)
    with pytest.raises(WriteRefused) as too_long:
        write_here(tmp_path / name, kind)
    assert str(too_long.value) == (
        f"{tmp_path / name}: not written (File name too long: it is written first under a hidden name 14 bytes "
        f"longer, past the {longest} bytes a name takes there: give one of at most {longest - 14} bytes); nothing was "
        "written"
    )
    out = tmp_path / "out"
    refuse_temporaries(monkeypatch, out, errno.ENOENT)  # as /proc refuses a new file
    with pytest.raises(WriteRefused) as refused:
        write_here(out / "x.png", kind)
    assert str(refused.value) == (
        f"{out / 'x.png'}: not written (No such file or directory: the file system of {out} takes no new file there: "
        "choose another folder); nothing was written"
    )
    assert refused.value.errno == errno.ENOENT and entries(tmp_path) == ["out"] and entries(out) == []


def test_a_folder_on_a_read_only_file_system_is_named_with_the_target_not_a_temporary(tmp_path, monkeypatch):
    """`quantize --out` on a disk mounted read-only said "Read-only file system: 'out/.q.90394400.tmp'"."""
    out = tmp_path / "out"
    refuse_temporaries(monkeypatch, out, errno.EROFS)
    with pytest.raises(WriteRefused) as error:
        write_here(out / "step_8", "folder")
    assert str(error.value) == (
        f"{out / 'step_8'}: not written (Read-only file system: the storage is mounted read-only); nothing was "
        "written, and what was there is as it was"
    )
    assert error.value.errno == errno.EROFS and entries(out) == []


def refuse_temporaries(monkeypatch, folder: Path, code: int) -> None:
    """Make `folder`, then have the system refuse every file or folder created in it with `code`."""
    folder.mkdir()
    mkdir = Path.mkdir

    def refused(path, *args, **kwargs):
        if path.exists():  # the folder itself: mkdir(exist_ok=True)
            return mkdir(path, *args, **kwargs)
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(Path, "touch", refused)
    monkeypatch.setattr(Path, "mkdir", refused)


def test_a_read_only_folder_atomic_directory_may_not_replace_is_named_kept_and_leaves_nothing_beside(
    tmp_path, monkeypatch
):
    """Replacing a chmod 555 folder failed with "Permission denied: 'e' -> '.e.old.995b5bad.tmp/e'" and left that
    empty retired folder, which nothing ever clears; as root the move is permitted, so the refusal is the system's
    as a user meets it."""
    write_here(tmp_path / "step_8", "folder")
    before = contents(tmp_path)
    replace = os.replace

    def refused_to_move_aside(source, target):
        if Path(source) == tmp_path / "step_8":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source), None, str(target))
        replace(source, target)

    monkeypatch.setattr(os, "replace", refused_to_move_aside)
    with pytest.raises(WriteRefused) as error:
        write_here(tmp_path / "step_8", "folder")
    assert str(error.value) == (
        f"{tmp_path / 'step_8'}: not written (Permission denied: this user may not move it aside for the new one: a "
        "read-only folder? make it writable); nothing was written"
    )
    assert contents(tmp_path) == before and entries(tmp_path) == ["step_8"]


def test_a_torch_save_cut_short_in_a_folder_names_the_folder_not_torchs_zip_writer(tmp_path):
    with pytest.raises(WriteRefused) as refused, file_size_limit(50_000):
        with atomic_directory(tmp_path / "step_8") as staging:
            torch.save({"weights": torch.zeros(100_000)}, staging / "train_state.pt")
    assert str(refused.value).startswith(f"{tmp_path / 'step_8'}: not written (torch.save was cut short: a full disk")
    assert entries(tmp_path) == []


def test_the_temporaries_of_the_files_a_command_makes_are_not_listed_as_other_files(tmp_path):
    for name in ("tokenizer.json", ".tokenizer.json.fe642753.tmp", "notes.txt", ".notes.txt.fe642753.tmp"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".tokenizer_config.json.01234567.tmp").mkdir()
    listed = entries_besides(tmp_path, ("tokenizer.json", "tokenizer_config.json"))
    assert listed == ".notes.txt.fe642753.tmp and notes.txt"


# ------------------------------------------------------------------ what a writer killed outright leaves
WRITER = """
import sys, time
from seekstack.atomic import atomic_directory, write_atomic
if sys.argv[2] == "file":
    write_atomic(sys.argv[1], lambda temporary: (temporary.write_text("half"), time.sleep(60)))
with atomic_directory(sys.argv[1]) as staging:
    (staging / "model.safetensors").write_text("half")
    time.sleep(60)
"""


def hidden_of(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def start_writer(path: Path, kind: str) -> subprocess.Popen:
    """Another process writing `path` (a file or a folder), stopped midway until it is killed."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), kind])
    deadline = time.monotonic() + 20
    while not (hidden_of(path) and locked(hidden_of(path)[0]) and writer.poll() is None):
        assert time.monotonic() < deadline and writer.poll() is None, "the writer never began"
        time.sleep(0.02)
    return writer


def locked(temporary: Path) -> bool:
    """Whether a process holds the flock on `temporary` (a folder's size says nothing of whether its writer has
    taken it: a cleaner may still delete it between its creation and the lock, and the writer makes another)."""
    try:
        descriptor = os.open(temporary, os.O_RDONLY if temporary.is_dir() else os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return False
    finally:
        os.close(descriptor)


def write_here(path: Path, kind: str) -> None:
    if kind == "file":
        write_atomic(path, "new")
    else:
        with atomic_directory(path) as staging:
            (staging / "model.safetensors").write_text("new")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_process_first_write_into_a_folder_clears_what_writes_killed_outright_left_there(tmp_path, kind):
    killed = start_writer(tmp_path / "step_8", kind)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(hidden_of(tmp_path / "step_8")) == 1
    write_here(tmp_path / "step_80", kind)  # another target's: the temporaries of every target are cleared
    assert entries(tmp_path) == ["step_80"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_sigterm_during_a_write_deletes_its_temporary_then_ends_the_process(tmp_path, kind):
    """SIGTERM (`kill`, `timeout`, a scheduler) ended `seekstack quantize` on the spot and left its staging folder
    beside --out until the next run."""
    write_here(tmp_path / "step_8", kind)
    before = contents(tmp_path)
    writer = start_writer(tmp_path / "step_8", kind)
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=30) == -signal.SIGTERM  # it still ends as SIGTERM ends a process
    assert contents(tmp_path) == before and entries(tmp_path) == ["step_8"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_ctrl_c_while_a_write_makes_its_temporary_leaves_nothing_behind(tmp_path, monkeypatch, kind):
    """Ctrl-C landing between a temporary's creation and its lock (`seekstack lora merge` interrupted as it began
    to write) left the temporary beside the target until the next run."""
    flock = fcntl.flock

    def ctrl_c_then_flock(descriptor, operation):
        signal.raise_signal(signal.SIGINT)
        return flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", ctrl_c_then_flock)
    with pytest.raises(KeyboardInterrupt):
        write_here(tmp_path / "step_8", kind)
    assert entries(tmp_path) == []


def test_a_sigterm_handler_of_the_process_keeps_sigterm_during_a_write(tmp_path):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with atomic_directory(tmp_path / "step_8") as staging:
            signal.raise_signal(signal.SIGTERM)
            (staging / "model.safetensors").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM] and contents(tmp_path / "step_8") == {"model.safetensors": SHA_NEW}


def test_a_retired_folder_is_never_cleared_it_may_hold_the_only_copy_of_a_checkpoint(tmp_path):
    retired = tmp_path / ".step_8.old.0123abcd.tmp" / "step_8"  # a crash between atomic_directory's two renames
    retired.mkdir(parents=True)
    (retired / "model.safetensors").write_text("the only copy")
    (tmp_path / ".step_9.0123abcd.tmp").mkdir()  # a killed save
    write_here(tmp_path / "step_10", "folder")
    assert entries(tmp_path) == [".step_8.old.0123abcd.tmp", "step_10"]


def test_a_retired_folder_whose_deletion_was_killed_is_cleared_it_is_no_only_copy(tmp_path, monkeypatch):
    """Saved over, a folder's old copy is deleted once the new one is in place; a kill during that deletion left
    `.step_1.old.*.tmp` holding part of the old copy, never cleared (a retired folder may be the only copy). It now
    leaves a killed write's temporary, which the next cleanup deletes."""

    def save(contents: str) -> None:
        with atomic_directory(tmp_path / "step_1") as staging:
            (staging / "model.safetensors").write_text(contents)
            (staging / "train_state.pt").write_text(contents)

    save("old")
    rmtree = shutil.rmtree

    def killed_deleting_the_old_copy(path, *args, **kwargs):
        old_files = list(Path(path).rglob("model.safetensors"))
        if not any(file.read_text() == "old" for file in old_files):
            return rmtree(path, *args, **kwargs)
        old_files[0].unlink()
        raise KeyboardInterrupt  # the process is killed partway through the deletion

    monkeypatch.setattr(shutil, "rmtree", killed_deleting_the_old_copy)
    with pytest.raises(KeyboardInterrupt):
        save("new")
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert (tmp_path / "step_1" / "model.safetensors").read_text() == "new"
    clear_killed_writes(tmp_path, rf".+(?<!{re.escape(RETIRED)})")  # the next process's first write into the folder
    assert entries(tmp_path) == ["step_1"]


def test_writes_into_a_folder_read_it_once_not_once_per_file(tmp_path, monkeypatch):
    reads = []
    iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda folder: reads.append(folder) or iterdir(folder))
    for batch in range(20):  # distill's teacher cache: a file per batch
        write_atomic(tmp_path / f"batch_{batch}.pt", b"x")
    with staged_files(tmp_path / "shards") as staged:  # token shards
        for shard in range(20):
            staged.path(f"train_{shard:05d}.bin").write_bytes(b"z")
    assert reads == [tmp_path]  # the new folder "shards" is staged beside it, and nothing is left to clear in it


def test_killed_writes_are_cleared_where_an_exclusive_flock_needs_a_writable_descriptor_as_on_nfs(
    tmp_path, monkeypatch
):
    flock = fcntl.flock

    def flock_as_on_nfs(descriptor, operation):  # Linux's NFS client: an fcntl lock on the server
        if operation & fcntl.LOCK_EX and fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", flock_as_on_nfs)
    (tmp_path / ".index.json.0123abcd.tmp").write_text("half")  # what a killed write left
    with staged_files(tmp_path) as staged:
        under_way = staged.path("train.jsonl")
        under_way.write_text("a\n")
        clear_killed_writes(tmp_path, "train.jsonl")  # another process's cleanup
        assert under_way.exists()  # its writer holds the lock
    assert entries(tmp_path) == ["train.jsonl"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_write_leaves_the_temporary_of_another_process_writing_the_same_target(tmp_path, kind):
    writer = start_writer(tmp_path / "step_8", kind)
    try:
        under_way = hidden_of(tmp_path / "step_8")
        write_here(tmp_path / "step_8", kind)
        assert hidden_of(tmp_path / "step_8") == under_way and writer.poll() is None
    finally:
        writer.kill()
        writer.wait()


# ------------------------------------------------------------------ files that appear together
def test_staged_files_appear_together_only_when_all_are_written(tmp_path):
    with staged_files(tmp_path) as staged:
        staged.path("train.jsonl").write_text("a\n")
        staged.path("val.jsonl").write_text("b\n")
        assert not (tmp_path / "train.jsonl").exists()  # hidden while the block runs
    assert entries(tmp_path) == ["train.jsonl", "val.jsonl"]
    assert (tmp_path / "val.jsonl").read_text() == "b\n"


def test_staged_files_that_fail_midway_publish_none_and_leave_no_temporary(tmp_path):
    (tmp_path / "train.jsonl").write_text("old train")
    with pytest.raises(DiskFull), staged_files(tmp_path) as staged:
        staged.path("train.jsonl").write_text("new train")
        staged.path("val.jsonl").write_text("new val, half")
        raise DiskFull("no space left")
    assert entries(tmp_path) == ["train.jsonl"]
    assert (tmp_path / "train.jsonl").read_text() == "old train"


def test_staged_files_that_fail_leave_no_folder_they_created(tmp_path):
    """A refused corpus build (it raises inside the block) said 'nothing was written' and left an empty out/corpus."""
    with pytest.raises(DiskFull), staged_files(tmp_path / "out" / "corpus") as staged:
        staged.path("train.jsonl").write_text("new train")
        raise DiskFull("no space left")
    assert entries(tmp_path) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(DiskFull), staged_files(tmp_path / "kept" / "corpus"):
        (tmp_path / "kept" / "corpus").mkdir()
        (tmp_path / "kept" / "corpus" / "a users file").write_text("theirs")
        raise DiskFull("no space left")
    assert entries(tmp_path / "kept" / "corpus") == ["a users file"]


KILLED_STAGING = """
import os, signal, sys
from seekstack.atomic import staged_files
with staged_files(sys.argv[1]) as staged:
    staged.path("train.jsonl").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_staged_files_killed_outright_leave_no_folder_and_the_next_write_clears_their_hidden_one(tmp_path):
    """kill -9 during `data select`, `data tokenize` or `tokenizer train` left an empty output folder: a new folder
    is staged hidden beside it and takes its name once its files are written; the folders above it stay."""
    corpus = tmp_path / "out" / "corpus"
    killed = subprocess.run([sys.executable, "-c", KILLED_STAGING, str(corpus)], capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert not corpus.exists() and len(hidden_of(corpus)) == 1
    with staged_files(corpus) as staged:
        staged.path("train.jsonl").write_text("whole")
    assert entries(tmp_path / "out") == ["corpus"] and entries(corpus) == ["train.jsonl"]


def test_staged_files_into_a_folder_another_writer_made_meanwhile_keep_its_files(tmp_path):
    with staged_files(tmp_path / "corpus") as staged:
        staged.path("train.jsonl").write_text("new")
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "notes.txt").write_text("theirs")
    assert entries(tmp_path) == ["corpus"] and entries(tmp_path / "corpus") == ["notes.txt", "train.jsonl"]


@pytest.fixture
def ctrl_c_after_the_first_rename(monkeypatch):
    """Ctrl-C landing right after a write's first rename into place."""
    replace = os.replace
    renames = []

    def replace_then_ctrl_c(source, target):
        replace(source, target)
        renames.append(target)
        if len(renames) == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)


def test_ctrl_c_while_staged_files_are_renamed_into_place_publishes_them_all_first(
    tmp_path, ctrl_c_after_the_first_rename
):
    """It published the new train.jsonl beside the old val.jsonl."""
    for name in ("train.jsonl", "val.jsonl"):
        (tmp_path / name).write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_files(tmp_path) as staged:
        for name in ("train.jsonl", "val.jsonl"):
            staged.path(name).write_text("new")
    assert entries(tmp_path) == ["train.jsonl", "val.jsonl"]
    assert {(tmp_path / name).read_text() for name in ("train.jsonl", "val.jsonl")} == {"new"}


# ------------------------------------------------------------------ folders
def test_atomic_directory_replaces_the_whole_folder(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "stale.safetensors").write_text("old")
    with atomic_directory(tmp_path / "ckpt") as staging:
        (staging / "model.safetensors").write_text("new")
        assert (tmp_path / "ckpt" / "stale.safetensors").exists()  # the old folder stays until the new is whole
    assert entries(tmp_path) == ["ckpt"]
    assert contents(tmp_path / "ckpt") == {"model.safetensors": hashlib.sha256(b"new").hexdigest()}


def test_atomic_directory_that_fails_midway_keeps_the_old_folder_and_leaves_no_temporary(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_text("old")
    before = contents(tmp_path / "ckpt")
    with pytest.raises(DiskFull), atomic_directory(tmp_path / "ckpt") as staging:
        (staging / "model.safetensors").write_text("new, half")
        raise DiskFull("no space left")
    assert entries(tmp_path) == ["ckpt"]
    assert contents(tmp_path / "ckpt") == before


def test_ctrl_c_between_atomic_directorys_renames_still_puts_the_new_folder_in_place(
    tmp_path, ctrl_c_after_the_first_rename
):
    """The old folder was moved aside, then Ctrl-C deleted the new one: no folder was left at the path."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "ckpt") as staging:
        (staging / "model.safetensors").write_text("new")
    assert entries(tmp_path) == ["ckpt"]
    assert contents(tmp_path / "ckpt") == {"model.safetensors": SHA_NEW}


def test_atomic_directory_that_fails_on_its_first_write_creates_nothing(tmp_path):
    with pytest.raises(DiskFull), atomic_directory(tmp_path / "ckpt"):
        raise DiskFull("no space left")
    assert entries(tmp_path) == []


# ------------------------------------------------------------------ training checkpoints
def test_interrupted_training_checkpoint_keeps_the_previous_one_of_that_step(tmp_path, monkeypatch):
    model, saved = Transformer(micro_config()), {"step": 2, "data": {}, "rng": {}, "config": {}}
    save_checkpoint(tmp_path, model, saved, keep=3)
    before = contents(tmp_path)

    def save_half_then_fail(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 half a zip")
        raise DiskFull("no space left")

    monkeypatch.setattr(state.torch, "save", save_half_then_fail)
    with pytest.raises(DiskFull):
        save_checkpoint(tmp_path, model, {"step": 2}, keep=3)
    monkeypatch.undo()

    assert contents(tmp_path) == before  # step_2 untouched, no temporary folder beside it
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_2"]
    assert load_checkpoint(list_checkpoints(tmp_path)[0])[1] == saved


def test_a_training_checkpoint_clears_what_a_killed_save_of_another_step_left(tmp_path):
    killed = tmp_path / "checkpoints" / ".step_6.7a7d1e6a.tmp"  # a run killed while saving step 6, resumed from 4
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_text("half")
    save_checkpoint(tmp_path, Transformer(micro_config()), {"step": 8}, keep=3)
    assert entries(tmp_path / "checkpoints") == ["step_8"]


def test_training_checkpoints_hold_the_model_the_state_and_the_extra_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    extra_files = [tmp_path / "tokenizer.json"]
    path = save_checkpoint(tmp_path / "run", Transformer(micro_config()), {"step": 5}, keep=1, extra_files=extra_files)
    assert path == tmp_path / "run" / "checkpoints" / "step_5"
    assert entries(path) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "train_state.pt"
    ]  # fmt: skip
    assert entries(path.parent) == ["step_5"]


def test_a_checkpoints_tokenizer_config_gives_the_models_context_as_model_max_length(tmp_path):
    transformers = pytest.importorskip("transformers")
    train_tokenizer(["def f(x):\n    return x\n"], vocab_size=300, out_path=tmp_path / "tok")  # its config says 4096
    extra_files = [tmp_path / "tok" / "tokenizer.json", tmp_path / "tok" / "tokenizer_config.json"]
    model = Transformer(micro_config())
    path = save_checkpoint(tmp_path / "run", model, {"step": 1}, keep=1, extra_files=extra_files)
    loaded = transformers.AutoTokenizer.from_pretrained(str(path))
    assert loaded.model_max_length == model.config.max_position_embeddings == 256
    assert len(loaded("x " * 400, truncation=True)["input_ids"]) == 256
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok")).model_max_length == 4096  # left as it was


def test_damaged_train_state_is_named_with_what_to_do(tmp_path):
    path = save_checkpoint(tmp_path, Transformer(micro_config()), {"step": 1}, keep=1)
    (path / "train_state.pt").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path / 'train_state.pt'}: not a readable training state")
    assert f"move {path} out of {path.parent}, and --resume continues from the checkpoint before it" in message


def test_the_file_in_a_folders_way_is_the_folder_itself_or_the_nearest_above_it(tmp_path):
    """refuse_a_file_in_the_way, refuse_to_replace and explain's --out check each searched (folder, *its parents)
    for a file with a copy of the same search; file_in_the_way is that search, and each refusal words its finding."""
    (tmp_path / "notes.txt").write_text("kept")
    (tmp_path / "folder").mkdir()
    assert file_in_the_way(tmp_path / "notes.txt") == tmp_path / "notes.txt"
    assert file_in_the_way(tmp_path / "notes.txt" / "a" / "b") == tmp_path / "notes.txt"
    assert file_in_the_way(tmp_path / "folder" / "new") is None
    assert file_in_the_way(tmp_path / "folder") is None
    with pytest.raises(FileExistsError) as itself:
        refuse_to_replace(tmp_path / "notes.txt", ["*.json"])
    assert str(itself.value) == f"{tmp_path / 'notes.txt'}: is a file, not a folder; nothing was written"
    with pytest.raises(FileExistsError) as above:
        refuse_to_replace(tmp_path / "notes.txt" / "model", ["*.json"])
    assert str(above.value) == (
        f"{tmp_path / 'notes.txt' / 'model'}: {tmp_path / 'notes.txt'} is a file, not a folder; nothing was written"
    )
    assert (tmp_path / "notes.txt").read_text() == "kept"


def test_a_folder_under_a_file_is_refused_naming_the_file_before_anything_is_written(tmp_path):
    """save_pretrained(model, "notes.txt/model") raised a bare "[Errno 17] File exists: 'notes.txt'"."""
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError) as refused:
        save_pretrained(Transformer(micro_config()), tmp_path / "notes.txt" / "model")
    assert str(refused.value) == (
        f"{tmp_path / 'notes.txt' / 'model'}: {tmp_path / 'notes.txt'} is a file, not a folder; nothing was written"
    )
    assert (tmp_path / "notes.txt").read_text() == "kept"
