"""Document-level train/validation split that is the same on every run and machine."""

from __future__ import annotations

import hashlib


def is_validation(key: str, val_fraction: float) -> bool:
    """True when the document keyed by `key` (its content hash, or its id) belongs to the validation split.

    The key's BLAKE2b hash, read as a number in [0, 1), is compared with the fraction: no seed, no RNG state.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"seekstack-val").digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction
