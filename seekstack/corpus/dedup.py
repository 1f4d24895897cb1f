"""Exact deduplication by content hash and near-duplicate removal by MinHash LSH; the first occurrence is kept.

Near duplicates: a document's shingles are its word 5-grams (`kinds.words`, so in Chinese or Japanese 5 characters;
in Thai, Lao, Tibetan, Myanmar or Khmer 5 x `UNSPACED_WORD_CHARS` characters) of the text as datatrove simplifies
it: lower-cased, each number `0`, punctuation a space, without accents or invisible format characters; 128 MinHash
permutations estimate the Jaccard similarity of two shingle sets, and LSH (banding tuned by datasketch for the
threshold) finds the kept documents estimated above `threshold` (0.8 by default).
`bench/data_near_dedup.py` measures recall and precision at several edit rates.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata

import numpy as np
from datasketch import MinHash, MinHashLSH

from seekstack.corpus.kinds import UNSPACED_WORD_CHARS, words, written_without_spaces

SHINGLE_WORDS = 5
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"  # datasketch 2.x default, named so that signatures rebuilt from values match


def content_hash(text: str) -> str:
    """SHA-256 hex digest of the (normalised) text: the document's identity for exact dedup and the split."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ExactDeduplicator:
    """Remembers content hashes and the id of the first document of each; a document whose hash was seen before is
    a duplicate of that one."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}  # content hash -> id of the document kept with it (or in its place)

    def duplicate_of(self, digest: str, doc_id: str) -> str | None:
        """The id of the document seen before with `digest`; otherwise None, and `doc_id` is recorded for it."""
        if digest in self.first:
            return self.first[digest]
        self.first[digest] = doc_id
        return None


# A number as datatrove's MinHash finds it, digits of any script with one decimal part (`3`, `12.99`, `1,000`, `٣٫٥`)
_NUMBER = re.compile(r"\d+(?:[.,\u060c\u066b]\d+)?")


@functools.cache
def _punctuation_accents_and_format() -> dict[int, str | None]:
    """A `str.translate` table that makes every Unicode punctuation character (categories P*) a space, as datatrove's
    `simplify_text` does (`sound\u2014but` is two words, as `sound -- but` is), and deletes every nonspacing mark (Mn:
    the accents of decomposed letters) and invisible format character (Cf: the zero-width space Thai and Khmer text
    sets between words, soft hyphens, direction marks)."""
    table: dict[int, str | None] = {}
    for code in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(code))
        if category[0] == "P":
            table[code] = " "
        elif category in ("Mn", "Cf"):
            table[code] = None
    return table


def simplified(text: str) -> str:
    """The text as datatrove's MinHash compares it (`simplify_text`): lower-cased, each number `0`, punctuation a
    space, without accents (`café` is `cafe`) or invisible format characters; composed again (NFC) after the accents
    go, so that a Korean syllable stays one character."""
    decomposed = unicodedata.normalize("NFD", _NUMBER.sub("0", text.lower()))
    return unicodedata.normalize("NFC", decomposed.translate(_punctuation_accents_and_format()))


def word_shingles(text: str, size: int = SHINGLE_WORDS) -> set[bytes]:
    """The set of word `size`-grams of the `simplified` text (none when it has fewer words), as datatrove's
    MinHash shingles it: copies that differ in typography (`don't` / `don’t`, `"` / `“`, `--` / `—`, a soft hyphen, a
    zero-width space), accents or numbers alone (a daily price list) have the same shingles. In Thai,
    Lao, Tibetan, Myanmar or Khmer text, whose space-separated "words" are phrases (one character's edit would
    change every shingle holding its phrase), a word is `UNSPACED_WORD_CHARS` of its characters, as the quality
    rules count them."""
    tokens = words(simplified(text))
    if written_without_spaces(text):
        characters, size = "".join(tokens), size * UNSPACED_WORD_CHARS
        shingles = [characters[i : i + size] for i in range(len(characters) - size + 1)]
    else:
        shingles = [" ".join(tokens[i : i + size]) for i in range(len(tokens) - size + 1)]
    return {shingle.encode("utf-8") for shingle in shingles}


def minhash_signature(text: str, num_perm: int = 128) -> np.ndarray | None:
    """The MinHash signature (`num_perm` uint64 values) of the text's shingles, None when it has none (fewer than
    `SHINGLE_WORDS` words: datatrove signs no such document, so it is no near duplicate of any); computed where the
    text is, so that only these values travel between processes."""
    shingles = word_shingles(text)
    if not shingles:
        return None
    signature = MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    signature.update_batch(list(shingles))
    return signature.hashvalues


@functools.cache
def lsh_can_band(threshold: float, num_perm: int) -> bool:
    """True when datasketch's LSH, tuned for `threshold`, splits `num_perm` permutations into the 2 or more bands
    it needs (a threshold near 1 wants one band of all of them)."""
    try:
        MinHashLSH(threshold=threshold, num_perm=num_perm)
    except ValueError:
        return False
    return True


def max_lsh_threshold(num_perm: int) -> float:
    """The highest threshold, in hundredths, that LSH can band `num_perm` (>= 2) permutations for: 0.98 for 128."""
    low, high = 0, 100  # in hundredths: 0.0 bands any 2 or more permutations, 1.0 none
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if lsh_can_band(middle / 100, num_perm) else (low, middle)
    return low / 100


class NearDeduplicator:
    """MinHash LSH over word 5-gram shingles: a document whose estimated Jaccard similarity to a kept one
    is at least `threshold` is a near duplicate (Broder 1997; as in the Gopher and FineWeb pipelines). LSH finds
    the candidates; each is checked against the threshold (the share of equal signature values), since banding also
    pairs documents well below it now and then (two stdlib modules estimated at 0.62 were paired at 0.8)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128) -> None:
        self.num_perm, self.threshold = num_perm, threshold
        self.index = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.rows: dict[str, int] = {}  # a kept document's row in `signatures`
        self.signatures = np.empty((1024, num_perm), dtype=np.uint32)  # their values (affine32's range), grown x2

    def duplicate_of(self, key: str, text_or_signature: str | np.ndarray | None) -> str | None:
        """The key of the document indexed before that the text (or its `minhash_signature`) nearly duplicates, the
        most similar when several do; otherwise None, and it is indexed under `key` (one without shingles is not)."""
        hashvalues = (
            minhash_signature(text_or_signature, self.num_perm)
            if isinstance(text_or_signature, str)
            else text_or_signature
        )
        if hashvalues is None:  # fewer words than a shingle: nothing to compare, as datatrove gives it no signature
            return None
        signature = MinHash(num_perm=self.num_perm, seed=MINHASH_SEED, hashvalues=hashvalues, scheme=MINHASH_SCHEME)
        values = np.asarray(hashvalues, dtype=np.uint32)
        candidates = self.index.query(signature)
        if candidates:  # one comparison for all candidates: templated pages make many, each below the threshold
            similarity = (self.signatures[[self.rows[candidate] for candidate in candidates]] == values).mean(axis=1)
            if similarity.max() >= self.threshold:
                return candidates[int(similarity.argmax())]
        self.index.insert(key, signature)
        if len(self.rows) == len(self.signatures):
            self.signatures = np.concatenate((self.signatures, np.empty_like(self.signatures)))
        self.signatures[len(self.rows)] = values
        self.rows[key] = len(self.rows)
        return None
