"""Opaque, prefixed identifiers (``use_aaxk…``): a millisecond timestamp then randomness."""

from __future__ import annotations

import base64
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
    # 48 bits of milliseconds then 80 random bits, as 26 base32 characters (one per 5 bits).
    raw = (time.time_ns() // 1_000_000 % (1 << 48)).to_bytes(6, "big") + os.urandom(10)
    return f"{prefix}_{base64.b32encode(raw).decode('ascii').lower()[:26]}"


def new_secret(nbytes: int = 24) -> str:
    """Random text for keys and webhook secrets (URL-safe, no padding)."""
    return _b32(int.from_bytes(os.urandom(nbytes), "big"), (nbytes * 8 + 4) // 5)
