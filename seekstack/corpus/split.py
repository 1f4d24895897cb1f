"""Document-level train/validation split that is the same on every run and machine.

Each document has a score in [0, 1), the BLAKE2b hash of its key (its content hash) read as a number: no seed,
no RNG state. A large corpus puts the documents scoring below `val_fraction` in validation, so a document's split
never depends on the others. A corpus of at most `EXACT_SPLIT_MAX_DOCUMENTS` kept documents, where that rule's
chance variation would be large (0 or 3 of 20 documents for 0.1), takes exactly `share_count(fraction, documents)`
of the lowest scores instead (a half rounding up) — at least one when the fraction is above zero and there are two
documents or more.
"""

from __future__ import annotations

import hashlib
import math
from decimal import ROUND_HALF_UP, Decimal

EXACT_SPLIT_MAX_DOCUMENTS = 100_000


def split_score(key: str) -> float:
    """The document's place in [0, 1) for the split, from the BLAKE2b hash of `key`."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"seekstack-val").digest()
    return int.from_bytes(digest, "big") / 2**64


def share_count(fraction: float, count: int, rounding: str = ROUND_HALF_UP) -> int:
    """`fraction` of `count` items, a half rounding up (0.1 of 25 is 3, 0.3 of 15 is 5) or as `rounding` says
    (decimal's ROUND_DOWN: 0.29 of 100 is 29): the share as written times the count, as Python's round takes a half to
    the even count and float products miss halves (0.3 * 15 is 4.499999999999999, 0.29 * 100 is 28.999999999999996)."""
    return int((Decimal(repr(float(fraction))) * count).to_integral_value(rounding))


def validation_cutoff(scores: list[float] | None, val_fraction: float) -> float:
    """The score below which a document goes to validation: for a small corpus (all its `scores` known) the one
    that takes exactly the intended number of documents, for a large one (`scores` None) the fraction itself."""
    if scores is None or val_fraction == 0:
        return val_fraction
    count = min(max(share_count(val_fraction, len(scores)), 1 if len(scores) >= 2 else 0), len(scores) - 1)
    if count <= 0:
        return 0.0
    return math.nextafter(sorted(scores)[count - 1], 1.0)  # just above the count-th lowest score
