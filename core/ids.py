"""Object ids: a type prefix plus a time-ordered random part (so ORDER BY id is creation order)."""

from __future__ import annotations

import hashlib
import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower-case


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """e.g. new_id("pay") -> "pay_01hx...": 10 chars of milliseconds, 16 chars of randomness."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_b32(ms, 10)}{_b32(rand, 16)}"


def derived_id(prefix: str, created_ms: int, natural_key: str) -> str:
    """An id of new_id's shape for an object someone else named: the same creation time and key
    always give the same id, so every delivery of every event about the object names one row and
    one workflow (e.g. a PSP's dispute). Time-ordered like every id; the key's hash replaces the
    randomness."""
    digest = int.from_bytes(hashlib.sha256(natural_key.encode()).digest()[:10], "big")
    return f"{prefix}_{_b32(max(created_ms, 0), 10)}{_b32(digest, 16)}"
