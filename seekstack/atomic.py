"""Atomic writes: every file and checkpoint folder the project writes appears whole or not at all.

A reader (or a crash) sees the old contents or the new ones, never a part: the new contents go to a hidden
temporary name in the same folder, are flushed to disk, and are renamed over the target in one step.
  write_atomic(path, data)      one file
  staged_files(folder)          several files that appear together once all are complete (a corpus, token shards),
                                with their folder when it is new
  atomic_directory(path)        a folder (a checkpoint), swapped in whole; the old one is deleted only afterwards
  delete_directory(path)        a folder (an old checkpoint) gone whole at once: moved to a hidden name, then deleted
  refuse_to_replace(path, ...)  before one: a folder holding other files (a user's, a training state) is kept
  refuse_a_file_in_the_way(folder, writes)  before staged files: a file where their folder would be, named first
                                             (`file_in_the_way(folder)` finds it)
  entries_besides(path, makes)  what a folder holds besides the files a command writes, listed for a message
If a write raises, its temporary files are deleted and the target is left as it was; a write the storage refuses
(a full disk, a file size limit, a read-only or failing disk) raises `WriteRefused`, which names the target. SIGTERM
during a write deletes its temporaries too before it ends the process (`sigterm_cleaned_up`), and Ctrl-C while the
new files are renamed into place waits for the last rename, so the target holds the old contents or the new ones.

A writer holds an exclusive lock (flock) on its temporary while it writes; the kernel drops it when the writer dies,
even killed outright (SIGKILL), so the first write of a process into a folder (for a new folder, into the one above
it, where its hidden folder is staged) deletes the temporaries there that no one holds (`clear_killed_writes`),
whatever their target; later writes there do not look again (a folder of 50,000 files is read once, not once per
write). Retired folders (`.NAME.old.*.tmp`, the only copy of a folder replaced by
`atomic_directory` when a crash came between its two renames) are never deleted; once the new folder is in place, the
retired one is deleted as `delete_directory` deletes a folder. Where the cleanup works: local file
systems; NFS, where Linux emulates flock with fcntl locks held on the server (so file temporaries are opened
read-write: an exclusive fcntl lock needs a writable descriptor; a folder cannot be opened so, and there a killed
save's folder is left to delete by hand). Where flock fails (no lock service), nothing is cleared. Where it is local
to each machine (NFS mounted `local_lock=flock` or `nolock`, Lustre's `localflock`), a writer on another machine is
not seen and its temporary could be deleted under it: let one machine at a time write into a folder there.
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
from contextlib import ExitStack, contextmanager
from pathlib import Path

from seekstack.interrupts import interrupts_deferred, sigterm_cleaned_up

HIDDEN_TOKEN_BYTES = 4  # random bytes in a hidden temporary's name, as hex
RETIRED = ".old"  # `.NAME.old.*.tmp`: an old folder between atomic_directory's renames, never cleared
STORAGE_REFUSALS = {  # what each refusal means, after the system's own words
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "past the disk quota",
    errno.EFBIG: "past the file size limit (ulimit -f) or the largest file the file system holds",
    errno.EIO: "the storage failed to write; check the disk",
    errno.EROFS: "the storage is mounted read-only",
}
TORCH_SHORT_WRITE = ("PytorchStreamWriter failed", "unexpected pos")  # torch.save's zip writer, cut short
TORCH_SHORT_WRITE_MEANS = "torch.save was cut short: a full disk or a file size limit"  # its message has no errno
# a Rust writer's io::Error (safetensors' SafetensorError): "... (os error 27)", or before safetensors 0.6 its Debug
# form "IoError(Os { code: 27, kind: FileTooLarge, ... })"
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")
NAMED_FILES = 3  # a refused write of more files than this names the first ones and how many more


class WriteRefused(OSError):
    """The storage refused a write (a full disk, a file size limit, a read-only or failing disk); the message names
    the target, left as it was, and why; `errno` is the refusal's (None for torch.save's short write)."""


class StagedFiles:
    """Files being written under hidden names in folder `staging`, renamed to their real names in `folder` by
    `staged_files`; `staging` is `folder` itself when it exists, else a hidden folder beside it."""

    def __init__(self, folder: Path, staging: Path):
        self.folder = folder
        self.staging = staging
        self.hidden: dict[str, Path] = {}  # real name -> hidden temporary file, in the order staged
        self.locks: list[int] = []  # descriptors holding the hidden files locked while they are written

    def path(self, name: str) -> Path:
        """A new, empty hidden file, which becomes `folder / name` when the files are published."""
        if name in self.hidden:
            raise ValueError(f"{self.folder / name} is already staged")
        with interrupts_deferred():  # an interrupt before the file is recorded here would leave it behind
            self.hidden[name], lock = _create_locked(self.staging, name, lambda hidden: hidden.touch(exist_ok=False))
            self.locks.append(lock)
        return self.hidden[name]

    def rename(self, name: str, new_name: str) -> None:
        """Have the file staged as `name` become `folder / new_name` instead: a name known only once the file is
        written (a digest of its contents)."""
        self.hidden[new_name] = self.hidden.pop(name)


@contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[StagedFiles]:
    """Write each file at `staged.path(name)`; when the block ends without error, every file is flushed to disk
    and renamed to `folder / name` in the order staged. A missing `folder` is made whole at that moment: the files
    are staged in a hidden folder beside it (`.NAME.*.tmp`, held locked), which takes its name once they are in it,
    so a write killed outright (SIGKILL, the out-of-memory killer) leaves no empty `folder`, only that hidden folder
    for the next write there to clear; the missing folders above `folder` are made at the start and stay after such
    a kill. On an error the staged files are deleted, and so are the folders this write created, when nothing else
    was put in them meanwhile (a refused build leaves no empty --out)."""
    folder = Path(folder)
    created = missing_folders(folder.parent)
    with sigterm_cleaned_up(), ExitStack() as cleanup:
        try:
            if folder.is_dir():
                staging = folder
                _clear_killed_writes_once(folder)
            else:
                folder.parent.mkdir(parents=True, exist_ok=True)
                _clear_killed_writes_once(folder.parent)
                with interrupts_deferred():  # an interrupt before its cleanup is set would leave `staging` behind
                    staging, lock = _create_locked(folder.parent, folder.name, Path.mkdir)
                    cleanup.callback(os.close, lock)
                    cleanup.callback(shutil.rmtree, staging, ignore_errors=True)
            staged = StagedFiles(folder, staging)
            cleanup.callback(_close_all, staged.locks)
            cleanup.callback(_unlink_all, staged.hidden)
            with refusals_named(lambda: _files_named(folder, list(staged.hidden))):
                yield staged
                for hidden in staged.hidden.values():
                    _fsync(hidden)
            with interrupts_deferred():  # Ctrl-C between two renames would publish some files and delete the rest
                for name, hidden in staged.hidden.items():
                    os.replace(hidden, staging / name)
                _fsync(staging)
                if staging != folder:
                    _publish_folder(staging, folder)
                    _fsync(folder.parent)
        except BaseException:
            cleanup.close()
            remove_while_empty(created)
            raise


def _publish_folder(staging: Path, folder: Path) -> None:
    """Rename the hidden folder `staging`, holding the published files, to `folder`; when another writer made
    `folder` meanwhile, the files move into it one by one instead, keeping what that writer put there."""
    try:
        os.rename(staging, folder)  # replaces an empty `folder` whole
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        for entry in list(staging.iterdir()):
            os.replace(entry, folder / entry.name)
        _fsync(folder)


def _unlink_all(hidden: dict[str, Path]) -> None:
    for path in hidden.values():
        path.unlink(missing_ok=True)


def _close_all(descriptors: list[int]) -> None:
    for descriptor in descriptors:
        os.close(descriptor)


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first: what creating it will make."""
    folder = Path(folder).absolute()
    return [path for path in (folder, *folder.parents) if not path.exists()]


def remove_while_empty(folders: Sequence[Path]) -> None:
    """Remove `folders` (deepest first, as `missing_folders` lists them) up to the first that is not empty, i.e.
    that another writer put files in meanwhile; what a refused write created is undone and nothing else."""
    for path in folders:
        try:
            path.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write `data` (text as UTF-8, bytes, or a function that writes the file at the path it is given) to `path`; a
    file where its folder would be made is refused naming it (`refuse_a_file_in_the_way`)."""
    path = Path(path)
    refuse_a_file_in_the_way(path.parent, path.name)
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
    _clear_killed_writes_once(path.parent)
    with sigterm_cleaned_up(), ExitStack() as cleanup:
        with interrupts_deferred():  # an interrupt before its cleanup is set would leave `staging` behind
            staging, lock = _create_locked(path.parent, path.name, Path.mkdir)
            cleanup.callback(os.close, lock)
            cleanup.callback(shutil.rmtree, staging, ignore_errors=True)
        with refusals_named(lambda: str(path)):
            yield staging
            for entry in [*staging.rglob("*"), staging]:
                _fsync(entry)
        with interrupts_deferred():  # Ctrl-C between the renames would leave neither folder at `path`
            if path.exists():
                retired = _create_hidden(path.parent, f"{path.name}{RETIRED}", Path.mkdir)
                try:
                    os.replace(path, retired / path.name)  # a crash before the next rename leaves it in `retired`
                except PermissionError as error:  # moving a folder into another needs it writable (not chmod 555)
                    retired.rmdir()
                    why = "this user may not move it aside for the new one: a read-only folder? make it writable"
                    raise _refused(path, error, why) from error
                os.replace(staging, path)
                delete_directory(retired)  # a kill while deleting leaves a temporary the next cleanup deletes
            else:
                os.replace(staging, path)
            _fsync(path.parent)


def delete_directory(path: str | os.PathLike) -> None:
    """Delete folder `path` so that no reader ever sees a part of it: it is held locked and renamed, in one step, to a
    hidden temporary of its name, and only then deleted. A kill during the deletion leaves that temporary, with the
    lock dropped, for `clear_killed_writes` (and the next write into the folder) to delete."""
    path = Path(path)
    lock = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
    try:
        _lock(lock, blocking=True)
        hidden = _create_hidden(path.parent, path.name, lambda hidden: os.rename(path, hidden))
        shutil.rmtree(hidden)
    finally:
        os.close(lock)


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file that keeps folder `folder` from being made or written into: `folder` itself or the nearest folder
    above it that exists and is no folder; None when there is none."""
    folder = Path(folder)
    return next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)


def refuse_a_file_in_the_way(folder: str | os.PathLike, writes: str) -> None:
    """NotADirectoryError, before a command's work, when `folder` or a folder above it is a file, where the command
    would fail only once it came to write `writes` (the files it makes in `folder`, named in the message)."""
    folder = Path(folder)
    blocking = file_in_the_way(folder)
    if blocking is not None:
        within = "" if blocking == folder else f" (on the way to {folder})"
        raise NotADirectoryError(
            f"{blocking}: is a file, not a folder{within}; choose another output folder for {writes} (nothing was "
            "written)"
        )


def refuse_to_replace(
    path: str | os.PathLike, makes: Sequence[str], inputs: tuple[str | os.PathLike, ...] = ()
) -> None:
    """FileExistsError unless `atomic_directory` may replace folder `path` whole: absent, or holding only files
    whose names match `makes` (the glob patterns of the files such a write makes, e.g. an older checkpoint), and
    none of `inputs` (the folders the new one is made from). Anything else in it (a training state, a model card, a
    subfolder, a user's files) would be deleted with the old folder."""
    path = Path(path)
    blocking = file_in_the_way(path)
    if blocking == path:
        raise FileExistsError(f"{path}: is a file, not a folder; nothing was written")
    if blocking is not None:  # the folder cannot be made under it
        raise FileExistsError(f"{path}: {blocking} is a file, not a folder; nothing was written")
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
    return _listed(sorted(entry.name + "/" * entry.is_dir() for entry in path.iterdir() if not _made_by(entry, makes)))


def _listed(names: list[str]) -> str:
    """`names` for a message: "a, b and c"; past one more than NAMED_FILES, the first ones and how many more."""
    shown = [*names[:NAMED_FILES], f"{len(names) - NAMED_FILES} more"] if len(names) > NAMED_FILES + 1 else names
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
    writer is gone (killed outright: none holds its lock); those of writes under way are left to them. Reads the
    whole folder: for one write among many, `write_atomic` and the others clear each folder once per process."""
    temporary = re.compile(hidden_pattern(name_pattern))
    if folder.is_dir():
        for entry in folder.iterdir():
            if temporary.fullmatch(entry.name):
                delete_unless_locked(entry)


_CLEARED_FOLDERS: set[tuple[int, int]] = set()  # (device, inode) of the folders this process has cleared


def _clear_killed_writes_once(folder: Path) -> None:
    """`clear_killed_writes` of every target's temporaries but retired folders, the first time this process writes
    into `folder`."""
    status = folder.stat()
    identity = (status.st_dev, status.st_ino)
    if identity not in _CLEARED_FOLDERS:
        clear_killed_writes(folder, rf".+(?<!{re.escape(RETIRED)})")
        _CLEARED_FOLDERS.add(identity)


def delete_unless_locked(hidden: Path) -> None:
    """Delete file or folder `hidden` unless a live process holds a lock on it (a write under way, a disk copy
    being mapped); nothing when it is gone meanwhile."""
    try:
        descriptor = _open_to_lock(hidden)
    except OSError:  # gone meanwhile (its write finished), or not a temporary of ours
        return
    try:
        if _lock(descriptor, blocking=False) and same_file(hidden, descriptor):
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
            descriptor = _open_to_lock(hidden)
        except FileNotFoundError:  # a cleaner deleted it before it was locked: make another
            continue
        _lock(descriptor, blocking=True)
        if same_file(hidden, descriptor):
            return hidden, descriptor
        os.close(descriptor)  # deleted by a cleaner between its creation and the lock


def _create_hidden(folder: Path, name: str, create: Callable[[Path], None]) -> Path:
    """A new `.{name}.{random}.tmp` in `folder`, made by `create`, which raises FileExistsError if it exists.
    Not `tempfile`: its files and folders are private (0600, 0700); these get the umask's permissions.
    WriteRefused naming `folder / name` (not the temporary's random name) when the storage, `folder`'s permissions or
    its file system (a name too long with the temporary's additions, /proc taking no files) refuse it."""
    while True:
        hidden = folder / f".{name}.{secrets.token_hex(HIDDEN_TOKEN_BYTES)}.tmp"
        try:
            with refusals_named(lambda: str(folder / name)):  # a full or read-only disk, named by the target
                create(hidden)
            return hidden
        except FileExistsError:
            continue
        except PermissionError as error:
            raise _refused(folder / name, error, f"this user may not create files in {folder}") from error
        except WriteRefused:
            raise
        except OSError as error:
            raise _refused(folder / name, error, _not_created(folder, name, hidden, error)) from error


def _not_created(folder: Path, name: str, hidden: Path, error: OSError) -> str:
    """Why the file system refused to create `hidden`, the temporary of `folder / name`, for `_refused`."""
    if error.errno != errno.ENAMETOOLONG:
        return f"the file system of {folder} takes no new file there: choose another folder"
    longest = os.pathconf(folder, "PC_NAME_MAX")
    added = len(os.fsencode(hidden.name)) - len(os.fsencode(name))
    return (
        f"it is written first under a hidden name {added} bytes longer, past the {longest} bytes a name takes there: "
        f"give one of at most {longest - added} bytes"
    )


def _refused(target: Path, error: OSError, why: str) -> WriteRefused:
    """The WriteRefused of a write into `target` the system refused with `error`, saying `why`."""
    refused = WriteRefused(f"{target}: not written ({error.strerror}: {why}); nothing was written")
    refused.errno = error.errno
    return refused


def _open_to_lock(hidden: Path) -> int:
    """A descriptor of temporary `hidden` to lock: read-write for a file (NFS's flock, an fcntl lock on the server,
    refuses an exclusive lock on a read-only descriptor with EBADF), read-only for a folder (which nothing can open
    for writing)."""
    try:
        return os.open(hidden, os.O_RDWR | os.O_NOFOLLOW)
    except IsADirectoryError:
        return os.open(hidden, os.O_RDONLY | os.O_NOFOLLOW)


def _lock(descriptor: int, blocking: bool) -> bool:
    """Take an exclusive flock on `descriptor`; False when another holds it (or the file system has no flock, where
    no temporary is ever cleared)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def same_file(path: Path, descriptor: int) -> bool:
    """Whether `path` still names the file open at `descriptor`."""
    try:
        named, opened = os.stat(path, follow_symlinks=False), os.fstat(descriptor)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _files_named(folder: Path, names: list[str]) -> str:
    """What a refused write of files `names` in `folder` was writing, for its message: the one file, or the folder
    and its files (the first few of many)."""
    if len(names) == 1:
        return str(folder / names[0])
    return f"{folder} ({_listed(names)})" if names else str(folder)


@contextmanager
def refusals_named(targets: Callable[[], str]) -> Iterator[None]:
    """Turn a write the storage refuses (an OSError or a Rust writer's error of a full disk, a file size limit, a
    read-only or failing disk; torch.save's short write), here or in a write nested in this one, into a
    `WriteRefused` naming `targets()`, which are left as they were."""
    try:
        yield
    except Exception as error:
        cause = error.__cause__ if isinstance(error, WriteRefused) else error
        code = _storage_refusal(cause)
        if code is None and not _torch_short_write(cause):
            raise
        reason = f"{os.strerror(code)}: {STORAGE_REFUSALS[code]}" if code else TORCH_SHORT_WRITE_MEANS
        refused = WriteRefused(
            f"{targets()}: not written ({reason}); nothing was written, and what was there is as it was"
        )
        refused.errno = code
        raise refused from cause


def _storage_refusal(error: BaseException | None) -> int | None:
    """The errno of a write the storage refused (one of STORAGE_REFUSALS): an OSError's, or the os error code of a
    Rust writer's message (safetensors raises SafetensorError, no OSError); None for any other error."""
    if isinstance(error, OSError) and error.errno is not None:
        code = error.errno
    else:
        rust = RUST_OS_ERROR.search(str(error))
        code = int(rust[1] or rust[2]) if rust else None
    return code if code in STORAGE_REFUSALS else None


def _torch_short_write(error: BaseException | None) -> bool:
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
