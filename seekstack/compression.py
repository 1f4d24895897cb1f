"""Compressed files read through, by the suffix that ends their name (in any case), as datatrove's readers (fsspec's
compression="infer") and datasets' JSON loader read them: gzip, bzip2 and xz by the standard library, zstd by
pyarrow's codec."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa


def _zstd_open(raw: BinaryIO) -> BinaryIO:
    """The decompressed bytes of a zstd-compressed stream, buffered (peek, lines) as the standard library's are."""
    return io.BufferedReader(pa.CompressedInputStream(raw, "zstd"))


COMPRESSIONS: dict[str, tuple[str, Callable[[BinaryIO], BinaryIO]]] = {
    ".gz": ("gzip", gzip.open),
    ".bz2": ("bzip2", bz2.open),
    ".xz": ("xz", lzma.open),
    ".zst": ("zstd", _zstd_open),
}
COMPRESSED_READ = "gzip, bzip2, xz and zstd are read through when the name ends in .gz, .bz2, .xz or .zst"
# What reading a damaged compressed file raises (gzip's BadGzipFile, bzip2's and pyarrow's zstd errors are OSErrors)
_DAMAGED_COMPRESSION = (OSError, EOFError, zlib.error, lzma.LZMAError)


class DamagedCompressedFile(ValueError):
    """A file named as compressed whose bytes do not decompress (cut short, or plain text named `.gz`); the message
    names it and what to do."""


def source_kind(path: Path) -> str:
    """A file's suffix as it says what the text is, in lower case and through a compression suffix: `NOTES.TXT.gz`
    -> `.txt`."""
    return uncompressed(path).suffix.lower()


def uncompressed(path: Path) -> Path:
    """`path` without the suffix of its compression (`COMPRESSIONS`): `notes.txt.xz` -> `notes.txt`."""
    return path.with_suffix("") if path.suffix.lower() in COMPRESSIONS else path


@contextmanager
def opened(path: str | Path) -> Iterator[BinaryIO]:
    """A file opened for reading its bytes, decompressed when its name ends in a suffix of `COMPRESSIONS`; what its
    reading raises when it is damaged or not so compressed as a DamagedCompressedFile naming it."""
    path = Path(path)
    compression = COMPRESSIONS.get(path.suffix.lower())
    with open(path, "rb") as raw:
        if compression is None:
            yield raw
            return
        name, decompressed = compression
        try:
            with decompressed(raw) as binary:
                yield binary
        except _DAMAGED_COMPRESSION as error:
            raise DamagedCompressedFile(
                f"{path}: not a readable {name} file ({error}); compress it again, or rename it without the "
                f"{path.suffix} when it is not compressed"
            ) from None
