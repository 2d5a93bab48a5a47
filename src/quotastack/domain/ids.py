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


# Each byte to the base32 character of its low five bits: random bytes become random characters.
_CHAR_OF_BYTE = bytes(ord(_RFC4648[b & 31]) for b in range(256))
# The characters of the last millisecond seen: (milliseconds, its first nine characters).
_head: tuple[int, str] = (-1, "")


def new_id(prefix: str) -> str:
    # 48 bits of milliseconds then 80 random bits, as 26 base32 characters (one per 5 bits): the
    # first 26 characters of RFC 4648 base32 of those 16 bytes, i.e. 130 bits, the last two zero.
    # Characters 0-8 are the milliseconds' top 45 bits (the same for every id of that
    # millisecond: made once), character 9 their last 3 bits and 2 random ones, characters
    # 10-24 75 random bits, character 25 the last 3 random bits and the two zeros. The random
    # characters come from random bytes by table (each byte's low 5 bits), not from a number
    # cut into bits: ``reference_id`` keeps the plain definition, and a test holds new ids to it.
    global _head
    ms = time.time_ns() // 1_000_000 % (1 << 48)
    seen, head = _head
    if seen != ms:
        head = _encode("", ms << 80)[1:10]
        _head = (ms, head)
    rnd = os.urandom(17)
    return (f"{prefix}_{head}{_RFC4648[(ms & 7) << 2 | rnd[0] & 3]}"
            f"{rnd[1:16].translate(_CHAR_OF_BYTE).decode()}{_RFC4648[(rnd[16] & 7) << 2]}")


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
