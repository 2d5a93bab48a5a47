"""Opaque, prefixed identifiers (``use_01HZX…``): a millisecond timestamp then randomness."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _b32(number: int, length: int) -> str:
    chars = []
    for _ in range(length):
        number, digit = divmod(number, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{_b32(millis, 10)}{_b32(int.from_bytes(os.urandom(10), 'big'), 16)}"


def new_secret(nbytes: int = 24) -> str:
    """Random text for keys and webhook secrets (URL-safe, no padding)."""
    return _b32(int.from_bytes(os.urandom(nbytes), "big"), (nbytes * 8 + 4) // 5)
