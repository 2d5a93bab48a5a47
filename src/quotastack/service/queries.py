"""Lists and single reads: cursor pagination, newest first."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..domain.errors import InvalidRequest, NotFound
from . import views
from .accounts import Account
from .catalog import variant_view
from .context import Ctx
from .features import Features
from .ports import Row, Tx
from .reservations import as_of_now
from .tenants import key_view

RESERVATION_STATUSES = ("held", "committed", "released", "expired")
SUBSCRIPTION_STATUSES = ("trialing", "active", "paused", "canceled", "expired")
LEDGER_TYPES = ("grant", "refund", "rollover", "use", "expire", "void", "reserve", "commit", "release")


def listing(tx: Tx, ctx: Ctx, table: str, view: Callable[[Row], dict[str, Any]], limit: int,
            starting_after: str | None, filters: Mapping[str, Any] | None = None,
            ranges: Mapping[str, tuple[int | None, int | None]] | None = None) -> dict[str, Any]:
    if starting_after is not None and tx.get(table, env_id=ctx.env_id, id=starting_after) is None:
        raise InvalidRequest(f"starting_after: no such object {starting_after!r} in this list", "starting_after")
    rows = tx.page(table, ctx.env_id, filters or {}, limit, starting_after, ranges)
    has_more = len(rows) > limit
    rows = rows[:limit]
    return {"object": "list", "data": [view(r) for r in rows], "has_more": has_more,
            "next_cursor": rows[-1]["id"] if has_more else None}


def features(tx: Tx, ctx: Ctx, limit: int, after: str | None) -> dict[str, Any]:
    return listing(tx, ctx, "features", views.feature, limit, after)


def plans(tx: Tx, ctx: Ctx, limit: int, after: str | None) -> dict[str, Any]:
    return listing(tx, ctx, "plans", views.plan, limit, after)


def variants(tx: Tx, ctx: Ctx, plan_id: str, limit: int, after: str | None) -> dict[str, Any]:
    return listing(tx, ctx, "plan_variants", lambda r: variant_view(tx, ctx, r), limit, after,
                   {"plan_id": plan_id})


def packs(tx: Tx, ctx: Ctx, limit: int, after: str | None) -> dict[str, Any]:
    precision = Features(tx, ctx.env_id).precision
    return listing(tx, ctx, "packs", lambda r: views.pack(r, precision(r["feature_key"])), limit, after)


def subscriptions(tx: Tx, ctx: Ctx, end_user_id: str | None, status: str | None, limit: int,
                  after: str | None) -> dict[str, Any]:
    if status is not None and status not in SUBSCRIPTION_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(SUBSCRIPTION_STATUSES)}", "status")
    return listing(tx, ctx, "subscriptions", views.subscription, limit, after,
                   {"end_user_id": end_user_id, "status": status})


def reservations(tx: Tx, ctx: Ctx, end_user_id: str | None, status: str | None, limit: int,
                 after: str | None) -> dict[str, Any]:
    """Reservations, newest first; settled first, so a past-due one lists as ``expired``."""
    if status is not None and status not in RESERVATION_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(RESERVATION_STATUSES)}", "status")
    settle_end_user(tx, ctx, end_user_id)
    return listing(tx, ctx, "reservations", lambda r: as_of_now(tx, ctx, r), limit, after,
                   {"end_user_id": end_user_id, "status": status})


def ledger(tx: Tx, ctx: Ctx, filters: Mapping[str, Any], from_us: int | None, to_us: int | None,
           limit: int, after: str | None) -> dict[str, Any]:
    precision = Features(tx, ctx.env_id).precision
    return listing(tx, ctx, "ledger_entries", lambda r: views.ledger_entry(r, precision(r["feature_key"])),
                   limit, after, filters, {"created_at_us": (from_us, to_us)})


def ledger_entry(tx: Tx, ctx: Ctx, entry_id: str) -> dict[str, Any]:
    row = tx.get("ledger_entries", env_id=ctx.env_id, id=entry_id)
    if row is None:
        raise NotFound(f"no ledger entry {entry_id!r}")
    return views.ledger_entry(row, Features(tx, ctx.env_id).precision(row["feature_key"]))


def events(tx: Tx, ctx: Ctx, event_type: str | None, limit: int, after: str | None) -> dict[str, Any]:
    return listing(tx, ctx, "events", views.event, limit, after, {"type": event_type})


def event(tx: Tx, ctx: Ctx, event_id: str) -> dict[str, Any]:
    row = tx.get("events", env_id=ctx.env_id, id=event_id)
    if row is None:
        raise NotFound(f"no event {event_id!r}")
    return views.event(row)


def audit_log(tx: Tx, ctx: Ctx, limit: int, after: str | None) -> dict[str, Any]:
    return listing(tx, ctx, "audit_log", views.audit, limit, after)


def api_keys(tx: Tx, ctx: Ctx, limit: int, after: str | None) -> dict[str, Any]:
    return listing(tx, ctx, "api_keys", lambda r: key_view(r, ctx.environment), limit, after)


def usage_event(tx: Tx, ctx: Ctx, usage_id: str) -> dict[str, Any]:
    row = tx.get("usage_events", env_id=ctx.env_id, id=usage_id)
    if row is None:
        raise NotFound(f"no usage {usage_id!r}")
    features = Features(tx, ctx.env_id)
    return {"id": row["id"], "object": "usage", "end_user_id": row["end_user_id"],
            "feature_key": row["feature_key"],
            "units": views.amount(row["units"], features.precision(row["feature_key"])),
            "amount": views.amount(row["amount"], features.precision(row["charged_feature_key"])),
            "charged_feature_key": row["charged_feature_key"],
            "overage": views.amount(row["overage"], features.precision(row["charged_feature_key"])),
            "timestamp": views.ts(row["timestamp_us"]), "created_at": views.ts(row["created_at_us"])}


def settle_end_user(tx: Tx, ctx: Ctx, end_user_id: str | None, limit: int = 10_000) -> int:
    """Write the grant, expiry and reservation-expiry entries that time has made due.

    For one end user, or (``None``) for the whole environment, at most ``limit`` balances.
    Returns how many balances were settled.
    """
    features = Features(tx, ctx.env_id)
    # Lock end users in one fixed order, so that two sweeps never wait on each other in a cycle.
    due = sorted(tx.due_accounts(ctx.env_id, ctx.now_us, limit, end_user_id),
                 key=lambda r: (r["end_user_id"], r["feature_key"]))
    for row in due:
        tx.lock_end_user(ctx.env_id, row["end_user_id"], ctx.now_us)
        Account(tx, ctx, row["end_user_id"], row["feature_key"], features.precision(row["feature_key"]))
    return len(due)
