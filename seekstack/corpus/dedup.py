"""Exact deduplication by content hash and near-duplicate removal by MinHash LSH; the first occurrence is kept."""

from __future__ import annotations

import hashlib

from datasketch import MinHash, MinHashLSH

SHINGLE_WORDS = 5


def content_hash(text: str) -> str:
    """SHA-256 hex digest of the (normalised) text: the document's identity for exact dedup and the split."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ExactDeduplicator:
    """Remembers content hashes; a document whose hash was seen before is a duplicate."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def is_duplicate(self, digest: str) -> bool:
        """True when `digest` was seen before; otherwise it is recorded and False is returned."""
        if digest in self.seen:
            return True
        self.seen.add(digest)
        return False


def word_shingles(text: str, size: int = SHINGLE_WORDS) -> set[bytes]:
    """The set of lower-cased word `size`-grams of the text (the whole text when it has fewer words)."""
    words = text.lower().split()
    if len(words) < size:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


class NearDeduplicator:
    """MinHash LSH over word 5-gram shingles: a document whose estimated Jaccard similarity to a kept one
    is above `threshold` is a near duplicate (Broder 1997; as in the Gopher and FineWeb pipelines)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128) -> None:
        self.num_perm = num_perm
        self.index = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def is_duplicate(self, key: str, text: str) -> bool:
        """True when `text` nearly duplicates a document indexed before; otherwise it is indexed under `key`."""
        signature = MinHash(num_perm=self.num_perm, seed=1)
        signature.update_batch(list(word_shingles(text)))
        if self.index.query(signature):
            return True
        self.index.insert(key, signature)
        return False
