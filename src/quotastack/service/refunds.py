"""Refunds: credits charged by a usage or a committed reservation go back to their blocks.

Never more than was charged, less what earlier refunds took. Refunds consume the charge's
``use``/``commit`` entries in the order they were written; a block that has expired or been
voided since gets nothing back (that part of the refund is lost with the block), and the refund
lists what it skipped.
"""

from __future__ import annotations

from typing import Any

from ..domain.amounts import to_minor
from ..domain.errors import InvalidAmount, InvalidRequest, NotFound
from ..domain.ids import new_id
from . import views
from .accounts import Account
from .context import Ctx
from .features import Features
from .ports import Tx


def refund(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    usage_id, reservation_id = data.get("usage_id"), data.get("reservation_id")
    if (usage_id is None) == (reservation_id is None):
        raise InvalidRequest("give exactly one of usage_id or reservation_id", "usage_id")
    if usage_id is not None:
        source = tx.get("usage_events", env_id=ctx.env_id, id=usage_id)
        if source is None:
            raise NotFound(f"no usage {usage_id!r}", "usage_id")
        end_user_id, feature_key = source["end_user_id"], source["charged_feature_key"]
        charges = tx.charges(ctx.env_id, "usage_id", usage_id)
    else:
        source = tx.get("reservations", env_id=ctx.env_id, id=reservation_id)
        if source is None:
            raise NotFound(f"no reservation {reservation_id!r}", "reservation_id")
        end_user_id, feature_key = source["end_user_id"], source["charged_feature_key"]
        charges = tx.charges(ctx.env_id, "reservation_id", reservation_id)
    precision = Features(tx, ctx.env_id).precision(feature_key)
    tx.lock_end_user(ctx.env_id, end_user_id, ctx.now_us)
    account = Account(tx, ctx, end_user_id, feature_key, precision)
    # Refunds consume the charge in the order it was drawn: skip what earlier refunds took
    # (including any part that went to a block that had expired by then), then take this one.
    column = "usage_id" if usage_id is not None else "reservation_id"
    already = tx.refunded(ctx.env_id, column, usage_id or reservation_id)
    charged = sum(e["amount"] for e in charges)
    refundable = charged - already
    requested = refundable if data.get("amount") is None else to_minor(data["amount"], precision, "amount")
    if requested > refundable:
        raise InvalidAmount(f"at most {views.amount(refundable, precision)} can be refunded", "amount")
    if requested == 0:
        raise InvalidAmount("nothing is left to refund", "amount")
    skip, left = already, requested
    entries, skipped = [], []
    for charge in charges:
        portion = charge["amount"]
        passed = min(skip, portion)
        skip -= passed
        take = min(left, portion - passed)
        if take <= 0:
            continue
        left -= take
        row = account.block_row(charge["block_id"])
        if row["status"] != "active" or (row["expires_at_us"] is not None and row["expires_at_us"] <= ctx.now_us):
            skipped.append({"block_id": row["id"], "amount": views.amount(take, precision),
                            "reason": f"block {row['status'] if row['status'] != 'active' else 'expired'}"})
            continue
        entries.append(account.move(row, "refund", take, usage_id=usage_id, reservation_id=reservation_id,
                                    reason="refund"))
    refunded = sum(e["amount"] for e in entries)
    record = {"id": new_id("rfd"), "env_id": ctx.env_id, "end_user_id": end_user_id, "feature_key": feature_key,
              "usage_id": usage_id, "reservation_id": reservation_id, "requested": requested,
              "amount": refunded, "created_at_us": ctx.now_us}
    tx.insert("refunds", record)
    return {
        "id": record["id"], "object": "refund", "end_user_id": end_user_id, "feature_key": feature_key,
        "usage_id": usage_id, "reservation_id": reservation_id,
        "requested": views.amount(requested, precision), "amount": views.amount(refunded, precision),
        "skipped": skipped, "balance": views.amount(account.spendable(), precision),
        "entries": [views.ledger_entry(e, precision) for e in entries], "created_at": views.ts(ctx.now_us),
    }
