"""Rows as the API shows them: exact Decimals for amounts, RFC 3339 for instants.

The HTTP layer renders these dicts as JSON unchanged.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from typing import Any

from ..domain.amounts import from_minor
from ..domain.periods import format_rfc3339
from .codec import loads
from .ports import Row


def ts(instant_us: int | None) -> str | None:
    return None if instant_us is None else _rfc3339(instant_us)


# A request's rows mostly share one instant (its ``now``): format each instant once.
_rfc3339 = lru_cache(maxsize=4096)(format_rfc3339)


def amount(minor: int | None, precision: int) -> Decimal | int | None:
    """An amount for a response: a whole number stays an ``int`` (the common case, and cheap)."""
    if minor is None:
        return None
    if precision == 0:
        return int(minor)
    return from_minor(int(minor), precision)


def feature(row: Row) -> dict[str, Any]:
    rate = row["credits_per_unit"]
    return {
        "id": row["id"], "object": "feature", "key": row["key"], "name": row["name"],
        "type": row["type"], "unit": row["unit"], "precision": row["precision"],
        "credit_pool": row["credit_pool"],
        "credits_per_unit": Decimal(rate) if rate is not None else None,
        "metadata": loads(row["metadata"]), "created_at": ts(row["created_at_us"]),
    }


def plan(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"], "object": "plan", "key": row["key"], "name": row["name"],
        "default": bool(row["is_default"]), "metadata": loads(row["metadata"]),
        "created_at": ts(row["created_at_us"]),
    }


def _price(text: str | None) -> dict[str, Any] | None:
    price = loads(text)
    if price is None:
        return None
    return {"amount": Decimal(price["amount"]), "currency": price["currency"]}


def entitlement(row: Row, precision: int) -> dict[str, Any]:
    pricing = loads(row["pricing"])
    if pricing is not None:
        pricing = {
            "mode": pricing["mode"], "currency": pricing["currency"],
            "tiers": [{"up_to": Decimal(t["up_to"]) if t["up_to"] is not None else None,
                       "unit_price": Decimal(t["unit_price"])} for t in pricing["tiers"]],
        }
    rollover = loads(row["rollover"])
    if rollover is not None:
        rollover = {"max_amount": amount(rollover["max_amount"], precision),
                    "expires_after": rollover.get("expires_after")}
    return {
        "feature_key": row["feature_key"], "amount": amount(row["amount"], precision),
        "enabled": bool(row["enabled"]), "unlimited": bool(row["unlimited"]),
        "priority": row["priority"], "max_balance": amount(row["max_balance"], precision),
        "overage": row["overage"], "pricing": pricing, "reset": loads(row["reset"]),
        "rollover": rollover,
    }


def variant(row: Row, entitlements: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": row["id"], "object": "plan_variant", "plan_id": row["plan_id"], "key": row["key"],
        "price": _price(row["price"]), "billing_period": loads(row["billing_period"]),
        "trial_period": loads(row["trial_period"]), "entitlements": entitlements,
        "metadata": loads(row["metadata"]), "created_at": ts(row["created_at_us"]),
    }


def pack(row: Row, precision: int) -> dict[str, Any]:
    return {
        "id": row["id"], "object": "pack", "key": row["key"], "feature_key": row["feature_key"],
        "amount": amount(row["amount"], precision), "price": _price(row["price"]),
        "expires_after": loads(row["expires_after"]), "priority": row["priority"],
        "metadata": loads(row["metadata"]), "created_at": ts(row["created_at_us"]),
    }


def block(row: Row, precision: int) -> dict[str, Any]:
    return {
        "id": row["id"], "object": "credit_block", "end_user_id": row["end_user_id"],
        "feature_key": row["feature_key"],
        "original_amount": amount(row["original_amount"], precision),
        "remaining": amount(row["remaining"], precision), "priority": row["priority"],
        "effective_at": ts(row["effective_at_us"]), "expires_at": ts(row["expires_at_us"]),
        "source": row["source"], "status": row["status"],
        "subscription_id": row["subscription_id"], "metadata": loads(row["metadata"]),
        "created_at": ts(row["created_at_us"]),
    }


def ledger_entry(row: Row, precision: int) -> dict[str, Any]:
    return {
        "id": row["id"], "object": "ledger_entry", "type": row["type"],
        "end_user_id": row["end_user_id"], "feature_key": row["feature_key"],
        "block_id": row["block_id"], "amount": amount(row["amount"], precision),
        "balance_after": amount(row["balance_after"], precision),
        "reserved_after": amount(row["reserved_after"], precision),
        "usage_id": row["usage_id"], "reservation_id": row["reservation_id"],
        "subscription_id": row["subscription_id"], "reason": row["reason"],
        "created_at": ts(row["created_at_us"]), "metadata": loads(row["metadata"]),
    }


def subscription(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"], "object": "subscription", "end_user_id": row["end_user_id"],
        "plan_id": row["plan_id"], "plan_variant_id": row["variant_id"], "status": row["status"],
        "current_period_start": ts(row["current_period_start_us"]),
        "current_period_end": ts(row["current_period_end_us"]),
        "trial_end": ts(row["trial_end_us"]),
        "cancel_at_period_end": bool(row["cancel_at_period_end"]),
        "paused_at": ts(row["paused_at_us"]), "auto_renew": bool(row["auto_renew"]),
        "timezone": row["timezone"], "default_plan": bool(row["is_default_plan"]),
        "scheduled_change": loads(row["scheduled_change"]), "ended_at": ts(row["ended_at_us"]),
        "created_at": ts(row["created_at_us"]), "metadata": loads(row["metadata"]),
    }


def event(row: Row) -> dict[str, Any]:
    return {"id": row["id"], "object": "event", "type": row["type"],
            "created_at": ts(row["created_at_us"]), "data": loads(row["data"])}


def audit(row: Row) -> dict[str, Any]:
    return {"id": row["id"], "object": "audit_record", "key_id": row["key_id"],
            "method": row["method"], "path": row["path"], "object_ids": loads(row["object_ids"]),
            "status": row["status"], "request_id": row["request_id"],
            "created_at": ts(row["created_at_us"])}
