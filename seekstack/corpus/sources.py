"""Streaming document sources: text folders and files, JSONL, Parquet, saved `datasets`, and the stdlib corpus.

Every source is a generator of `Document`s, so memory stays bounded by one file, line or record batch.
"""

from __future__ import annotations

import codecs
import csv
import errno
import functools
import glob
import io
import json
import mimetypes
import os
import re
import sysconfig
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import charset_normalizer
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq

from seekstack.compression import (
    COMPRESSED_READ,
    COMPRESSIONS,
    DamagedCompressedFile,
    opened,
    source_kind,
    uncompressed,
)
from seekstack.corpus.kinds import CODE_SUFFIXES, HTML_PAGE_START
from seekstack.jsonl import CHAT_MESSAGES_NO_OBJECT, is_chat_messages, json_error_reason, marked_encoding
from seekstack.schema import LONE_SURROGATE, counted, url_refusal

_PACKED_SIGNATURES = tuple(  # how compressed files and archives start: such bytes are no text
    (re.compile(signature, re.DOTALL), name)
    for signature, name in (
        (rb"\x28\xb5\x2f\xfd", "a zstd-compressed file"),
        (rb"BZh[1-9]1AY&SY", "a bzip2-compressed file"),
        (rb"\xfd7zXZ\x00", "an xz-compressed file"),
        (rb"\x04\x22\x4d\x18", "an lz4-compressed file"),
        (rb"\x1f\x8b", "a gzip-compressed file"),
        (rb"PK\x03\x04", "a zip archive (or a .docx, .xlsx, .epub)"),
        (rb"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
        (rb".{257}ustar(?:\x00|  )", "a tar archive"),  # POSIX's and GNU's mark, after the first member's name
        (rb"PAR1.*PAR1\Z", "a Parquet file whose name does not end in .parquet"),  # the mark at both ends
        (rb"%PDF-", "a PDF document"),
    )
)


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte UTF-8 cannot decode, as surrogateescape holds it
_DECODED_ABOVE_127 = re.compile("[^\x00-\x7f\udc80-\udcff]")  # a character decoded, not a byte escaped
# The first two or three bytes of an emoji (U+1F000-U+1FFFF, `F0 9F` and two more) cut short, as surrogateescape holds
# them: in Windows-1252 `ðŸ`, which no legacy text spells. Not any four-byte character's: their lead bytes with two
# continuation bytes are Windows-1252's `ð ñ ò ó ô` before two symbols, which Spanish and French write
# (`llegó\xa0–`, `llegó…”`, `Bernardó\xa0»`)
_CUT_EMOJI = re.compile("\udcf0\udc9f")
# A character the file's end cuts after two or more of its bytes, as a truncated scrape leaves one: an emoji's first
# two bytes (`ðŸ`), a character of planes 1-3's first three (`F0 9D 90` of a mathematical bold `𝐀`, `F0 A0 AE` of
# `𠮷`: `ð` and two symbols or undefined bytes), or the first two of a symbol of U+2000-U+2FFF (`E2 80` of `…` or `’`,
# `E2 82` of `€`: `â€`, `â‚`, the marks of mojibake); not another four-byte character's, which in Windows-1252 are
# `ó` (or `ñ ò ô`) before one or two symbols (`llegó…`, `Bernardó»`), nor another three-byte one's, a letter and a
# symbol (`José”`, `café…`: E9 94, E9 85)
_CUT_AT_THE_END = re.compile(b"\xf0\x9f|\xf0[\x90-\xbf][\x80-\xbf]|\xe2[\x80-\xbf]")
# A folder's files read by suffix: documents, and the source code whose language `kinds.CODE_SUFFIXES` names
TEXT_SUFFIXES = (".txt", ".md", ".rst", *CODE_SUFFIXES)
# A folder's files without a suffix (README, LICENSE, Makefile, a Debian package's copyright) are read when they are
# text: their first `SNIFF_BYTES` bytes hold no control character but whitespace, backspace and escape (those of
# terminal output and man pages), as `file` tells text; a NUL byte, as git tells a binary file, is one such character.
NO_SUFFIX = ""
SNIFF_BYTES = 1024
# UTF-16 saved without its byte-order mark is told by the NUL high bytes of its ASCII characters: this share of the
# bytes at one parity of positions in the first `UTF16_SNIFF_BYTES` (Russian with a space every 7 letters: 0.14)
UTF16_SNIFF_BYTES = 4096
UTF16_MIN_NUL_SHARE = 0.1
# UTF-16 Chinese, Japanese or Korean has no ASCII, so no NUL high bytes: it is told when UTF-8 fails on a share of
# those first bytes and one byte order reads them, at least `UTF16_MIN_CHARACTERS` characters, as text of one writing
# system (`UTF16_MIN_SCRIPT_SHARE` of its letters, ASCII ones aside). ASCII read as UTF-16 pairs into CJK letters too
# ("Bush hid the facts"), but its spaces, stops and line ends pair into format, unassigned and private-use characters,
# which no text holds; shorter samples are not told apart from it.
UTF16_MIN_CHARACTERS = 64
UTF16_MIN_NOT_UTF8_SHARE = 0.05  # of those bytes (Japanese in hiragana alone: 0.09, Chinese 0.37, Korean 0.66)
UTF16_MIN_SCRIPT_SHARE = 0.9
_TEXT_CATEGORIES = tuple("LMNPSZ")  # letters, marks, numbers, punctuation, symbols, separators
# Whitespace, and the format characters text holds: zero-width space, (non-)joiners and byte-order mark, and those
# legacy encodings hold, the soft hyphen (0xAD of cp1251, cp1253, cp1255, cp1256) and the left-to-right and
# right-to-left marks Hebrew, Arabic and Persian text sets beside numbers and punctuation (0xFD, 0xFE of cp1255, cp1256)
_TEXT_CONTROLS = frozenset("\t\n\r\f\u200b\u200c\u200d\ufeff\u00ad\u200e\u200f")
# Unicode names' first word that is one writing system with another's: Japanese writes kanji, kana and "ー" together
_WRITING_SYSTEMS = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "KATAKANA-HIRAGANA": "CJK", "IDEOGRAPHIC": "CJK"}
# A file that is no UTF-8 (that share of its first bytes, as for UTF-16) may be in a legacy encoding of another script
# than Latin's: charset_normalizer (requests' detector) names it, trusted only for these encodings, and when the text
# reads as that script's (most of its letters not ASCII, `UTF16_MIN_SCRIPT_SHARE` of those one script's); it names
# Latin text's legacy encodings wrongly too often (Portuguese as cp1250), so those are read as Windows-1252, as before.
LEGACY_MIN_OTHER_LETTER_SHARE = 0.5  # of the letters read, those not ASCII (at least `UTF16_MIN_CHARACTERS` of them)
# charset_normalizer's coherence, the share of a reading's letters in its language's most frequent ones, by which a
# later reading must beat its first choice to be taken: Hebrew in cp1255 0.87 over the cp1251 reading's 0.29, where
# a wrong reading of short lines may fit a little better than the right one (Greek UI lines: cp1253 0.45, cp1251 0.46)
LEGACY_COHERENCE_MARGIN = 0.2
# The share of odd characters charset_normalizer allows a reading (its default), and more, allowed where it found no
# trusted one: Persian in cp1256 counts its zero-width non-joiners (0x9D, between a word and its suffix: `می‌گویند`)
# as odd, so a paragraph of it was read as Kazakh (ptcp154, untrusted) alone, then as Windows-1252, its پ چ گ and
# joiners as U+FFFD; allowing more for every file reads Korean in EUC-KR as cp1251
LEGACY_CHAOS = 0.2
LEGACY_MORE_CHAOS = 0.5
LEGACY_ENCODINGS_OF_OTHER_SCRIPTS = frozenset(
    "cp1251 koi8_r koi8_u cp866 iso8859_5 mac_cyrillic cp1253 iso8859_7 cp1255 iso8859_8 cp1256 iso8859_6 cp874 "
    "tis_620 iso8859_11 cp1125 cp855 mac_greek gb2312 gbk gb18030 hz big5 big5hkscs cp950 shift_jis cp932 "
    "shift_jis_2004 shift_jisx0213 euc_jp euc_jis_2004 euc_jisx0213 iso2022_jp euc_kr cp949 johab iso2022_kr".split()
)
_NOT_TEXT_BYTES = re.compile(rb"[\x00-\x07\x0e-\x1a\x1c-\x1f\x7f]")
BINARY_WITHOUT_SUFFIX = "(no suffix, not text)"
# A named pipe, socket or device among a folder's files, of any name, is not read: reading a pipe waits for a writer
NOT_A_REGULAR_FILE = "(not a regular file)"
# So are a package's documents named with a qualifier after the name rather than a file type (`README.Debian`,
# `NEWS.source`, `changelog.Debian.gz`, a rotated `changelog.1.gz`, as /usr/share/doc holds them); not one whose
# suffix is a type in Python's own table of them, `mimetypes` (`README.html`, `LICENSE.pdf`).
_DOCUMENTATION_NAMES = (
    "readme changelog changes news history todo copying copyright license licence authors thanks credits install "
    "hacking bugs contributing notice faq maintainers"
).split()
_QUALIFIED_DOCUMENTATION = re.compile(rf"(?i)(?:{'|'.join(_DOCUMENTATION_NAMES)})(?:\.[^.]+)+")
# And so are files whose name ends in a version rather than a file type (`Apache-2.0`, `LGPL-2.1`, `GFDL-1.3`, as
# /usr/share/common-licenses holds them)
_VERSIONED_NAME = re.compile(r".+-\d+(?:\.\d+)+")
_FILE_TYPES = mimetypes.MimeTypes()  # the built-in table alone, not the machine's /etc/mime.types
# How a folder's files are read, for messages about those that were not
FOLDER_FILES_READ = (
    f"by suffix, {' '.join(TEXT_SUFFIXES)} (and {', '.join(COMPRESSIONS)} of them), and without one when they are "
    "text (as are documents named with a qualifier or a version: README.Debian, changelog.1.gz, Apache-2.0)"
)
# HTML pages, by suffix or opening tag (`HTML_PAGE_START`), are refused as inputs (a folder's are not read)
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
# Version-control systems' records (git's objects and logs, CVS's Entries), not entered: no text of the folder's own
VERSION_CONTROL_DIRS = frozenset({".git", ".hg", ".svn", ".bzr", "CVS"})
# read as rows when an input names the file, not inside a folder
ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow")
ARROW_FILE_MAGIC = b"ARROW1"  # how Arrow's random-access file format opens; `datasets` writes the stream format
CSV_BLOCK_BYTES = 64 * 2**20  # a CSV block holds whole rows: this bounds the longest document
_CSV_LIMIT_RAISED = threading.Lock()  # held by the thread whose Python csv reads under CSV_BLOCK_BYTES
STDLIB_SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class DataSourceError(ValueError):
    """A source that cannot be read as documents; the message names the file, line or field."""


class MissingTextField(DataSourceError):
    """A record or table without the text's field or column; `problem` says so, naming the file (and line or item),
    the message adds how `data build`'s options read it: its --rows-field the rows held under `rows_keys` (the keys
    of `record`, the JSON object if one, holding arrays of objects), its --field another field."""

    def __init__(self, problem: str, record: dict[str, Any] | None = None, rows_keys: list[str] | None = None):
        self.problem, self.record, self.rows_keys = problem, record or {}, rows_keys or []
        held = (
            f"; {', '.join(map(repr, self.rows_keys))} {'holds' if len(self.rows_keys) == 1 else 'hold'} an array of "
            f"objects: rows held under a key are read with `seekstack data build --rows-field {self.rows_keys[0]}`"
            if self.rows_keys
            else ""
        )
        super().__init__(
            f"{problem}{held}; name the text's field with --field NAME in `seekstack data build` (whose corpus holds "
            "it as 'text') or `data quality-train`"
        )


class Document(NamedTuple):
    """One document of a source: a stable id, its text, and the name of the source it came from."""

    doc_id: str
    text: str
    source: str


def read_text_folder(
    folder: str | Path,
    suffixes: tuple[str, ...] = (*TEXT_SUFFIXES, NO_SUFFIX),
    skipped_dirs: frozenset[str] = VERSION_CONTROL_DIRS,
    skipped: Counter[str] | None = None,
) -> Iterator[Document]:
    """Every file below `folder` whose suffix is in `suffixes` (`NO_SUFFIX`: a file without one, documentation named
    with a qualifier, `README.Debian`, or one named with a version, `Apache-2.0`, when it is text), one document
    each, in sorted order; folders named in `skipped_dirs` are not entered; `skipped` counts the other files by
    suffix, those without one that are not text as `BINARY_WITHOUT_SUFFIX`, and named pipes, sockets and devices as
    `NOT_A_REGULAR_FILE`. Symbolic links to folders are followed, as those to files are, each folder read once (a
    link back up to a folder being read is no loop)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataSourceError(f"{folder}: not a folder")
    claimed = {folder.resolve()}
    source = _as_text(Path(os.path.abspath(folder)).name or folder.anchor)  # `.` and `..` by the names they stand for
    for directory, subdirs, files in os.walk(folder, onerror=_refuse_an_unlisted_folder, followlinks=True):
        subdirs[:] = _unclaimed_folders(Path(directory), subdirs, skipped_dirs, claimed)
        for name in sorted(files):
            path = Path(directory, name)
            kind = source_kind(path)
            sniffed = NO_SUFFIX in suffixes and (
                kind == NO_SUFFIX or (kind not in suffixes and _is_named_without_a_file_type(path))
            )
            if (kind in suffixes or sniffed) and not path.exists():  # os.walk lists a link to nothing among files
                raise DataSourceError(_broken_link(path))
            if (kind in suffixes or sniffed) and not path.is_file():  # reading a named pipe waits for a writer
                kind = NOT_A_REGULAR_FILE
            elif sniffed:
                kind = NO_SUFFIX if _starts_as_text(path) else kind or BINARY_WITHOUT_SUFFIX
            if kind in suffixes:
                yield Document(_as_text(path.relative_to(folder).as_posix()), _decoded(_read(path)), source)
            elif skipped is not None:
                skipped[_as_text(kind) or "(no suffix)"] += 1


def _broken_link(path: Path) -> str:
    """What is wrong with a symbolic link that leads to no file: its target does not exist, or links lead back to
    themselves (`a -> b`, `b -> a`, which `exists` reads as missing too)."""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return (
                f"{path}: a symbolic link to {os.readlink(path)}, one of a loop of links that leads to no file; "
                "point one of them at a file, or remove them"
            )
    return (
        f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; restore its target or remove the link"
    )


def _refuse_an_unlisted_folder(error: OSError) -> None:
    """A DataSourceError naming a folder `os.walk` cannot list (no read permission), which it would pass over without
    a word, leaving all the files below it out of the corpus."""
    raise DataSourceError(
        f"{error.filename}: a folder that cannot be read ({error.strerror}), whose files would be left out; give read "
        "access to it, or move it out of the input"
    ) from None


def _is_named_without_a_file_type(path: Path) -> bool:
    """True for a file whose last suffix, through a compression suffix, is no file type: a package's document named
    with a qualifier (`README.Debian`, `changelog.Debian.gz`, `changelog.1.gz`; not `README.html`), or a name ending
    in a version (`Apache-2.0`, `LGPL-2.1`)."""
    name = uncompressed(path).name
    if _VERSIONED_NAME.fullmatch(name):
        return True
    return _QUALIFIED_DOCUMENTATION.fullmatch(name) is not None and _FILE_TYPES.guess_type(name)[0] is None


def _starts_as_text(path: Path) -> bool:
    """True when a file's first `SNIFF_BYTES` bytes (decompressed) hold no character of `_NOT_TEXT_BYTES`."""
    with _opened(path) as binary:  # a damaged compressed file is named, as one with a text suffix is
        head = binary.read(SNIFF_BYTES)
    return _NOT_TEXT_BYTES.search(head) is None


def _unclaimed_folders(
    directory: Path, names: list[str], skipped_dirs: frozenset[str], claimed: set[Path]
) -> list[str]:
    """The sorted `names` of folders in `directory` to enter: not in `skipped_dirs`, and not a folder `claimed`
    already (by its real path: through a link, or as the folder the link is in); they join `claimed`."""
    entered = []
    for name in sorted(names):
        real_path = (directory / name).resolve()
        if name not in skipped_dirs and real_path not in claimed:
            claimed.add(real_path)
            entered.append(name)
    return entered


class TextFolder:
    """A folder's text files as documents (`read_text_folder`), counting the files of other suffixes it passes
    over in `skipped`, for the build report: a folder of `.html` pages is not read, and says so."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        self.skipped: Counter[str] = Counter()

    def __iter__(self) -> Iterator[Document]:
        return read_text_folder(self.path, skipped=self.skipped)


class Rows:
    """The rows of a JSONL, Parquet, Arrow or saved-dataset source (`read` of `path`, text in `field`, ids from
    `id_field` where given) as documents, counting in `null_texts` by file the rows whose text is null (dataset exports
    hold them), which are skipped, for the build report."""

    def __init__(self, read: Callable[..., Iterator[Document]], path: Path, field: str, id_field: str | None = None):
        self.read, self.path, self.field, self.id_field = read, path, field, id_field
        self.null_texts: Counter[str] = Counter()

    def __iter__(self) -> Iterator[Document]:
        return self.read(self.path, self.field, id_field=self.id_field, null_texts=self.null_texts)


def read_text_file(path: str | Path) -> Iterator[Document]:
    """A single text file, or a named pipe (a shell's `<(xzcat notes.txt.xz)`, `/dev/stdin`), as one document; a
    DataSourceError naming an HTML page (by its suffix or its opening tag), whose markup is no text to train on."""
    path = Path(path)
    if not (path.is_file() or path.is_fifo()):
        raise DataSourceError(f"{path}: no such file")
    text = _decoded(_read(path))
    # a pipe, `/dev/stdin < rows.jsonl` or a file named `rows` has no suffix to read rows by
    if (path.is_fifo() or not source_kind(path)) and _opens_with_a_json_object(text):
        raise DataSourceError(
            f"{path}: a named pipe or a file without a suffix is read as one text document, and this one holds JSON "
            "Lines (its first line is a JSON object), whose keys and quotes would be trained on as text; give the "
            ".jsonl file itself (compressed too: rows.jsonl.gz is read decompressed), or write the rows to one"
        )
    if source_kind(path) in HTML_SUFFIXES or HTML_PAGE_START.match(text):
        raise DataSourceError(
            f"{path}: an HTML page, whose tags, scripts and menus would be trained on as its text; extract the text "
            "first with trafilatura, as datatrove does (`trafilatura < page.html > page.txt`), and give that (a "
            "folder's .html files are not read either)"
        )
    yield Document(_as_text(path.name), text, _as_text(path.name))


def _opens_with_a_json_object(text: str) -> bool:
    """Whether the first non-blank line of `text` is a JSON object, as a row of JSON Lines is."""
    first_line = re.search(r"\S.*", text)  # from its first character to its end
    try:
        return first_line is not None and isinstance(json.loads(first_line[0]), dict)
    except (ValueError, RecursionError):
        return False


def _read(path: Path) -> bytes:
    """A file's bytes, decompressed when its name ends in a suffix of `COMPRESSIONS`; a DataSourceError naming it
    when they are a compressed file or archive still (a `.zip`, a `.txt` that is gzipped), not to be read as text."""
    with _opened(path) as binary:
        data = binary.read()
    packed = next((name for signature, name in _PACKED_SIGNATURES if signature.match(data)), None)
    if packed is not None:
        raise DataSourceError(
            f"{path}: {packed}, not text; decompress or extract it first ({COMPRESSED_READ}, Parquet when it "
            "ends in .parquet)"
        )
    return data


def _decoded(data: bytes) -> str:
    """A text file's text: UTF-8 without its byte-order mark (a file saved with one is the same document); UTF-32 or
    UTF-16 when it opens with that one's mark (`marked_encoding`); UTF-16 when it holds NUL bytes at one parity of
    positions as UTF-16 saved without the mark does (`_utf16_without_mark`); when it is no UTF-8, the encoding
    `_encoding_of_no_utf8` names: the legacy encoding of a script other than Latin's (cp1251, GBK, Shift_JIS, ...),
    UTF-16 of one writing system, as Chinese, Japanese or Korean saved so, or Windows-1252 (Latin-1's superset: a
    legacy 8-bit file), else UTF-8 with its stray bytes read by `_stray_byte_as_cp1252` (a Latin-1 line in a UTF-8
    changelog: `Bj\xf6rn` is `Björn`); UTF-16 too when valid UTF-8 holds control bytes that read as one writing
    system's text in it (Thai, whose UTF-16 bytes are all ASCII's)."""
    marked = marked_encoding(data)
    if marked is not None:
        return data.decode(marked, errors="replace")
    utf16 = _utf16_without_mark(data) if b"\x00" in data else None  # NUL bytes: no text file's, but UTF-16's
    if utf16 is not None:
        return data.decode(utf16, errors="replace")
    try:
        text = data.decode("utf-8-sig")  # nearly every file, in one pass
    except UnicodeDecodeError:
        encoding = _encoding_of_no_utf8(data, utf16_of_one_writing_system=True)
        if encoding is not None:
            return data.decode(encoding, errors="replace")
        return data.decode("utf-8-sig", errors=STRAY_BYTE_AS_CP1252)
    # UTF-16 of a script whose code points' bytes are all ASCII's (Thai, U+0E01-0E5B: `\x0e` every other byte) is
    # valid UTF-8: told by the control bytes no text holds, when it has no NUL of a space or line end to be told by
    utf16 = _utf16_of_one_writing_system(data) if _NOT_TEXT_BYTES.search(data, 0, UTF16_SNIFF_BYTES) else None
    return text if utf16 is None else data.decode(utf16, errors="replace")


def _encoding_of_no_utf8(data: bytes, utf16_of_one_writing_system: bool = False) -> str | None:
    """The encoding of bytes that UTF-8 fails on: the legacy encoding of another script that they read in
    (`_legacy_encoding_of_another_script`), else, with `utf16_of_one_writing_system`, UTF-16 when they read as one
    writing system's text in it (`_utf16_of_one_writing_system`, asked second: Shift_JIS reads so as UTF-16 too), else
    Windows-1252 when not one of their bytes above 127 starts a valid UTF-8 character (a legacy 8-bit file); None for
    UTF-8 with stray bytes, read by `_stray_byte_as_cp1252`."""
    encoding = _legacy_encoding_of_another_script(data)
    if encoding is None and utf16_of_one_writing_system:
        encoding = _utf16_of_one_writing_system(data)
    if encoding is None and _starts_no_utf8_character(data):
        return "cp1252"
    return encoding


def _utf16_without_mark(data: bytes) -> str | None:
    """`utf-16-le` or `utf-16-be` for UTF-16 text saved without its byte-order mark (a Windows tool's "Unicode"):
    in its first `UTF16_SNIFF_BYTES` bytes, at least `UTF16_MIN_NUL_SHARE` of those at odd positions (little-endian)
    or even ones (big-endian) are NUL, the high byte of every ASCII character, and under a tenth as many at the others,
    and they decode as UTF-16; None for other bytes (binary data has NULs at both)."""
    sample = data[:UTF16_SNIFF_BYTES]
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    for encoding, nuls, others in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if nuls >= UTF16_MIN_NUL_SHARE * (len(sample) // 2) and others * 10 < nuls:
            try:  # not final: the sample may end inside a surrogate pair
                codecs.getincrementaldecoder(encoding)().decode(sample, final=False)
            except UnicodeDecodeError:
                return None
            return encoding
    return None


def _utf16_of_one_writing_system(data: bytes) -> str | None:
    """`utf-16-le` or `utf-16-be` for UTF-16 text without its byte-order mark and without ASCII (Chinese, Japanese,
    Korean, Thai): at least `UTF16_MIN_NOT_UTF8_SHARE` of the first `UTF16_SNIFF_BYTES` bytes are no UTF-8 text's (not
    UTF-8, not a stray byte; or a control byte, `_NOT_TEXT_BYTES`, as Thai's high byte 0x0E), and in the byte order
    whose high bytes, one script's block, take fewer values than its low bytes, they decode as at least
    `UTF16_MIN_CHARACTERS` characters text holds, no control, format, unassigned or private-use one, whose non-ASCII
    letters are at least `UTF16_MIN_SCRIPT_SHARE` of one writing system; None for other bytes."""
    sample = data[:UTF16_SNIFF_BYTES]
    not_utf8 = len(_ESCAPED_BYTE.findall(sample.decode("utf-8", errors="surrogateescape")))
    not_utf8 += len(_NOT_TEXT_BYTES.findall(sample))
    even, odd = len(set(sample[0::2])), len(set(sample[1::2]))
    if not_utf8 < UTF16_MIN_NOT_UTF8_SHARE * len(sample) or even == odd:
        return None
    encoding = "utf-16-be" if even < odd else "utf-16-le"
    try:  # not final: the sample may end inside a surrogate pair
        text = codecs.getincrementaldecoder(encoding)().decode(sample, final=False)
    except UnicodeDecodeError:
        return None
    return encoding if len(text) >= UTF16_MIN_CHARACTERS and _reads_as_one_writing_system(text) else None


def _legacy_encoding_of_another_script(data: bytes) -> str | None:
    """The legacy encoding (`LEGACY_ENCODINGS_OF_OTHER_SCRIPTS`: cp1251, KOI8-R, GBK, Big5, Shift_JIS, EUC-KR, ...)
    of a file that UTF-8 fails on (`UTF16_MIN_NOT_UTF8_SHARE` of its first bytes) and that reads as one script's text
    in it: the first of those charset_normalizer finds (its untrusted Latin or Kazakh guesses passed over), or one
    whose text fits its language better by `LEGACY_COHERENCE_MARGIN`, for the detector's order puts first the
    reading with the fewest odd characters, which the marks and soft hyphens these encodings hold count among (Hebrew
    in cp1255 with right-to-left marks came first as cp1251); None for other bytes (Latin text in Windows-1252, a
    UTF-8 file with a stray byte)."""
    sample = data[:UTF16_SNIFF_BYTES]
    not_utf8 = len(_ESCAPED_BYTE.findall(sample.decode("utf-8", errors="surrogateescape")))
    if not_utf8 < max(UTF16_MIN_CHARACTERS, UTF16_MIN_NOT_UTF8_SHARE * len(sample)):
        return None  # a short text's few bytes above 127 (`r\xe9sum\xe9`, a cut emoji) read as any script's
    found = _trusted_readings(data, LEGACY_CHAOS) or _trusted_readings(data, LEGACY_MORE_CHAOS)
    if not found:
        return None
    fittest = max(found, key=lambda match: match.coherence)  # the first of equals
    best = fittest if fittest.coherence >= found[0].coherence + LEGACY_COHERENCE_MARGIN else found[0]
    text = str(best)[:UTF16_SNIFF_BYTES]
    letters = [char for char in text if char.isalpha()]
    other_letters = sum(char >= "\x80" for char in letters)  # Latin text read so has a few among its ASCII ones
    if other_letters < max(UTF16_MIN_CHARACTERS, LEGACY_MIN_OTHER_LETTER_SHARE * len(letters)):
        return None
    return best.encoding if _reads_as_one_writing_system(text) else None


def _trusted_readings(data: bytes, chaos: float) -> list[charset_normalizer.CharsetMatch]:
    """charset_normalizer's readings of `data` in `LEGACY_ENCODINGS_OF_OTHER_SCRIPTS`, best first, of those whose
    share of odd characters is at most `chaos`."""
    readings = charset_normalizer.from_bytes(data, threshold=chaos)
    return [match for match in readings if match.encoding in LEGACY_ENCODINGS_OF_OTHER_SCRIPTS]


def _reads_as_one_writing_system(text: str) -> bool:
    """True when every character of `text` is one text holds and `UTF16_MIN_SCRIPT_SHARE` of its non-ASCII letters
    (ASCII ones: the English words of a Chinese text) are of one writing system (the first word of their Unicode
    names: `CJK`, `HANGUL`, `CYRILLIC`; kana count as CJK)."""
    if any(not unicodedata.category(c).startswith(_TEXT_CATEGORIES) and c not in _TEXT_CONTROLS for c in text):
        return False
    systems = Counter(_writing_system(c) for c in text if unicodedata.category(c).startswith("L") and c >= "\x80")
    return bool(systems) and systems.most_common(1)[0][1] >= UTF16_MIN_SCRIPT_SHARE * systems.total()


def _writing_system(letter: str) -> str:
    first_word = unicodedata.name(letter, "").split(" ")[0]
    return _WRITING_SYSTEMS.get(first_word, first_word)


def _stray_byte_as_cp1252(error: UnicodeError) -> tuple[str, int]:
    """For UTF-8 decoding: a byte above 127 that is part of no character, alone between others (the é of a Latin-1
    line in a UTF-8 file, `St\xe9phane`), as Windows-1252 reads it; two or more bytes of a character cut short (a
    damaged one, an emoji cut by the file's end) as U+FFFD, as Windows-1252's five undefined bytes are."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    stray = error.object[error.start : error.end]
    return (stray.decode("cp1252", errors="replace") if len(stray) == 1 else "\ufffd"), error.end


STRAY_BYTE_AS_CP1252 = "seekstack-stray-byte-as-cp1252"
codecs.register_error(STRAY_BYTE_AS_CP1252, _stray_byte_as_cp1252)


def _as_text(name: str) -> str:
    """A file system name as text: one whose bytes are not UTF-8 (a Latin-1 name out of an old archive), which Python
    holds as surrogate escapes that no UTF-8 file can store, decoded by the rules of a file's text (`_decoded`)."""
    return _decoded(os.fsencode(name))


def _starts_no_utf8_character(data: bytes) -> bool:
    """True when no byte above 127 starts a UTF-8 character: none decodes as one (a real U+FFFD does), the end
    does not cut one after its second byte (`_CUT_AT_THE_END`: `F0 9F 98`, an emoji cut by a scraper; a last lone
    `E9` may be an é, a last `F3 85` Windows-1252's `ó…` and a last `E9 94` its `é”`), and no emoji is cut after its
    second or third byte before other text (`_CUT_EMOJI`: a JSON Lines row whose text a scraper cut, `"Great day
    \xf0\x9f\x98"}`; two bytes of a three-byte character there may be Windows-1252's `é’`, and are read so)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")  # a bad byte -> U+DC80..U+DCFF
    text = decoder.decode(data)  # not final: a character cut by the end waits in the decoder
    cut_character, _ = decoder.getstate()
    return (
        _CUT_AT_THE_END.fullmatch(cut_character) is None
        and not _DECODED_ABOVE_127.search(text)
        and not _CUT_EMOJI.search(text)
    )


def read_jsonl(
    path: str | Path, field: str = "text", id_field: str | None = None, null_texts: Counter[str] | None = None
) -> Iterator[Document]:
    """One document per line of a JSON Lines file, its text in `field`; ids are `id_field` or `file:line`. A line
    whose text is null is skipped, and counted under the file's name in `null_texts`."""
    path = Path(path)
    yield from _documents_from_values(_jsonl_values(path), path, field, id_field, null_texts)


def read_json(
    path: str | Path,
    field: str = "text",
    id_field: str | None = None,
    null_texts: Counter[str] | None = None,
    rows_field: str | None = None,
) -> Iterator[Document]:
    """The rows of a `.json` file as `read_jsonl` reads them: JSON Lines (what `datasets.Dataset.to_json` writes),
    or one JSON array of objects, read whole (ids `file:N` for its N-th object, from 1), or one object written over
    several lines (`json.dump(row, f, indent=2)`), read whole as one row (`file:1`). With `rows_field` (datasets'
    `load_dataset("json", field=...)`), the file is one object whose array under that key holds the rows (SQuAD's
    layout, `{"version": ..., "data": [...]}`), ids `file:N` as an array's."""
    path = Path(path)
    first_line = "" if rows_field else next((line for _, line in _jsonl_lines(path) if line.strip()), "")
    if rows_field is not None:
        values: Iterable[tuple[int, str, Any]] = _rows_under(path, rows_field)
    elif first_line.lstrip().startswith("["):
        values = _array_items(path, _parsed_json(_decoded(_read(path)), str(path)))
    elif first_line.lstrip().startswith("{") and (whole := _json_over_lines(path, first_line)) is not None:
        values = [(1, str(path), whole)]
    else:
        values = _jsonl_values(path)  # a line that is no JSON is named by its number
    try:
        yield from _documents_from_values(values, path, field, id_field, null_texts)
    except MissingTextField as error:
        arrays = [key for key, value in error.record.items() if _holds_rows(value)] if rows_field is None else []
        if not arrays:
            raise
        raise MissingTextField(error.problem, error.record, arrays) from None


def _array_items(path: Path, items: list[Any]) -> Iterator[tuple[int, str, Any]]:
    """The items of a JSON array read from `path`, numbered from 1, with where each is (for errors)."""
    return ((number, f"{path}: item {number}", item) for number, item in enumerate(items, start=1))


def _rows_under(path: Path, rows_field: str) -> Iterator[tuple[int, str, Any]]:
    """The items of the array under the key `rows_field` of the JSON object that `path` holds whole; an error naming
    the file when it holds no such object, key or array."""
    whole = _parsed_json(_decoded(_read(path)), f"{path} (one JSON object, read whole for --rows-field)")
    if not isinstance(whole, dict):
        raise DataSourceError(
            f"{path}: a JSON {_JSON_TYPES.get(type(whole), 'value')}, not an object holding its rows under "
            f"{rows_field!r} (--rows-field)"
        )
    if rows_field not in whole:
        raise DataSourceError(
            f"{path}: no field {rows_field!r} (--rows-field), only {', '.join(map(repr, whole)) or 'none'}"
        )
    rows = whole[rows_field]
    if not isinstance(rows, list):
        raise DataSourceError(
            f"{path}: field {rows_field!r} (--rows-field) is a JSON {_JSON_TYPES.get(type(rows), 'object')}, not an "
            "array of rows"
        )
    return _array_items(path, rows)


def _holds_rows(value: Any) -> bool:
    """Whether a JSON value is an array of objects, as rows are held under a key."""
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _json_over_lines(path: Path, first_line: str) -> Any:
    """The JSON value of the whole file when its first line is not JSON alone but the file is (an object written over
    several lines); else None."""
    try:
        json.loads(first_line)
    except (ValueError, RecursionError):
        try:
            return json.loads(_decoded(_read(path)))
        except (ValueError, RecursionError):
            return None
    return None


def _jsonl_values(path: Path) -> Iterator[tuple[int, str, Any]]:
    """The JSON value on each non-blank line of a JSON Lines file, with its line number and `file:line`."""
    for line_number, line in _jsonl_lines(path):
        if line.strip():
            where = f"{path}:{line_number}"
            yield line_number, where, _parsed_json(line, where)


def _documents_from_values(
    values: Iterable[tuple[int, str, Any]],
    path: Path,
    field: str,
    id_field: str | None,
    null_texts: Counter[str] | None,
) -> Iterator[Document]:
    """Documents from the JSON objects of `path`, each given with its number (ids `file:number`) and where it is
    (for errors), text in `field`; a null text is skipped, and counted under the file's name in `null_texts`. A file
    none of whose rows holds `id_field` is refused once read (a mistyped option; a table's missing column likewise)."""
    first_fields: list[str] | None = None
    id_field_held = False
    for number, where, value in values:
        record = _json_object(value, where, field)
        first_fields = list(record) if first_fields is None else first_fields
        id_field_held = id_field_held or id_field in record
        text = _text_field(record, where, field)
        if text is None:  # no text (a null in a dataset export): skipped, as a Parquet row's null is
            if null_texts is not None:
                null_texts[_as_text(path.name)] += 1
            continue
        # JSON may escape half a character ("\ud83d", an emoji cut by a scraper): U+FFFD, as a text file's bad bytes
        name = _as_text(path.name)
        doc_id = _row_id(record.get(id_field) if id_field else None, f"{name}:{number}")
        yield Document(doc_id, LONE_SURROGATE.sub("\ufffd", text), name)
    if id_field is not None and first_fields is not None and not id_field_held:
        raise DataSourceError(
            f"{path}: no row holds field {id_field!r} (the first holds {', '.join(map(repr, first_fields))}); name the "
            "ids' field with --id-field NAME, or leave it out for ids file:line"
        )


def require_corpus_file(jsonl_path: Path) -> None:
    """FileNotFoundError or IsADirectoryError naming `jsonl_path` and what to give instead, when it is no file: a
    folder `data build` wrote given for one of its splits' files, or a path that holds nothing (a missing val.jsonl:
    how to hold no document out)."""
    if jsonl_path.is_dir():
        raise IsADirectoryError(
            f"{jsonl_path}: is a folder; give the JSON Lines file of one of its splits, "
            f"{jsonl_path / 'train.jsonl'} or {jsonl_path / 'val.jsonl'}"
        )
    if jsonl_path.is_file():
        return
    build = f"`seekstack data build TEXT --out {jsonl_path.parent}`"
    if jsonl_path.name == "val.jsonl":
        raise FileNotFoundError(
            f"{jsonl_path}: no such file; {build} writes it beside train.jsonl (empty with --val-fraction 0): build "
            "the corpus with it, or add an empty val.jsonl to hold no document out"
        )
    raise FileNotFoundError(f"{jsonl_path}: no such file; {build} writes a corpus's train.jsonl and val.jsonl")


class CorpusRow(NamedTuple):
    """A row of a corpus split: the JSON object whole, its text, and its id: the value of its "id" field as text, or
    `file:line` where it has none (`_row_id`), as `data build` names a row of a JSON Lines source without ids."""

    record: dict[str, Any]
    text: str
    doc_id: str


def read_corpus_rows(path: str | Path, field: str = "text") -> Iterator[CorpusRow]:
    """Each row of a JSON Lines file, as every command reading a corpus split takes it (tokenizer train, data
    tokenize, data select, which writes the rows again with more fields; eval and explain, which name documents by
    id): blank lines are skipped, a row without a text, or a null one, is an error naming file:line, an id is not
    required."""
    path = Path(path)
    name = _as_text(path.name)
    for number, where, value in _jsonl_values(path):
        record = _json_object(value, where, field)
        text = _text_field(record, where, field)
        if text is None:
            raise DataSourceError(f"{where}: field {field!r} is null, not a string")
        yield CorpusRow(record, LONE_SURROGATE.sub("\ufffd", text), _row_id(record.get("id"), f"{name}:{number}"))


def _text_field(record: dict[str, Any], where: str, field: str) -> str | None:
    """The text of a JSON object at `where`, in `field`: a string, or None for a null; an error naming it when the
    field is missing or holds another value."""
    if field not in record:
        raise MissingTextField(f"{where}: no field {field!r}, only {', '.join(map(repr, record)) or 'none'}", record)
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise DataSourceError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """A JSON Lines file's lines, numbered from 1, decoded as text files are: all as UTF-16 or UTF-32 when the file
    opens with that one's byte-order mark (as Windows PowerShell 5 writes UTF-16), all in the legacy encoding of
    another script that its first bytes read in (`_legacy_encoding_of_another_script`: a Russian file in cp1251,
    whose lines alone may be too short to tell the script by), else each line by `_decoded`."""
    with _opened(path) as binary:
        start = binary.peek(UTF16_SNIFF_BYTES)
        whole = marked_encoding(start[:4]) or _legacy_encoding_of_another_script(start)
        if whole is not None:
            yield from enumerate(io.TextIOWrapper(binary, whole, errors="replace", newline="\n"), start=1)
        else:
            yield from enumerate(map(_decoded, binary), start=1)


@contextmanager
def _opened(path: Path) -> Iterator[BinaryIO]:
    """`compression.opened`, a damaged compressed file raised as the DataSourceError naming it."""
    try:
        with opened(path) as binary:
            yield binary
    except DamagedCompressedFile as error:
        raise DataSourceError(str(error)) from None


def _parsed_json(text: str, where: str) -> Any:
    """The JSON value of `text`, found at `where`; a DataSourceError naming it when the text is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataSourceError(f"{where}: not valid JSON ({json_error_reason(error)})") from None
    except ValueError as error:  # an integer longer than Python converts (sys.get_int_max_str_digits, 4300 digits)
        raise DataSourceError(f"{where}: a JSON number too long to read ({error})") from None
    except RecursionError:  # arrays or objects nested deeper than the interpreter's recursion limit (~1000)
        raise DataSourceError(f"{where}: JSON nested too deeply to read (~1000 levels of arrays or objects)") from None


def _json_object(value: Any, where: str, field: str) -> dict[str, Any]:
    """`value`, a JSON Lines file's line or a JSON array's item at `where`, when it is an object; an error for any
    other value names the text `field` it should hold (an array of chat messages, the conversation's form)."""
    if is_chat_messages(value):
        raise DataSourceError(f"{where}: {CHAT_MESSAGES_NO_OBJECT.format(f'an object with a {field!r} field')}")
    if not isinstance(value, dict):
        raise DataSourceError(
            f"{where}: a JSON {_JSON_TYPES.get(type(value), 'value')}, not an object with a {field!r} field (JSON "
            "Lines holds one object per line; a JSON array, one object per item)"
        )
    return value


def _documents_from_batches(
    batches: Iterator[pa.RecordBatch],
    column: str,
    origin: Path,
    null_texts: Counter[str] | None,
    id_column: str | None = None,
) -> Iterator[Document]:
    """The rows of `origin`'s record batches as documents, ids from `id_column` where given and not null, else
    `file:row`, rows counted from 1 as a JSON Lines file's lines are; a null text is skipped, and counted in
    `null_texts`; a binary one is decoded as a text file is (`_decoded`: a legacy 8-bit value as Windows-1252)."""
    row, name = 1, _as_text(origin.name)
    for batch in batches:
        _refuse_a_missing_column(origin, batch.schema.names, column, id_column)
        ids = batch.column(id_column).to_pylist() if id_column else [None] * batch.num_rows
        for value, given_id in zip(batch.column(column).to_pylist(), ids, strict=True):
            text = _decoded(value) if isinstance(value, bytes) else value
            if text is None:
                if null_texts is not None:
                    null_texts[name] += 1
            elif not isinstance(text, str):
                raise DataSourceError(f"{origin}: row {row} of column {column!r} is {type(text).__name__}, not text")
            else:
                yield Document(_row_id(given_id, f"{name}:{row}"), text, name)
            row += 1


def _refuse_a_missing_column(origin: Path, names: list[str], column: str, id_column: str | None) -> None:
    """A MissingTextField when a table (`origin`, of columns `names`) has no text `column`, a DataSourceError when it
    has no `id_column` (when one is asked for), each naming the options that name another."""
    if column not in names:
        raise MissingTextField(f"{origin}: no column {column!r}; columns are {names}")
    if id_column is not None and id_column not in names:
        raise DataSourceError(
            f"{origin}: no column {id_column!r}; columns are {names}; name the ids' column with --id-field NAME, or "
            "leave it out for ids file:row"
        )


def _row_id(given: Any, fallback: str) -> str:
    """A row's id: the value of its id field or column as text (bytes decoded; a boolean, array or object written as
    JSON writes it, `true`, not Python's `True`), `fallback` where it has none (none, or only white space)."""
    if given is None or isinstance(given, str | bytes) and not given.strip():
        return fallback
    if isinstance(given, bool | list | dict):
        return json.dumps(given, ensure_ascii=False)
    return _decoded(given) if isinstance(given, bytes) else str(given)


def read_csv(
    path: str | Path, column: str = "text", id_field: str | None = None, null_texts: Counter[str] | None = None
) -> Iterator[Document]:
    """Rows of a CSV file (tab-separated when its suffix is `.tsv`; decompressed as `_opened` reads it), text in
    `column`, streamed by blocks; ids are column `id_field`'s or `file:row`, the header not counted (`posts.csv:1` is
    the first row under it). Quoted values may hold line breaks; the text column is read as bytes, whatever it holds,
    and decoded as a text file is (Excel's CSV is Windows-1252); the other columns are not checked. A file opening
    with UTF-16's byte-order mark (Excel's "Unicode Text" export) is read as UTF-16, and one with UTF-32's as UTF-32."""
    path = Path(path)
    delimiter = "\t" if source_kind(path) == ".tsv" else ","
    file_format = "TSV" if delimiter == "\t" else "CSV"
    with _arrow_errors_named(path, file_format), _opened(path) as binary:
        start = binary.peek(UTF16_SNIFF_BYTES)  # Excel's "Unicode Text" (UTF-16 TSV), and its CSV (Windows-1252)
        encoding = marked_encoding(start[:4]) or _legacy_encoding_of_a_table(start) or "utf8"
        _refuse_another_separator(path, _header(start, encoding, delimiter), column, delimiter)  # before pyarrow's
        try:
            reader = pyarrow.csv.open_csv(
                binary,
                read_options=pyarrow.csv.ReadOptions(block_size=CSV_BLOCK_BYTES, encoding=encoding),
                parse_options=pyarrow.csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pyarrow.csv.ConvertOptions(column_types={column: pa.binary()}, check_utf8=False),
            )
            yield from _documents_from_batches(iter(reader), column, path, null_texts, id_field)
        except pa.ArrowInvalid:  # pyarrow names no row where values may hold line breaks: found by Python's csv
            unlike = _first_row_unlike_its_header(path, encoding, delimiter)
            if unlike is None:
                raise
            raise DataSourceError(f"{path}: cannot be read as {file_format}: {unlike}") from None
    # pyarrow reads a quote no quote closes as a value to the end of the file, the rows after it in it (pandas,
    # whose reader datasets uses, refuses it: "EOF inside string"); Python's csv, strict, tells it (a pipe is read once)
    if not path.is_fifo() and (open_quote := _quote_left_open(path, encoding, delimiter)) is not None:
        raise DataSourceError(f"{path}: cannot be read as {file_format}: {open_quote}")


def _header(start: bytes, encoding: str, delimiter: str) -> list[str]:
    """The names in the header of a CSV or TSV file whose first bytes are `start` (read from the stream pyarrow reads
    next, so a named pipe is read once), its first row past blank lines, as pyarrow reads them (no byte-order mark);
    [] for none, or where Python's csv cannot read it. A header longer than `start` is cut: no name then matches."""
    text = start.decode(encoding, errors="replace")
    try:
        names = next((row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row), [])
    except csv.Error:
        return []
    return [names[0].removeprefix("\ufeff"), *names[1:]] if names else []


def _refuse_another_separator(path: Path, names: list[str], column: str, delimiter: str) -> None:
    """A DataSourceError when a table's header is one column that another separator would cut into names, the text
    `column` among them: a CSV file of `id;text` (Excel's, where a comma is the decimal mark), a .tsv of commas."""
    if column in names or len(names) != 1:
        return
    named = {",": "commas", "\t": "tabs", ";": "semicolons", "|": "'|'"}
    other = next((sep for sep in named if column in names[0].split(sep) and sep != delimiter), None)
    if other is None:
        return
    file_format = "TSV" if delimiter == "\t" else "CSV"
    renamed = {",": ", or name it .csv", "\t": ", or name it .tsv"}.get(other, "")
    excel = " (Excel writes semicolons where a comma is the decimal mark)" if other == ";" else ""
    raise DataSourceError(
        f"{path}: its header {names[0]!r} is one column, its names separated by {named[other]}{excel}, where "
        f"{file_format} separates them by {named[delimiter]}: save the file with {named[delimiter]}{renamed}"
    )


@contextmanager
def _csv_values_of_a_block() -> Iterator[None]:
    """Python's csv reads values up to CSV_BLOCK_BYTES meanwhile, as pyarrow does, to tell a row unlike its header or
    a quote left open (its default limit, 128 KB, would stop both at the first longer document, unsaid); then the
    limit, process-wide, is as it was for its user's own csv reading. One thread at a time: another's restoring it
    would stop this reading at a long value, and leave it raised."""
    with _CSV_LIMIT_RAISED:
        previous = csv.field_size_limit(CSV_BLOCK_BYTES)
        try:
            yield
        finally:
            csv.field_size_limit(previous)


def _first_row_unlike_its_header(path: Path, encoding: str, delimiter: str) -> str | None:
    """Where the first row of a CSV or TSV file holding more or fewer values than its header is, what it holds and how
    to mend it: `row 2 (line 3) holds 3 values, its header 2: '2,"a","b"'; quote ...` (a row of fewer values is shown
    with the empty values it lacks), rows counted as ids count them (the header and blank lines not); None when every
    row matches its header (or Python's csv cannot read the file either)."""
    try:
        with (
            _csv_values_of_a_block(),
            _opened(path) as binary,
            io.TextIOWrapper(binary, encoding=encoding, errors="replace", newline="") as text,
        ):
            rows = csv.reader(text, delimiter=delimiter)
            header, number = next((row for row in rows if row), []), 0  # past blank lines, as pyarrow reads it
            while (row := next(rows, None)) is not None:
                first_line = rows.line_num - sum(value.count("\n") for value in row)  # less a quoted value's breaks
                number += bool(row)  # a blank line is no row
                if row and len(row) != len(header):
                    found = f"row {number} (line {first_line}) holds {counted(len(row), 'value')}, its header "
                    found += f"{len(header)}: {delimiter.join(row)[:200]!r}"
                    separator = "tab" if delimiter == "\t" else "comma"
                    if len(row) < len(header):  # a value left out, not one split at its separator: no quote mends it
                        padded = delimiter.join(row + [""] * (len(header) - len(row)))
                        return (
                            f"{found}; give the row the header's {len(header)} values, an empty one as nothing after "
                            f"its {separator}: {padded[:200]!r}"
                        )
                    return f"{found}; quote a value that holds a {separator}, or give each row the header's columns"
    except csv.Error:  # a value longer than a CSV block, or a quote it cannot close
        return None
    return None


def _quote_left_open(path: Path, encoding: str, delimiter: str) -> str | None:
    """Where the quoted value that no quote closes opens in a CSV or TSV file, the file's end inside it, and how to
    mend it, rows counted as ids count them; None when every quoted value is closed (or Python's csv, strict, stops
    first at a quote pyarrow reads leniently, `"a"b`)."""
    with (
        _csv_values_of_a_block(),
        _opened(path) as binary,
        io.TextIOWrapper(binary, encoding=encoding, errors="replace", newline="") as text,
    ):
        rows = csv.reader(text, delimiter=delimiter, strict=True)
        number, next_line = 0, 1
        try:
            next((row for row in rows if row), None)  # the header, past blank lines, as pyarrow reads it
            next_line = rows.line_num + 1
            for row in rows:
                number, next_line = number + bool(row), rows.line_num + 1
        except csv.Error as error:
            if str(error) != "unexpected end of data":
                return None
            return (
                f"row {number + 1} (line {next_line}) opens a quoted value that no quote closes, which would hold "
                'every row after it; close it, or write a quote inside a value twice ("")'
            )
    return None


def _legacy_encoding_of_a_table(start: bytes) -> str | None:
    """The encoding of a CSV file whose first bytes (`start`) are no UTF-8, as a text file of them is read: a legacy
    encoding of another script's (`_legacy_encoding_of_another_script`: a Russian export in cp1251), or Windows-1252
    when no byte above 127 starts a UTF-8 character (Excel's CSV); its header, ids and text are all read in it (each
    value alone is too short to tell Cyrillic by). None for UTF-8, whose stray bytes are read value by value."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(start, final=False)  # not final: `start` may cut a character
    except UnicodeDecodeError:
        return _encoding_of_no_utf8(start)
    return None


def read_parquet(
    path: str | Path,
    column: str = "text",
    id_field: str | None = None,
    batch_size: int = 1024,
    null_texts: Counter[str] | None = None,
) -> Iterator[Document]:
    """Rows of a Parquet file, text in `column`, streamed by record batches; ids are column `id_field`'s or
    `file:row`. Rows whose text is null are skipped, and counted under the file's name in `null_texts`."""
    path = Path(path)
    with _arrow_errors_named(path, "Parquet"):
        parquet = pq.ParquetFile(path)
        _refuse_a_missing_column(path, parquet.schema_arrow.names, column, id_field)
        columns = [column, id_field] if id_field else [column]
        batches = parquet.iter_batches(batch_size=batch_size, columns=columns)
        yield from _documents_from_batches(batches, column, path, null_texts, id_field)


@contextmanager
def _arrow_errors_named(path: Path, file_format: str) -> Iterator[None]:
    """pyarrow's errors reading `path` (a damaged file, or one of another format) as DataSourceErrors naming it."""
    try:
        yield
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:  # the last: a column's name or value in CSV
        raise DataSourceError(f"{path}: cannot be read as {file_format} ({error})") from None


def is_saved_dataset(folder: Path) -> bool:
    """True for a folder written by `datasets.Dataset.save_to_disk`."""
    return folder.is_dir() and (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def refuse_a_saved_dataset_dict(folder: Path) -> None:
    """DataSourceError naming the split folders to give instead, for a folder written by
    `datasets.DatasetDict.save_to_disk` (`dataset_dict.json` and a saved dataset per split): which splits are
    training text is the user's call (a `test` split read into the corpus would be trained on)."""
    if not (folder / "dataset_dict.json").is_file():
        return
    splits = sorted(entry for entry in folder.iterdir() if is_saved_dataset(entry))
    raise DataSourceError(
        f"{folder}: a DatasetDict saved by save_to_disk, with splits {', '.join(split.name for split in splits)}; "
        f"give the splits to read as inputs ({' '.join(map(str, splits))})"
    )


def read_saved_dataset(
    folder: str | Path, column: str = "text", id_field: str | None = None, null_texts: Counter[str] | None = None
) -> Iterator[Document]:
    """Rows of a `save_to_disk` dataset, read from its Arrow stream files without the `datasets` library; rows whose
    text is null are skipped, and counted under their Arrow file's name in `null_texts`."""
    folder = Path(folder)
    if not is_saved_dataset(folder):
        raise DataSourceError(f"{folder}: not a saved dataset (expected state.json and dataset_info.json)")
    state_file = folder / "state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        names = [str(entry["filename"]) for entry in state.get("_data_files", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, or not {"_data_files": [...]}
        raise DataSourceError(
            f"{state_file}: not the state file save_to_disk writes ({type(error).__name__}: {error}); save the "
            "dataset again"
        ) from None
    arrow_files = [folder / name for name in names] or sorted(folder.glob("*.arrow"))
    if not arrow_files:
        raise DataSourceError(f"{folder}: state.json lists no data files and the folder has no .arrow files")
    for arrow_file in arrow_files:
        if not arrow_file.is_file():
            raise DataSourceError(f"{folder / 'state.json'}: lists {arrow_file.name}, which does not exist")
        yield from read_arrow(arrow_file, column, id_field, null_texts)


def read_arrow(
    path: str | Path, column: str = "text", id_field: str | None = None, null_texts: Counter[str] | None = None
) -> Iterator[Document]:
    """Rows of an Arrow IPC file, memory-mapped and read by record batches, text in `column`; ids are column
    `id_field`'s or `file:row`: the stream format that `datasets` writes its cache and `save_to_disk` files in
    (`data-00000-of-00001.arrow`, which `load_dataset("arrow", data_files=...)` reads), or Arrow's file format (opening
    with `ARROW1`). Rows whose text is null are skipped, and counted under the file's name in `null_texts`."""
    path = Path(path)
    with _arrow_errors_named(path, "an Arrow stream or file"), pa.memory_map(str(path)) as mapped:
        if mapped.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(mapped)
            batches = (reader.get_batch(number) for number in range(reader.num_record_batches))
        else:
            mapped.seek(0)
            batches = iter(pa.ipc.open_stream(mapped))
        yield from _documents_from_batches(batches, column, path, null_texts, id_field)


def read_stdlib() -> Iterator[Document]:
    """The default corpus: the running interpreter's standard-library `.py` files, tests and IDLE left out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for doc_id, text, _ in read_text_folder(stdlib, (".py",), STDLIB_SKIPPED_DIRS):
        yield Document(doc_id, text, "stdlib")


def expanded_inputs(specs: list[str]) -> list[str]:
    """The inputs a command line names, a glob pattern no shell expanded (quoted, `'data/*.jsonl'`, or in a program's
    argument list, as datasets' data_files and datatrove's glob_pattern take one) replaced by the paths it matches,
    sorted, but for those inside a folder it matches (`'docs/**'` matches docs/, its subfolders and their files: the
    folder is read whole, each file once); a path that exists is taken as named, and a pattern that matches nothing
    is refused, and so is a URL (datatrove's and datasets' `hf://`, `s3://`, `https://`): nothing is downloaded."""
    expanded = []
    for spec in specs:
        refused = url_refusal(spec)
        if refused is not None:
            raise DataSourceError(refused)
        if str(spec) == "stdlib" or Path(spec).exists() or not glob.has_magic(spec):
            expanded.append(spec)
            continue
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise DataSourceError(f"{spec}: no file or folder matches this pattern")
        folders = {Path(match) for match in matches if Path(match).is_dir()}
        expanded += [match for match in matches if folders.isdisjoint(Path(match).parents)]
    refuse_inputs_read_twice(expanded)
    return expanded


def refuse_inputs_read_twice(inputs: list[str]) -> None:
    """DataSourceError when two of `inputs` name the same file or folder (`raw/` and `raw`), or one lies inside a
    folder another names: its documents would be read twice, every copy but the first removed as an exact duplicate."""
    seen: dict[Path, str] = {}
    holding: dict[Path, str] = {}  # each folder above an input seen, and that input: a glob's thousands, not pairs
    for spec in inputs:
        if spec != "stdlib" and not Path(spec).exists():  # refused by open_source, naming it
            continue
        path = Path(spec) if spec == "stdlib" else Path(spec).expanduser().resolve()
        if path in seen:
            raise DataSourceError(
                f"{seen[path]} and {spec} name the same input ({path}): its documents would be read twice; give it once"
            )
        outer = next((seen[folder] for folder in path.parents if folder in seen), None)
        if outer is not None or path in holding:
            inner, outer = (spec, outer) if outer is not None else (holding[path], spec)
            raise DataSourceError(
                f"{inner} is inside the folder {outer}, also given: its documents would be read twice; give one of them"
            )
        seen[path] = spec
        holding.update(dict.fromkeys(path.parents, spec))


# The row formats read by seeking in the file (Parquet's footer, memory-mapped Arrow), by suffix: name and reader
_READ_BY_SEEKING = {".parquet": ("a Parquet", read_parquet), ".arrow": ("an Arrow", read_arrow)}


def refuse_row_options_without_rows(sources: list[Iterable[Document]], field: str, id_field: str | None) -> None:
    """DataSourceError when --field (other than `text`) or --id-field is given and no source holds rows (`Rows`): a
    folder, a text file or `stdlib` is read whole, file by file, so the option would be passed over unsaid (a folder
    given where its JSONL shards were meant)."""
    given = [f"--field {field}"] * (field != "text") + [f"--id-field {id_field}"] * (id_field is not None)
    if given and not any(isinstance(source, Rows) for source in sources):
        raise DataSourceError(
            f"{' and '.join(given)} {'name' if len(given) > 1 else 'names'} a field or column of rows, and no input "
            "holds rows: folders, text files and stdlib are read whole, a document a file, named by its path. Give "
            "the .jsonl, .json, .parquet, .csv, .tsv or .arrow files themselves (a folder's as FOLDER/*.jsonl) or a "
            "saved dataset, or leave the option out"
        )


def open_source(
    spec: str | Path, field: str = "text", id_field: str | None = None, rows_field: str | None = None
) -> Iterable[Document]:
    """The source a command-line argument names: `stdlib`, a saved dataset, a folder (a `TextFolder`), `.jsonl`,
    `.json`, `.parquet`, `.csv`, `.tsv`, `.arrow` (`Rows`, ids from `id_field` where given; a JSON file's rows under
    the key `rows_field`, where given, which no other source has), a file or a named pipe; a saved DatasetDict is
    refused, naming its splits' folders, and so is a Parquet or Arrow file compressed whole."""
    path = Path(spec)
    if rows_field is not None and (
        str(spec) == "stdlib" or path.is_dir() or source_kind(path) not in (".json", ".jsonl")
    ):
        raise DataSourceError(
            f"{spec}: --rows-field {rows_field} reads the rows a .json or .jsonl file holds under a key; give this "
            "input in another build, without it"
        )
    if str(spec) == "stdlib":
        return read_stdlib()
    if is_saved_dataset(path):
        return Rows(read_saved_dataset, path, field, id_field)
    refuse_a_saved_dataset_dict(path)
    if path.is_dir():
        return TextFolder(path)
    if not (path.is_file() or path.is_fifo()):  # a pipe given by name is read: its writer is the user's
        raise DataSourceError(f"{path}: no such file or folder (or use 'stdlib' for the default corpus)")
    if rows_field is not None:
        return Rows(functools.partial(read_json, rows_field=rows_field), path, field, id_field)
    if source_kind(path) == ".jsonl":
        return Rows(read_jsonl, path, field, id_field)
    if source_kind(path) == ".json":
        return Rows(read_json, path, field, id_field)
    if source_kind(path) in (".csv", ".tsv"):
        return Rows(read_csv, path, field, id_field)
    if source_kind(path) in _READ_BY_SEEKING:
        if path.suffix.lower() in COMPRESSIONS:  # no decompressing stream seeks
            raise DataSourceError(
                f"{path}: {_READ_BY_SEEKING[source_kind(path)][0]} file compressed whole, which is read by seeking "
                f"in it (its columns may be compressed within it); decompress it to {uncompressed(path).name} and "
                "give that"
            )
        return Rows(_READ_BY_SEEKING[source_kind(path)][1], path, field, id_field)
    return read_text_file(path)


def open_sources(
    *inputs: list[str], field: str = "text", id_field: str | None = None, rows_field: str | None = None
) -> list[list[Iterable[Document]]]:
    """The sources of each list of command-line inputs (`expanded_inputs`, then `open_source` for each), refused
    together, before any is read, when --field or --id-field names rows none of them holds
    (`refuse_row_options_without_rows`): one list of sources for each list given."""
    opened = [[open_source(spec, field, id_field, rows_field) for spec in expanded_inputs(specs)] for specs in inputs]
    refuse_row_options_without_rows([source for sources in opened for source in sources], field, id_field)
    return opened
