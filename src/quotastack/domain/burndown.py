"""Which credit block pays, and how much.

Burn-down order: priority ascending, then ``expires_at`` ascending with never-expiring blocks
last, then creation order. A block is usable from ``effective_at`` up to, not including,
``expires_at``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Block:
    id: str
    seq: int
    priority: int
    effective_at_us: int
    expires_at_us: int | None
    remaining: int

    def usable_at(self, at_us: int) -> bool:
        return usable(self.effective_at_us, self.expires_at_us, at_us)


def usable(effective_at_us: int, expires_at_us: int | None, at_us: int) -> bool:
    """Whether a block with these bounds can be spent at ``at_us``."""
    return effective_at_us <= at_us and (expires_at_us is None or at_us < expires_at_us)


def burn_key(block: Block) -> tuple[int, int, int, int]:
    never = block.expires_at_us is None
    return (block.priority, 1 if never else 0, block.expires_at_us or 0, block.seq)


def allocate(blocks: list[Block], amount: int, at_us: int) -> tuple[list[tuple[Block, int]], int]:
    """Draw ``amount`` from the usable blocks in burn-down order.

    Returns the ``(block, taken)`` pairs, in order, and the shortfall (0 when fully covered).
    The blocks themselves are not changed.
    """
    assert amount >= 0
    takes: list[tuple[Block, int]] = []
    left = amount
    for block in sorted(blocks, key=burn_key):
        if left == 0:
            break
        if block.remaining <= 0 or not block.usable_at(at_us):
            continue
        take = min(block.remaining, left)
        takes.append((block, take))
        left -= take
    assert sum(t for _, t in takes) + left == amount
    return takes, left
