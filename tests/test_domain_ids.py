"""Identifiers: the fast encoding is exactly the one ids have always had."""

from __future__ import annotations

import os
import re

from quotastack.domain.ids import id_of, new_id, reference_id


def test_the_fast_encoding_equals_rfc4648_base32_of_the_same_bytes() -> None:
    cases = [bytes(16), b"\xff" * 16, bytes(range(16))] + [os.urandom(16) for _ in range(2000)]
    for raw in cases:
        assert id_of("use", raw) == reference_id("use", raw), raw.hex()


def test_new_ids_are_the_prefix_and_26_base32_characters_and_do_not_repeat() -> None:
    assert re.fullmatch(r"led_[a-z2-7]{26}", new_id("led"))
    assert len({new_id("led") for _ in range(1000)}) == 1000


def test_new_ids_are_the_encoding_of_their_millisecond_and_80_random_bits() -> None:
    """``new_id`` builds its characters by table; decoded, they are the 16 bytes it stands for."""
    import base64
    import time

    seen_bits = 0
    for _ in range(3000):
        before = time.time_ns() // 1_000_000
        made = new_id("use")
        after = time.time_ns() // 1_000_000
        raw = base64.b32decode(made[4:].upper() + "======")
        assert len(raw) == 16 and reference_id("use", raw) == made
        assert before <= int.from_bytes(raw[:6], "big") <= after
        seen_bits |= int.from_bytes(raw[6:], "big")
    assert seen_bits == (1 << 80) - 1, "every one of the 80 random bits takes both values"
