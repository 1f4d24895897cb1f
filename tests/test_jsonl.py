import json

from seekstack.jsonl import jsonl_records

RECORDS = [{"messages": [{"role": "user", "content": "q"}]}, {"step": 2}]


def test_a_byte_order_mark_opening_the_file_is_skipped(tmp_path):
    """Windows editors save UTF-8 with a BOM; datasets' JSON loader reads such files too."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in RECORDS).encode())
    assert list(jsonl_records(path)) == [(1, RECORDS[0]), (2, RECORDS[1])]
