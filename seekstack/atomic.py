"""Atomic writes: every file and checkpoint folder the project writes appears whole or not at all.

A reader (or a crash) sees the old contents or the new ones, never a part: the new contents go to a hidden
temporary name in the same folder, are flushed to disk, and are renamed over the target in one step.
  write_atomic(path, data)      one file
  staged_files(folder)          several files that appear together once all are complete (a corpus, token shards)
  atomic_directory(path)        a folder (a checkpoint), swapped in whole; the old one is deleted only afterwards
  refuse_to_replace(path, ...)  before one: a folder holding other files (a user's, a training state) is kept
  entries_besides(path, makes)  what a folder holds besides the files a command writes, listed for a message
If a write raises, its temporary files are deleted and the target is left as it was.
"""

from __future__ import annotations

import fnmatch
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HIDDEN_TOKEN_BYTES = 4  # random bytes in a hidden temporary's name, as hex


class StagedFiles:
    """Files being written under hidden names in one folder, renamed to their real names by `staged_files`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.hidden: dict[str, Path] = {}  # real name -> hidden temporary file, in the order staged

    def path(self, name: str) -> Path:
        """A new, empty hidden file in the folder, which becomes `folder / name` when the files are published."""
        if name in self.hidden:
            raise ValueError(f"{self.folder / name} is already staged")
        self.hidden[name] = _create_hidden(self.folder, name, lambda hidden: hidden.touch(exist_ok=False))
        return self.hidden[name]


@contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[StagedFiles]:
    """Write each file at `staged.path(name)`; when the block ends without error, every file is flushed to disk
    and renamed to `folder / name` in the order staged. On an error the staged files are deleted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = StagedFiles(folder)
    try:
        yield staged
        for hidden in staged.hidden.values():
            _fsync(hidden)
        for name, hidden in staged.hidden.items():
            os.replace(hidden, folder / name)
        _fsync(folder)
    finally:
        for hidden in staged.hidden.values():
            hidden.unlink(missing_ok=True)


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
    staging = _create_hidden(path.parent, path.name, Path.mkdir)
    try:
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
    """The entries of folder `path` that match none of the glob patterns `makes` (subfolders always), listed for a
    message ("a, b/ and c"; past four, the first three and how many more); "" when there are none or no folder."""
    path = Path(path)
    if not path.is_dir():
        return ""
    others = sorted(
        entry.name + "/" * entry.is_dir()
        for entry in path.iterdir()
        if entry.is_dir() or not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in makes)
    )
    shown = [*others[:3], f"{len(others) - 3} more"] if len(others) > 4 else others
    return " and ".join([", ".join(shown[:-1]), shown[-1]] if len(shown) > 1 else shown)


def hidden_pattern(name_pattern: str) -> str:
    """A regular expression matching the hidden temporaries of the names `name_pattern` matches: what a write
    killed outright (SIGKILL, power loss) leaves behind, for its writer to clear on its next write."""
    return rf"\.(?:{name_pattern})\.[0-9a-f]{{{2 * HIDDEN_TOKEN_BYTES}}}\.tmp"


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


def _fsync(path: Path) -> None:
    """Flush a file's contents, or a folder's entries (POSIX only), to disk."""
    if path.is_dir() and os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
