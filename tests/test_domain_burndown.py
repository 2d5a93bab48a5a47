"""Burn-down: priority, then soonest expiry (never-expiring last), then creation order."""

from quotastack.domain.burndown import Block, allocate

NOW = 1_000


def block(id: str, seq: int, priority: int, expires: int | None, remaining: int, effective: int = 0) -> Block:
    return Block(id, seq, priority, effective, expires, remaining)


def test_lower_priority_burns_first() -> None:
    takes, short = allocate([block("a", 1, 100, None, 10), block("b", 2, 10, None, 10)], 15, NOW)
    assert [(b.id, t) for b, t in takes] == [("b", 10), ("a", 5)]
    assert short == 0


def test_sooner_expiry_burns_first_and_never_expiring_last() -> None:
    blocks = [block("never", 1, 100, None, 5), block("late", 2, 100, 9_000, 5), block("soon", 3, 100, 2_000, 5)]
    takes, _ = allocate(blocks, 12, NOW)
    assert [(b.id, t) for b, t in takes] == [("soon", 5), ("late", 5), ("never", 2)]


def test_creation_order_breaks_ties() -> None:
    takes, _ = allocate([block("second", 2, 100, None, 5), block("first", 1, 100, None, 5)], 6, NOW)
    assert [(b.id, t) for b, t in takes] == [("first", 5), ("second", 1)]


def test_blocks_not_yet_effective_or_expired_are_skipped() -> None:
    blocks = [block("future", 1, 1, None, 5, effective=NOW + 1), block("expired", 2, 1, NOW, 5),
              block("ok", 3, 100, NOW + 1, 5)]
    takes, short = allocate(blocks, 7, NOW)
    assert [(b.id, t) for b, t in takes] == [("ok", 5)]
    assert short == 2


def test_a_block_is_usable_up_to_but_not_at_its_expiry() -> None:
    b = block("x", 1, 1, 2_000, 5, effective=1_000)
    assert b.usable_at(1_000) and b.usable_at(1_999)
    assert not b.usable_at(999) and not b.usable_at(2_000)


def test_allocation_does_not_change_the_blocks() -> None:
    blocks = [block("a", 1, 1, None, 10)]
    allocate(blocks, 4, NOW)
    assert blocks[0].remaining == 10
