"""Atomic writes: every file and checkpoint folder the project writes appears whole or not at all.

A reader (or a crash) sees the old contents or the new ones, never a part: the new contents go to a hidden
temporary name in the same folder, are flushed to disk, and are renamed over the target in one step.
  write_atomic(path, data)      one file
  staged_files(folder)          several files that appear together once all are complete (a corpus, token shards)
  atomic_directory(path)        a folder (a checkpoint), swapped in whole; the old one is deleted only afterwards
  refuse_to_replace(path, ...)  before one: a folder holding other files (a user's, a training state) is kept
  entries_besides(path, makes)  what a folder holds besides the files a command writes, listed for a message
If a write raises, its temporary files are deleted and the target is left as it was; a write the storage refuses
(a full disk, a file size limit) raises `WriteRefused`, which names the target. A writer holds an exclusive lock
(flock) on its temporary while it writes; the kernel drops it when the writer dies, even killed outright (SIGKILL),
so each write first deletes the temporaries of its target that no one holds (`clear_killed_writes`).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HIDDEN_TOKEN_BYTES = 4  # random bytes in a hidden temporary's name, as hex
STORAGE_REFUSALS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS}
TORCH_SHORT_WRITE = ("PytorchStreamWriter failed", "unexpected pos")  # torch.save's zip writer, cut short


class WriteRefused(OSError):
    """The storage refused a write (a full disk, a file size limit); the message names the target, left as it was."""


class StagedFiles:
    """Files being written under hidden names in one folder, renamed to their real names by `staged_files`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.hidden: dict[str, Path] = {}  # real name -> hidden temporary file, in the order staged
        self.locks: list[int] = []  # descriptors holding the hidden files locked while they are written

    def path(self, name: str) -> Path:
        """A new, empty hidden file in the folder, which becomes `folder / name` when the files are published."""
        if name in self.hidden:
            raise ValueError(f"{self.folder / name} is already staged")
        clear_killed_writes(self.folder, re.escape(name))
        self.hidden[name], lock = _create_locked(self.folder, name, lambda hidden: hidden.touch(exist_ok=False))
        self.locks.append(lock)
        return self.hidden[name]


@contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[StagedFiles]:
    """Write each file at `staged.path(name)`; when the block ends without error, every file is flushed to disk
    and renamed to `folder / name` in the order staged. On an error the staged files are deleted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = StagedFiles(folder)
    try:
        with _refusals_named(lambda: [folder / name for name in staged.hidden] or [folder]):
            yield staged
            for hidden in staged.hidden.values():
                _fsync(hidden)
        for name, hidden in staged.hidden.items():
            os.replace(hidden, folder / name)
        _fsync(folder)
    finally:
        for hidden in staged.hidden.values():
            hidden.unlink(missing_ok=True)
        for lock in staged.locks:
            os.close(lock)


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write `data` (text as UTF-8, bytes, or a function that writes the file at the path it is given) to `path`."""
    path = Path(path)
    with staged_files(path.parent) as staged:
        temporary = staged.path(path.name)
        if callable(data):
            data(temporary)
        else:
            temporary.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside `path` to fill; when the block ends without error it takes the place of
    `path`, and only then is the old `path` deleted. On an error it is deleted and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_killed_writes(path.parent, re.escape(path.name))
    staging, lock = _create_locked(path.parent, path.name, Path.mkdir)
    try:
        with _refusals_named(lambda: [path]):
            yield staging
            for entry in [*staging.rglob("*"), staging]:
                _fsync(entry)
        if path.exists():
            retired = _create_hidden(path.parent, f"{path.name}.old", Path.mkdir)
            os.replace(path, retired / path.name)  # a crash before the next rename leaves the old folder in `retired`
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(lock)


def refuse_to_replace(
    path: str | os.PathLike, makes: Sequence[str], inputs: tuple[str | os.PathLike, ...] = ()
) -> None:
    """FileExistsError unless `atomic_directory` may replace folder `path` whole: absent, or holding only files
    whose names match `makes` (the glob patterns of the files such a write makes, e.g. an older checkpoint), and
    none of `inputs` (the folders the new one is made from). Anything else in it (a training state, a model card, a
    subfolder, a user's files) would be deleted with the old folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: is a file, not a folder; nothing was written")
    for source in inputs:
        if path.resolve() == Path(source).resolve():
            raise FileExistsError(f"{path}: is the input folder {source}; write to another one (nothing was written)")
    listed = entries_besides(path, makes)
    if listed:
        raise FileExistsError(
            f"{path}: holds {listed} besides the files this command writes ({', '.join(makes)}), and writing there "
            "replaces the whole folder; choose a new or empty folder (nothing was written)"
        )


def entries_besides(path: str | os.PathLike, makes: Sequence[str]) -> str:
    """The entries of folder `path` that match none of the glob patterns `makes` (subfolders always) and are no
    hidden temporary of such a file (which its next write clears), listed for a message ("a, b/ and c"; past four,
    the first three and how many more); "" when there are none or no folder."""
    path = Path(path)
    if not path.is_dir():
        return ""
    others = sorted(entry.name + "/" * entry.is_dir() for entry in path.iterdir() if not _made_by(entry, makes))
    shown = [*others[:3], f"{len(others) - 3} more"] if len(others) > 4 else others
    return " and ".join([", ".join(shown[:-1]), shown[-1]] if len(shown) > 1 else shown)


def _made_by(entry: Path, makes: Sequence[str]) -> bool:
    """Whether `entry` is a file whose name matches a glob pattern of `makes`, or a hidden temporary of one."""
    temporary = re.fullmatch(hidden_pattern("(?P<name>.+)"), entry.name)
    if temporary is None and entry.is_dir():
        return False
    name = entry.name if temporary is None else temporary["name"]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in makes)


def hidden_pattern(name_pattern: str) -> str:
    """A regular expression matching the hidden temporaries of the names `name_pattern` matches: what a write
    killed outright (SIGKILL, power loss) leaves behind, for `clear_killed_writes` to delete."""
    return rf"\.(?:{name_pattern})\.[0-9a-f]{{{2 * HIDDEN_TOKEN_BYTES}}}\.tmp"


def clear_killed_writes(folder: Path, name_pattern: str) -> None:
    """Delete the hidden temporaries in `folder` of the names the regular expression `name_pattern` matches whose
    writer is gone (killed outright: none holds its lock); those of writes under way are left to them."""
    temporary = re.compile(hidden_pattern(name_pattern))
    if folder.is_dir():
        for entry in folder.iterdir():
            if temporary.fullmatch(entry.name):
                _delete_unless_locked(entry)


def _delete_unless_locked(hidden: Path) -> None:
    try:
        descriptor = os.open(hidden, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # gone meanwhile (its write finished), or not a temporary of ours
        return
    try:
        if _lock(descriptor, blocking=False) and _same_file(hidden, descriptor):
            if hidden.is_dir():
                shutil.rmtree(hidden, ignore_errors=True)
            else:
                hidden.unlink(missing_ok=True)
    finally:
        os.close(descriptor)


def _create_locked(folder: Path, name: str, create: Callable[[Path], None]) -> tuple[Path, int]:
    """`_create_hidden`, and a descriptor holding the new temporary locked until it is closed."""
    while True:
        hidden = _create_hidden(folder, name, create)
        try:
            descriptor = os.open(hidden, os.O_RDONLY)
        except FileNotFoundError:  # a cleaner deleted it before it was locked: make another
            continue
        _lock(descriptor, blocking=True)
        if _same_file(hidden, descriptor):
            return hidden, descriptor
        os.close(descriptor)  # deleted by a cleaner between its creation and the lock


def _create_hidden(folder: Path, name: str, create: Callable[[Path], None]) -> Path:
    """A new `.{name}.{random}.tmp` in `folder`, made by `create`, which raises FileExistsError if it exists.
    Not `tempfile`: its files and folders are private (0600, 0700); these get the umask's permissions."""
    while True:
        hidden = folder / f".{name}.{secrets.token_hex(HIDDEN_TOKEN_BYTES)}.tmp"
        try:
            create(hidden)
            return hidden
        except FileExistsError:
            continue


def _lock(descriptor: int, blocking: bool) -> bool:
    """Take an exclusive flock on `descriptor`; False when another holds it (or the file system has no flock, where
    no temporary is ever cleared)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _same_file(path: Path, descriptor: int) -> bool:
    """Whether `path` still names the file open at `descriptor`."""
    try:
        named, opened = os.stat(path, follow_symlinks=False), os.fstat(descriptor)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


@contextmanager
def _refusals_named(targets: Callable[[], list[Path]]) -> Iterator[None]:
    """Turn a write the storage refuses (an OSError of a full disk or file size limit, torch.save's short write),
    here or in a write nested in this one, into a `WriteRefused` naming `targets()`, which are left as they were."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        cause = error.__cause__ if isinstance(error, WriteRefused) else error
        if not _refused_by_storage(cause):
            raise
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else "torch.save was cut short"
        refused = WriteRefused(
            f"{' and '.join(map(str, targets()))}: not written ({reason}: a full disk or a file size limit); nothing "
            "was written, and what was there is as it was"
        )
        refused.errno = getattr(cause, "errno", None)
        raise refused from cause


def _refused_by_storage(error: BaseException | None) -> bool:
    if isinstance(error, OSError):
        return error.errno in STORAGE_REFUSALS
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in TORCH_SHORT_WRITE)


def _fsync(path: Path) -> None:
    """Flush a file's contents, or a folder's entries (POSIX only), to disk."""
    if path.is_dir() and os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
