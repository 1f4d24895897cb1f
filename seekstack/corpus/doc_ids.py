"""Document ids unique within a corpus, though its inputs may hold same-named files.

A source names a document by its path within an input folder (`notes.txt`) or by file and line (`data.jsonl:1`), so
`data build a/ b/` finds `notes.txt` in both folders. Every row, every report example and the dedup's `of` must name
one document, so a later document whose id is taken gets `{id}#2` (`#3`, ...), the first free one; an id nothing
else took stays as it is, so a corpus built before keeps its ids. The row's `source` says which input it came from.
"""

from __future__ import annotations


class UniqueIds:
    """Hands out each document's id in input order, renamed `{id}#N` when an earlier document took it. Memory: every
    id handed out."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.next_copy: dict[str, int] = {}  # id -> the N its next namesake tries first

    def claim(self, doc_id: str) -> str:
        """`doc_id` when no earlier document took it, else the first `{doc_id}#N` (N from 2) that none did."""
        unique = doc_id
        while unique in self.taken:
            copy = self.next_copy.get(doc_id, 2)
            self.next_copy[doc_id] = copy + 1
            unique = f"{doc_id}#{copy}"
        self.taken.add(unique)
        return unique
