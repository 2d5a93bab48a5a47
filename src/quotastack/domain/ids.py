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


# Every pair of RFC 4648 base32 characters (lower case), indexed by the 10 bits they encode.
_RFC4648 = "abcdefghijklmnopqrstuvwxyz234567"
_PAIRS = [a + b for a in _RFC4648 for b in _RFC4648]


def new_id(prefix: str) -> str:
    # 48 bits of milliseconds then 80 random bits, as 26 base32 characters (one per 5 bits): the
    # first 26 characters of RFC 4648 base32 of those 16 bytes, i.e. 130 bits, the last two zero.
    # Built ten bits at a time, not by ``base64.b32encode`` (its pure-Python loop was a sizeable
    # part of a usage's time; ``reference_id`` keeps it, and a test holds the two equal).
    return _encode(prefix, (time.time_ns() // 1_000_000 % (1 << 48)) << 80 | int.from_bytes(os.urandom(10), "big"))


def _encode(prefix: str, value: int) -> str:
    n = value << 2
    return f"{prefix}_" + "".join([_PAIRS[n >> shift & 1023] for shift in range(120, -1, -10)])


def reference_id(prefix: str, raw: bytes) -> str:
    """The id of 16 raw bytes (6 of milliseconds, 10 random) as first defined, for tests."""
    return f"{prefix}_{base64.b32encode(raw).decode('ascii').lower()[:26]}"


def id_of(prefix: str, raw: bytes) -> str:
    """``new_id``'s encoding of 16 given bytes (for tests)."""
    return _encode(prefix, int.from_bytes(raw, "big"))


def new_secret(nbytes: int = 24) -> str:
    """Random text for keys and webhook secrets (URL-safe, no padding)."""
    return _b32(int.from_bytes(os.urandom(nbytes), "big"), (nbytes * 8 + 4) // 5)
