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
