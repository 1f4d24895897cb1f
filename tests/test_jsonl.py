import bz2
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.feather
import pyarrow.ipc
import pyarrow.parquet
import pytest

from seekstack.jsonl import json_error_reason, jsonl_records

RECORDS = [{"messages": [{"role": "user", "content": "q"}]}, {"step": 2}]


def test_a_byte_order_mark_opening_the_file_is_skipped(tmp_path):
    """Windows editors save UTF-8 with a BOM; datasets' JSON loader reads such files too."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in RECORDS).encode())
    assert list(jsonl_records(path)) == [(1, RECORDS[0]), (2, RECORDS[1])]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"])
def test_a_utf16_or_utf32_file_is_refused_as_such_not_as_a_line_to_mend(tmp_path, encoding):
    """What Windows PowerShell's Out-File and `>` write (was: 'chats.jsonl:1: not UTF-8 text (invalid start byte at
    byte 0); mend or delete that line', though every line is UTF-16); datasets' JSON loader reads UTF-8 alone too.
    Python's encoding="utf-32" opens with a mark that opens with UTF-16's little-endian one: it was called UTF-16."""
    path = tmp_path / "chats.jsonl"
    marks = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-32-be": b"\x00\x00\xfe\xff"}  # others write one
    path.write_bytes(marks.get(encoding, b"") + "".join(json.dumps(r) + "\n" for r in RECORDS).encode(encoding))
    named = encoding[:6].upper()
    with pytest.raises(ValueError) as refused:
        list(jsonl_records(path))
    assert str(refused.value) == (
        f"{path}: {named} text (its byte order mark opens it), not UTF-8 as JSON Lines is: save it as UTF-8 (iconv -f "
        f"{named} -t UTF-8, or PowerShell's Out-File -Encoding utf8)"
    )


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_utf16_or_utf32_file_without_its_byte_order_mark_is_refused_as_such_not_as_bad_json(tmp_path, encoding):
    """Saved without the mark (Python's encoding="utf-16-le", a Windows tool's "Unicode"), UTF-16 was refused as
    'chats.jsonl:1: not valid JSON (Expecting property name enclosed in double quotes at column 2); mend or delete that
    line'. A binary file opening with NUL bytes (a token shard) is not called UTF-16."""
    path = tmp_path / "chats.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in RECORDS).encode(encoding))
    named = encoding.upper().replace("-LE", "LE").replace("-BE", "BE")
    with pytest.raises(ValueError) as refused:
        list(jsonl_records(path))
    assert str(refused.value) == (
        f"{path}: {named} text (no byte order mark: its NUL bytes say so), not UTF-8 as JSON Lines is: save it as "
        f"UTF-8 (iconv -f {named} -t UTF-8, or PowerShell's Out-File -Encoding utf8)"
    )
    path.write_bytes(bytes([1, 0, 5, 0, 10, 0]))  # uint16 token ids 1, 5, 10
    with pytest.raises(ValueError, match=r"chats.jsonl:1: not valid JSON"):
        list(jsonl_records(path))


@pytest.mark.parametrize(("encoding", "first"), [("gbk", 1), ("latin-1", 2)])
def test_a_file_saved_as_gbk_or_latin1_is_refused_as_not_utf8_and_one_bad_line_as_that_line(tmp_path, encoding, first):
    """A whole file in GBK or Latin-1 was refused as 'chats.jsonl:1: not UTF-8 text ...; mend or delete that line',
    though no line of it is UTF-8."""
    texts = ["你好", "中文", "ok", "早上好", "再见"] if encoding == "gbk" else ["ok", "café", "über", "naïve", "señor"]
    text = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    path = tmp_path / "chats.jsonl"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(ValueError) as refused:
        list(jsonl_records(path))
    assert str(refused.value).startswith(
        f"{path}: not UTF-8 text, as JSON Lines is: 4 of its 4 lines holding non-ASCII bytes are not, the first being "
        f"line {first} ("
    )
    assert str(refused.value).endswith("(iconv -f GBK -t UTF-8 for Chinese text, -f LATIN1 for Western European)")
    path.write_bytes(text.encode().replace(texts[1].encode(), texts[1].encode(encoding)))  # one line gone wrong
    with pytest.raises(ValueError, match=r"chats.jsonl:2: not UTF-8 text \(.*\); mend or delete that line"):
        list(jsonl_records(path))


def test_a_file_turning_to_gbk_past_its_first_100000_lines_is_refused_as_not_utf8(tmp_path):
    """Only the first 100,000 lines were counted: English lines, then Chinese ones saved as GBK, were refused as
    'chats.jsonl:100001: not UTF-8 text (...); mend or delete that line', as one line gone wrong."""
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' * 100_000 + '{"text": "你好"}\n'.encode("gbk") * 3)
    with pytest.raises(ValueError) as refused:
        list(jsonl_records(path))
    assert str(refused.value).startswith(
        f"{path}: not UTF-8 text, as JSON Lines is: 3 of its 3 lines holding non-ASCII bytes are not, the first being "
        "line 100001 ("
    )


def write_arrow_stream(table: pa.Table, path) -> None:
    """The Arrow IPC stream datasets' save_to_disk writes (data-00000-of-00001.arrow)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize(
    ("write", "kind"),
    [(pa.parquet.write_table, "a Parquet"), (pa.feather.write_feather, "an Arrow"), (write_arrow_stream, "an Arrow")],
)
def test_a_parquet_or_arrow_file_is_refused_saying_how_to_write_it_as_json_lines(tmp_path, write, kind):
    """A Hub dataset's files as downloaded (sft data=train-00000-of-00001.parquet), or as datasets' save_to_disk
    writes them (an Arrow stream), were refused as 'x.parquet:1: not UTF-8 text (invalid start byte at byte ...); mend
    or delete that line'. An Arrow file was called "a Arrow file"."""
    path = tmp_path / "chats.parquet"
    write(pa.Table.from_pylist(RECORDS[:1]), path)
    loader = kind.split()[1].lower()
    with pytest.raises(ValueError) as refused:
        list(jsonl_records(path))
    assert str(refused.value) == (
        f"{path}: {kind} file (its magic bytes open it), not JSON Lines: write its rows as JSON Lines first, with "
        f'datasets: load_dataset("{loader}", data_files="{path}", split="train").to_json("chats.jsonl")'
    )


def test_a_json_array_file_is_read_as_trl_reads_it_each_item_numbered_by_the_line_it_starts_on(tmp_path):
    """`json.dump(records, f)` (indented or not): refused as not JSON Lines, where TRL and datasets read it."""
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(RECORDS, indent=2))  # "[" alone on line 1
    assert list(jsonl_records(path)) == [(2, RECORDS[0]), (10, RECORDS[1])]
    path.write_text("[" + json.dumps(RECORDS[0]) + ",\n" + json.dumps(RECORDS[1]) + "]\n")
    assert list(jsonl_records(path)) == [(1, RECORDS[0]), (2, RECORDS[1])]
    path.write_text(json.dumps(RECORDS))  # on one line
    assert list(jsonl_records(path)) == [(1, RECORDS[0]), (1, RECORDS[1])]
    path.write_text("\n\n" + json.dumps(RECORDS, indent=2))  # blank lines before it, which json.load skips
    assert list(jsonl_records(path)) == [(4, RECORDS[0]), (12, RECORDS[1])]
    path.write_text("\n" + json.dumps(RECORDS))
    assert list(jsonl_records(path)) == [(2, RECORDS[0]), (2, RECORDS[1])]
    path.write_text("[" + json.dumps(RECORDS[0]) + ",\n" + json.dumps(RECORDS[1]) + "\n")  # its "]" lost
    with pytest.raises(ValueError, match=r"chats.json: a JSON array that is not valid JSON \(Expecting ',' delimiter"):
        list(jsonl_records(path))
    path.write_text("".join(json.dumps([record]) + "\n" for record in RECORDS))  # JSON Lines of arrays
    with pytest.raises(ValueError, match=r"chats.json:2: more JSON after the array that opens the file: a file holds"):
        list(jsonl_records(path))
    path.write_text("[1, 2]\n" + json.dumps(RECORDS[1]) + "\n")  # a line holding an array of other values
    with pytest.raises(ValueError, match=r"chats.json:2: more JSON after the array that opens the file: a file holds"):
        list(jsonl_records(path))


@pytest.mark.parametrize("text", ["[1 2]", "[1,,2]", "[1,]", '[{"a": 1}\n{"b": 2}]', "[1, [2", "[\n\n1,\n x]"])
def test_an_array_that_is_not_json_is_refused_where_and_as_json_refuses_it(text, tmp_path):
    """Its items are decoded one at a time, for the line each starts on, and the commas and brackets between them
    checked as json checks them: the same message at the same line and column."""
    path = tmp_path / "chats.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as json_refused:
        json.loads(text)
    with pytest.raises(ValueError) as refused:
        list(jsonl_records(path))
    assert (
        str(refused.value) == f"{path}: a JSON array that is not valid JSON ({json_error_reason(json_refused.value)})"
    )


def test_an_arrays_fault_is_said_as_the_running_pythons_json_says_it(tmp_path, monkeypatch):
    """Python 3.13's json says a trailing comma where 3.11's expects a value after it: the reason given is the
    running json's, not a wording of 3.11's kept beside it (json here worded as 3.13's, at the comma)."""
    loads = json.loads

    def loads_as_python_3_13(text, **kwargs):
        if text.rstrip().endswith(",]"):
            raise json.JSONDecodeError("Illegal trailing comma before end of array", text, text.rindex(","))
        return loads(text, **kwargs)

    monkeypatch.setattr(json, "loads", loads_as_python_3_13)
    path = tmp_path / "chats.json"
    path.write_text('[{"a": 1},]')
    with pytest.raises(ValueError) as refused:
        list(jsonl_records(path))
    assert str(refused.value) == (
        f"{path}: a JSON array that is not valid JSON (Illegal trailing comma before end of array at column 10)"
    )


def test_json_lines_of_bare_chat_message_arrays_are_refused_as_data_build_refuses_them(tmp_path):
    """`sft` said 'FILE:3: more JSON after the array that opens the file ...' where `lora train` on text and data build
    say 'FILE:2: a JSON array of chat messages, not an object with a 'text' field ...' of the same file."""
    path = tmp_path / "chats.jsonl"
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"}]
    path.write_text("\n" + "".join(json.dumps(messages) + "\n" for _ in range(2)))
    with pytest.raises(ValueError) as refused:
        list(jsonl_records(path))
    assert str(refused.value) == (
        f"{path}:2: a JSON array of chat messages, not an object: a conversation is one object, "
        '{"messages": [...]}, which `sft` and `lora train` read'
    )
    # one such array alone, on one line or over several, was read as records, each message one ('a chat message')
    for text in ("\n" + json.dumps(messages) + "\n", "\n" + json.dumps(messages, indent=2)):
        path.write_text(text)
        with pytest.raises(ValueError) as refused:
            list(jsonl_records(path))
        assert str(refused.value).startswith(f"{path}:2: a JSON array of chat messages, not an object: ")


def test_an_array_of_other_values_is_read_item_by_item_on_one_line_as_over_several(tmp_path):
    """`[1, {...}]` on one line was handed on whole (sft: 'expected {"messages": [...]}, got list'), over two lines
    item by item ('got int'): one file to json.load and TRL, answered alike now, its items numbered by their lines."""
    path = tmp_path / "chats.jsonl"
    path.write_text("[1, " + json.dumps(RECORDS[0]) + "]\n")
    assert list(jsonl_records(path)) == [(1, 1), (1, RECORDS[0])]
    path.write_text("[1,\n" + json.dumps(RECORDS[0]) + "]\n")
    assert list(jsonl_records(path)) == [(1, 1), (2, RECORDS[0])]


def test_a_gzipped_file_is_read_through_and_a_broken_one_is_refused_naming_it(tmp_path):
    """As datasets' JSON loader reads it (was: 'chats.jsonl.gz:1: not UTF-8 text ...; mend or delete that line')."""
    path = tmp_path / "chats.JSONL.GZ"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS).encode()))
    assert list(jsonl_records(path)) == [(1, RECORDS[0]), (2, RECORDS[1])]
    path.write_bytes(path.read_bytes()[:-12])  # cut short, as an interrupted download leaves it
    with pytest.raises(ValueError, match=r"chats.JSONL.GZ: not a readable gzip file \(.*\); compress it again"):
        list(jsonl_records(path))
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(json.dumps(RECORDS[0]) + "\n")  # named .gz, never compressed
    with pytest.raises(ValueError, match=r"plain.jsonl.gz: not a readable gzip file \(Not a gzipped file"):
        list(jsonl_records(plain))


def zstd_compress(data: bytes) -> bytes:
    return pa.compress(data, "zstd", asbytes=True)


@pytest.mark.parametrize("suffix", [".bz2", ".xz", ".zst"])
def test_a_bzip2_xz_or_zstd_file_is_read_through_as_data_build_reads_it(tmp_path, suffix):
    """sft, distill, lora train and eval's local tasks read the compressions data build reads (was: '...:1: not UTF-8
    text (invalid start byte at byte 0); mend or delete that line')."""
    lines = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    path = tmp_path / f"chats.jsonl{suffix}"
    compress = {".bz2": bz2.compress, ".xz": lzma.compress, ".zst": zstd_compress}
    path.write_bytes(compress[suffix](lines))
    assert list(jsonl_records(path)) == [(1, RECORDS[0]), (2, RECORDS[1])]
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=rf"chats.jsonl{suffix}: not a readable \w+ file"):
        list(jsonl_records(path))


def test_a_line_that_is_not_json_is_refused_naming_the_column_as_data_build_names_it(tmp_path):
    """A line cut short read "chats.jsonl:2: not valid JSON (Unterminated string starting at); ...", starting
    nowhere; the column is now said, as corpus/sources.py says it, and a torn tail skipped says it too."""
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + '\n{"text": "a" "b"}\n' + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 14\);"):
        list(jsonl_records(path))
    path.write_text(json.dumps(RECORDS[0]) + '\n{"text": "a"\r\n' + json.dumps(RECORDS[1]) + "\n")  # cut mid-file
    with pytest.raises(ValueError, match=r"chats.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 13\);"):
        list(jsonl_records(path))
    path.write_text(json.dumps(RECORDS[0]) + '\n{"text": "cut')
    told = []
    assert list(jsonl_records(path, on_torn_tail=told.append)) == [(1, RECORDS[0])]
    assert told == [
        f"{path}:2: dropped the last line, cut short (Unterminated string starting at column 10) by a stopped run"
    ]
