"""One end user's balance of one feature, inside a unit of work.

An ``Account`` loads the feature's live blocks, first settles what time has made due (grants
whose ``effective_at`` has come, blocks whose ``expires_at`` has passed), and then writes every
movement as ledger entries with the running balance. It is the only code that writes
``ledger_entries`` or changes a block's ``remaining``, so the conservation identity

    grants + refunds + rollovers - uses - expiries - voids - commits = balance + reserved

(``reserve`` and ``release`` move credits between a block and its reservations, ``commit``
takes them out of the reserved total) is kept in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

from ..domain.burndown import Block, allocate, usable
from ..domain.ids import new_id
from . import views
from .codec import dumps
from .context import Ctx
from .ports import Row, Tx

# How each entry type moves a block's ``remaining`` (the balance) and the reserved total.
EFFECTS = {
    "grant": (1, 0), "refund": (1, 0), "rollover": (1, 0),
    "use": (-1, 0), "expire": (-1, 0), "void": (-1, 0),
    "reserve": (-1, 1), "release": (1, -1), "commit": (0, -1),
}


@dataclass(slots=True)
class Draw:
    """What a debit took: the ledger entries written and the part not covered."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    shortfall: int = 0


@dataclass(slots=True)
class Loaded:
    """What an ``Account`` starts from: its live blocks (in creation order) and its reservations."""

    blocks: list[Row] = field(default_factory=list)
    reserved: int = 0
    first_held_expiry_us: int | None = None  # the earliest expiry of its held reservations


def load_accounts(tx: Tx, env_id: int, end_user_ids: Sequence[str], feature_keys: Sequence[str],
                  ) -> dict[tuple[str, str], Loaded]:
    """Every (end user, feature) account of those end users and features, in two statements."""
    blocks, held = tx.account_states(env_id, end_user_ids, feature_keys)
    out: dict[tuple[str, str], Loaded] = {}
    for row in blocks:
        out.setdefault((row["end_user_id"], row["feature_key"]), Loaded()).blocks.append(row)
    for row in held:
        loaded = out.setdefault((row["end_user_id"], row["feature_key"]), Loaded())
        loaded.reserved = int(row["reserved"])
        loaded.first_held_expiry_us = row["first_expiry_us"]
    return out


@dataclass(slots=True)
class Pending:
    """Ledger and usage rows, and blocks' new ``remaining``, held back to be written all at once.

    A batch of usage writes its rows with one ``executemany`` per table (``flush``) instead of a
    statement per row. Rows keep the order they were made in; whoever holds a ``Pending`` flushes
    it before anything else reads those tables in the same unit of work.
    """

    remaining: dict[str, int] = field(default_factory=dict)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)

    def flush(self, tx: Tx) -> None:
        tx.insert_many("ledger_entries", self.ledger)
        tx.insert_many("usage_events", self.usage)
        tx.set_remaining(list(self.remaining.items()))
        self.remaining.clear()
        self.ledger.clear()
        self.usage.clear()


class Account:
    def __init__(self, tx: Tx, ctx: Ctx, end_user_id: str, feature_key: str, precision: int,
                 loaded: Loaded | None = None, pending: Pending | None = None) -> None:
        self.tx = tx
        self.ctx = ctx
        # Where ``move`` writes: straight through ``tx``, or held back in ``pending``.
        self.pending = pending
        self.end_user_id = end_user_id
        self.feature_key = feature_key
        self.precision = precision
        if loaded is None:
            loaded = load_accounts(tx, ctx.env_id, [end_user_id], [feature_key]).get(
                (end_user_id, feature_key)) or Loaded()
        self.rows: dict[str, dict[str, Any]] = {row["id"]: dict(row) for row in loaded.blocks}
        # The ledger's running total: frozen blocks (a paused subscription's) still count here,
        # though nobody can spend them until the subscription resumes.
        self.balance = sum(r["remaining"] for r in self.rows.values() if r["status"] in ("active", "frozen"))
        self.reserved = loaded.reserved
        self.settle(ctx.now_us, reservations_due=loaded.first_held_expiry_us is not None
                    and loaded.first_held_expiry_us <= ctx.now_us)

    @staticmethod
    def is_settled(loaded: Loaded, now_us: int) -> bool:
        """Whether an account loaded from ``loaded`` has nothing due at ``now_us`` (settling writes nothing)."""
        if loaded.first_held_expiry_us is not None and loaded.first_held_expiry_us <= now_us:
            return False
        return not any(_due(row, now_us) for row in loaded.blocks)

    # ---- reading --------------------------------------------------------------------------------

    def blocks(self) -> list[Block]:
        return [
            Block(r["id"], r["seq"], r["priority"], r["effective_at_us"], r["expires_at_us"], r["remaining"])
            for r in self.rows.values() if r["status"] == "active"
        ]

    def spendable(self, at_us: int | None = None) -> int:
        at = self.ctx.now_us if at_us is None else at_us
        # From the rows themselves: every usage's response asks, and making ``Block``s for it
        # cost more than the sum.
        return sum(r["remaining"] for r in self.rows.values()
                   if r["status"] == "active" and usable(r["effective_at_us"], r["expires_at_us"], at))

    # ---- time -----------------------------------------------------------------------------------

    def settle(self, now_us: int, reservations_due: bool = True) -> None:
        """Write the grant and expire entries that time has made due, in time order.

        ``reservations_due=False``: the caller knows no held reservation has expired by ``now_us``.
        """
        due = [item for row in self.rows.values() for item in _due(row, now_us)]
        if reservations_due:
            for rsv in self.tx.due_reservations(self.ctx.env_id, self.end_user_id, self.feature_key, now_us):
                due.append((rsv["expires_at_us"], 2, rsv["id"], "reservation"))
        for instant, _, object_id, kind in sorted(due):
            if kind == "reservation":
                self.release_holds(object_id, at_us=instant, reason="reservation expired")
                self.tx.update("reservations", {"id": object_id}, {"status": "expired", "ended_at_us": instant})
                self.event("reservation.expired", {"reservation_id": object_id})
                continue
            row = self.rows[object_id]
            if kind == "grant":
                amount, row["remaining"] = row["remaining"], 0
                row["status"] = "active"
                self.move(row, "grant", amount, at_us=instant, reason="effective")
                self.tx.update("blocks", {"id": object_id}, {"status": "active"})
            else:
                self.expire(row, at_us=instant)

    def expire(self, row: dict[str, Any], at_us: int, reason: str = "expired") -> dict[str, Any] | None:
        """Take a block's remaining amount out of the balance for good."""
        entry = None
        if row["status"] in ("active", "frozen") and row["remaining"] > 0:
            entry = self.move(row, "expire", row["remaining"], at_us=at_us, reason=reason)
            self.event("credits.expired", {"block_id": row["id"], "amount": views.amount(entry["amount"], self.precision)})
        if row["status"] in ("active", "scheduled", "frozen"):
            row["status"] = "expired"
            self.tx.update("blocks", {"id": row["id"]}, {"status": "expired", "remaining": row["remaining"]})
        return entry

    # ---- movements ------------------------------------------------------------------------------

    def grant(self, amount: int, *, priority: int, effective_at_us: int, expires_at_us: int | None,
              source: str, subscription_id: str | None = None, metadata: Any = None,
              reason: str | None = None, entry_type: str = "grant") -> dict[str, Any]:
        """Create a block of ``amount`` (> 0) and, when already effective, its grant entry."""
        assert amount > 0
        scheduled = effective_at_us > self.ctx.now_us
        row = {
            "id": new_id("blk"), "env_id": self.ctx.env_id, "end_user_id": self.end_user_id,
            "feature_key": self.feature_key, "original_amount": amount, "remaining": amount,
            "priority": priority, "effective_at_us": effective_at_us, "expires_at_us": expires_at_us,
            "source": source, "status": "scheduled" if scheduled else "active",
            "subscription_id": subscription_id, "metadata": dumps(metadata or {}),
            "created_at_us": self.ctx.now_us,
        }
        self.tx.insert("blocks", row)
        stored = self.tx.get("blocks", id=row["id"])
        assert stored is not None
        row = dict(stored)
        self.rows[row["id"]] = row
        if not scheduled:
            # The entry adds the amount: count it in the block only once.
            row["remaining"] = 0
            self.move(row, entry_type, amount, reason=reason)
        self.event("credits.granted", {"block_id": row["id"], "amount": views.amount(amount, self.precision),
                                       "source": source, "expires_at": views.ts(expires_at_us)})
        return row

    def draw(self, amount: int, *, entry_type: str = "use", usage_id: str | None = None,
             reservation_id: str | None = None, reason: str | None = None, partial: bool = False) -> Draw:
        """Debit ``amount`` in burn-down order, one entry per block touched.

        Without ``partial`` nothing is written unless the whole amount is covered.
        """
        takes, shortfall = allocate(self.blocks(), amount, self.ctx.now_us)
        result = Draw(shortfall=shortfall)
        if shortfall and not partial:
            return result
        for block, take in takes:
            result.entries.append(self.move(self.rows[block.id], entry_type, take, usage_id=usage_id,
                                             reservation_id=reservation_id, reason=reason))
        return result

    def block_row(self, block_id: str) -> dict[str, Any]:
        """A block of this account, loading it when it is no longer live (expired, voided)."""
        if block_id not in self.rows:
            row = self.tx.get("blocks", id=block_id)
            assert row is not None and row["feature_key"] == self.feature_key
            self.rows[block_id] = dict(row)
        return self.rows[block_id]

    def hold(self, amount: int, reservation_id: str) -> Draw:
        """Move ``amount`` from the balance to ``reservation_id``, block by block."""
        result = self.draw(amount, entry_type="reserve", reservation_id=reservation_id)
        if not result.shortfall:
            self.tx.insert_many("reservation_holds", [
                {"reservation_id": reservation_id, "block_id": e["block_id"], "seq": i, "amount": e["amount"]}
                for i, e in enumerate(result.entries)])
        return result

    def commit_holds(self, reservation_id: str, amount: int, usage_id: str | None = None) -> list[dict[str, Any]]:
        """Charge ``amount`` (at most what is held) out of the reservation, in the order held."""
        entries = []
        left = amount
        for hold in self.tx.holds_of(reservation_id):
            if left == 0:
                break
            take = min(left, hold["amount"])
            if take == 0:
                continue
            entries.append(self.move(self.block_row(hold["block_id"]), "commit", take,
                                      reservation_id=reservation_id, usage_id=usage_id))
            self.tx.update("reservation_holds", {"reservation_id": reservation_id, "block_id": hold["block_id"]},
                           {"amount": hold["amount"] - take})
            left -= take
        assert left == 0, "commit_holds is never asked for more than is held"
        return entries

    def release_holds(self, reservation_id: str, at_us: int | None = None,
                      reason: str | None = None) -> list[dict[str, Any]]:
        """Give everything still held back to the blocks it came from.

        A block that has expired (or been voided) since takes the credits back and loses them at
        once: released credit never outlives its block.
        """
        at = self.ctx.now_us if at_us is None else at_us
        entries = []
        for hold in self.tx.holds_of(reservation_id):
            if hold["amount"] == 0:
                continue
            row = self.block_row(hold["block_id"])
            entries.append(self.move(row, "release", hold["amount"], at_us=at, reservation_id=reservation_id,
                                      reason=reason))
            dead = row["status"] in ("expired", "voided") or (
                row["status"] != "frozen" and row["expires_at_us"] is not None and row["expires_at_us"] <= at)
            if dead:
                entries.append(self.move(row, "expire", hold["amount"], at_us=at, reservation_id=reservation_id,
                                          reason="released into an expired block"))
            self.tx.update("reservation_holds", {"reservation_id": reservation_id, "block_id": hold["block_id"]},
                           {"amount": 0})
        return entries

    def void(self, row: dict[str, Any], reason: str | None = None) -> dict[str, Any] | None:
        entry = None
        if row["status"] in ("active", "frozen") and row["remaining"] > 0:
            entry = self.move(row, "void", row["remaining"], reason=reason)
        row["status"] = "voided"
        self.tx.update("blocks", {"id": row["id"]}, {"status": "voided", "remaining": row["remaining"]})
        return entry

    def move(self, row: dict[str, Any], entry_type: str, amount: int, *, at_us: int | None = None,
              usage_id: str | None = None, reservation_id: str | None = None,
              reason: str | None = None) -> dict[str, Any]:
        assert amount > 0, (entry_type, amount)
        to_remaining, to_reserved = EFFECTS[entry_type]
        row["remaining"] += to_remaining * amount
        assert row["remaining"] >= 0, "a block never goes below zero"
        self.balance += to_remaining * amount
        self.reserved += to_reserved * amount
        assert self.reserved >= 0, "nothing is ever reserved below zero"
        entry = {
            "id": new_id("led"), "env_id": self.ctx.env_id, "end_user_id": self.end_user_id,
            "feature_key": self.feature_key, "block_id": row["id"], "type": entry_type,
            "amount": amount, "balance_after": self.balance, "reserved_after": self.reserved,
            "usage_id": usage_id, "reservation_id": reservation_id,
            "subscription_id": row.get("subscription_id"), "reason": reason, "metadata": "{}",
            "created_at_us": self.ctx.now_us if at_us is None else at_us,
        }
        if self.pending is None:
            self.tx.update("blocks", {"id": row["id"]}, {"remaining": row["remaining"]})
            self.tx.insert("ledger_entries", entry)
        else:
            self.pending.remaining[row["id"]] = row["remaining"]
            self.pending.ledger.append(entry)
        if self.balance == 0 and entry_type == "use":
            self.event("balance.depleted", {"feature_key": self.feature_key})
        return entry

    def event(self, event_type: str, data: dict[str, Any]) -> None:
        record_event(self.tx, self.ctx, event_type,
                     {"end_user_id": self.end_user_id, "feature_key": self.feature_key} | data)


def _due(row: Row, now_us: int) -> list[tuple[int, int, str, str]]:
    """What ``settle`` at ``now_us`` writes for this block, as (instant, order, id, kind): its
    grant when it has taken effect, its expiry when it has expired (both, in that order)."""
    due = []
    if row["status"] == "scheduled" and row["effective_at_us"] <= now_us:
        due.append((row["effective_at_us"], 0, row["id"], "grant"))
    if row["status"] != "frozen" and row["expires_at_us"] is not None and row["expires_at_us"] <= now_us:
        due.append((row["expires_at_us"], 1, row["id"], "expire"))
    return due


def record_event(tx: Tx, ctx: Ctx, event_type: str, data: dict[str, Any]) -> Row:
    row = {"id": new_id("evt"), "env_id": ctx.env_id, "type": event_type, "data": dumps(data),
           "created_at_us": ctx.now_us}
    tx.insert("events", row)
    return row
