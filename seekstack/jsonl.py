"""JSON Lines files read line by line, each error naming the file and line at fault."""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from seekstack.compression import opened

# The magic bytes opening a Parquet file, an Arrow IPC file, and an Arrow IPC stream (its first message's continuation
# marker): the stream is what datasets' save_to_disk and its cache write (data-00000-of-00001.arrow).
TABLE_FILES = {b"PAR1": "parquet", b"ARROW1": "arrow", b"\xff\xff\xff\xff": "arrow"}


def jsonl_records(path: str | Path, on_torn_tail: Callable[[str], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON value) of each non-blank line of `path` (a UTF-8 byte order mark opening it is
    skipped; a name ending in .gz, .bz2, .xz or .zst, in any case, is read through its compression, as datasets' JSON
    loader reads it); a ValueError naming `path:line` for a line that is not UTF-8 or not JSON, one naming `path` when
    it does not decompress, is mostly not UTF-8 (most lines holding non-ASCII bytes: GBK or Latin-1), is UTF-16 or
    UTF-32 text (Windows PowerShell's Out-File and `>` write UTF-16) or a Parquet or Arrow file (a Hub dataset's). A
    file that starts a JSON array (`json.dump(records, f)`, on one line or many, blank lines before it or not) is read
    whole, as TRL and datasets' JSON loader read it: its items, each numbered by the line it starts on
    (`_array_items`). With `on_torn_tail`, a last line that is neither and has no newline (what a process stopped
    while appending it leaves) is skipped, and `on_torn_tail` is told why."""
    with opened(path) as lines:
        opening = True  # no value read yet: a JSON array may open the file after blank lines, as json.loads reads it
        for number, raw in enumerate(lines, start=1):
            torn = on_torn_tail is not None and not raw.endswith(b"\n")  # only the last line can lack one
            marked = marked_encoding(raw) if number == 1 else None
            wide = marked or (_unmarked_wide_encoding(raw) if number == 1 else None)
            if wide:  # no line of it is UTF-8
                encoding = wide.upper().replace("-LE", "LE").replace("-BE", "BE")  # iconv's names: UTF-16LE
                told = "its byte order mark opens it" if marked else "no byte order mark: its NUL bytes say so"
                raise ValueError(
                    f"{path}: {encoding} text ({told}), not UTF-8 as JSON Lines is: save it as UTF-8 (iconv -f "
                    f"{encoding} -t UTF-8, or PowerShell's Out-File -Encoding utf8)"
                )
            table = next((name for magic, name in TABLE_FILES.items() if number == 1 and raw.startswith(magic)), None)
            if table:  # a Hub dataset's files, as downloaded: binary, no line of it is text
                stem, kind = Path(path).name.split(".")[0], "an Arrow" if table == "arrow" else "a Parquet"
                raise ValueError(
                    f"{path}: {kind} file (its magic bytes open it), not JSON Lines: write its rows as "
                    f'JSON Lines first, with datasets: load_dataset("{table}", data_files="{path}", split="train")'
                    f'.to_json("{stem}.jsonl")'
                )
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                if opening and line.lstrip().startswith("["):  # on one line or over several: its items are the records
                    yield from _array_items(path)
                    return
                if line.strip():
                    value = json.loads(line.rstrip("\r\n"))  # its newline no part of it: an error's column is on it
                    opening = False
                    yield number, value
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                what = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else "not valid JSON"
                reason = (
                    f"{error.reason} at byte {error.start}"
                    if isinstance(error, UnicodeDecodeError)
                    else json_error_reason(error)
                )
                if torn:
                    on_torn_tail(f"{path}:{number}: dropped the last line, cut short ({reason}) by a stopped run")
                    return
                if isinstance(error, UnicodeDecodeError):
                    undecodable, non_ascii = _lines_not_utf8(path, number)
                    if 2 * undecodable > non_ascii > 1:  # most, not one bad line: a file saved as GBK or Latin-1
                        raise ValueError(
                            f"{path}: not UTF-8 text, as JSON Lines is: {undecodable} of its {non_ascii} lines holding "
                            f"non-ASCII bytes are not, the first being line {number} ({reason}); it was saved in "
                            "another encoding: convert it to UTF-8 (iconv -f GBK -t UTF-8 for Chinese text, -f LATIN1 "
                            "for Western European)"
                        ) from None
                raise ValueError(f"{path}:{number}: {what} ({reason}); mend or delete that line") from None


def marked_encoding(start: bytes) -> str | None:
    """`utf-32` or `utf-16` for text that opens (`start`, its first 4 bytes or more) with that encoding's byte-order
    mark, as Windows PowerShell 5 and Excel write UTF-16 and Python's `encoding="utf-32"` writes UTF-32 (its
    little-endian mark opens with UTF-16's: asked first); else None."""
    if start.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _unmarked_wide_encoding(start: bytes) -> str | None:
    """`utf-16-le`, `utf-16-be`, `utf-32-le` or `utf-32-be` for a line of JSON saved so without a byte order mark
    (`start`, its first 4 bytes or more): JSON opens with `{` or `[`, whose NUL bytes tell the encoding as
    `json.detect_encoding` reads them (RFC 4627's rule); None for other bytes (a binary file opening with NULs)."""
    encoding = json.detect_encoding(start)
    if encoding.startswith("utf-8"):
        return None
    opening = start[:4].decode(encoding, errors="replace")
    return encoding if opening[:1] in ("{", "[") else None


def json_error_reason(error: json.JSONDecodeError) -> str:
    """json's message for `error` with where in the text it is: "Unterminated string starting at column 10",
    "Expecting ',' delimiter at line 2 column 1" (the line only past the first); its msg alone says no where, and
    reads "Unterminated string starting at" for a line cut short."""
    at = f"line {error.lineno} column {error.colno}" if error.lineno > 1 else f"column {error.colno}"
    return f"{error.msg.removesuffix(' at')} at {at}"


def _lines_not_utf8(path: str | Path, first: int) -> tuple[int, int]:
    """(lines that are not UTF-8, lines holding bytes other than ASCII) of `path` up to 100,000 lines past line
    `first`, the first that is not UTF-8 (a file may turn to another encoding past its first 100,000 lines)."""
    undecodable = non_ascii = 0
    with opened(path) as lines:
        for raw in itertools.islice(lines, first + 100_000):
            if not raw.isascii():
                non_ascii += 1
                try:
                    raw.decode("utf-8-sig")
                except UnicodeDecodeError:
                    undecodable += 1
    return undecodable, non_ascii


CHAT_MESSAGES_NO_OBJECT = (
    'a JSON array of chat messages, not {}: a conversation is one object, {{"messages": [...]}}, which `sft` and '
    "`lora train` read"
)


def is_chat_messages(value: Any) -> bool:
    """Whether `value` is a JSON array of chat messages (objects with a role): a conversation written without the
    object that holds it, which a JSON Lines line or a JSON array's item is."""
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) and "role" in item for item in value)


def _array_items(path: str | Path) -> list[tuple[int, Any]]:
    """(line it starts on, item) of each item of the JSON array `path` holds; a ValueError (no subclass:
    `jsonl_records` catches those of a line) naming `path` when it is not UTF-8 or not valid JSON, when more JSON
    follows the array, or when the array is one conversation's bare messages (no array of records, as JSON Lines of
    such arrays are none). The file is read whole and its items decoded before any is handed on, as TRL's and
    datasets' JSON loaders read an array's file: fine for SFT's conversations (hundreds of MB at most); a larger set
    streams as JSON Lines, a line at a time."""
    try:
        with opened(path) as binary:
            text = binary.read().decode("utf-8-sig")  # its bytes not held beside it
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: a JSON array that is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    try:
        items, end = _decoded_array(text)
    except json.JSONDecodeError as fault:
        raise ValueError(
            f"{path}: a JSON array that is not valid JSON ({json_error_reason(_as_json_says_it(text, fault))})"
        ) from None
    if is_chat_messages([item for _, item in items]):  # as data build tells it
        line = text.count("\n", 0, text.index("[")) + 1
        raise ValueError(f"{path}:{line}: {CHAT_MESSAGES_NO_OBJECT.format('an object')}")
    more = _WHITESPACE.match(text, end).end()
    if more < len(text):  # a whole array, then more: JSON Lines whose lines are arrays
        line = text.count("\n", 0, more) + 1
        raise ValueError(
            f"{path}:{line}: more JSON after the array that opens the file: a file holds one JSON array of objects, or "
            'JSON Lines, one object a line ({"messages": [...]}), and a line that is an array is neither'
        )
    return items


def _as_json_says_it(text: str, fault: json.JSONDecodeError) -> json.JSONDecodeError:
    """The error json.loads raises for `text`, which `fault` found not valid JSON: its message and place as this
    Python's json says them (3.13's names a trailing comma at the comma, 3.11's expects a value after it)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        return error
    return fault


def _decoded_array(text: str) -> tuple[list[tuple[int, Any]], int]:
    """((line it starts on, item) of each item, the index past its "]") of the JSON array opening `text`, decoded
    once; a JSONDecodeError where the array is not valid JSON."""
    decoder, items = json.JSONDecoder(), []
    position = _WHITESPACE.match(text).end()
    if not text.startswith("[", position):
        raise json.JSONDecodeError("Expecting value", text, position)
    position = _WHITESPACE.match(text, position + 1).end()
    if text.startswith("]", position):
        return items, position + 1
    line, counted = 1, 0
    while True:
        line, counted = line + text.count("\n", counted, position), position
        item, position = decoder.raw_decode(text, position)
        items.append((line, item))
        position = _WHITESPACE.match(text, position).end()
        if text.startswith("]", position):
            return items, position + 1
        if not text.startswith(",", position):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
        position = _WHITESPACE.match(text, position + 1).end()


_WHITESPACE = re.compile(r"[ \t\r\n]*")  # JSON's whitespace
