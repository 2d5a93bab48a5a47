"""Reservations: hold credits before a long task, commit what it cost, release the rest.

A reservation holds credits block by block (``reservation_holds``), so what is released goes
back to the blocks it came from, keeping their priority and expiry. At ``expires_at`` whatever is
still held is released: balances and checks count it from that instant (``Tx.entitlement_snapshot``), and the
``release`` entries are written by the next request touching the balance or by the sweep.
"""

from __future__ import annotations

from typing import Any

from ..domain.amounts import to_minor
from ..domain.errors import InsufficientBalance, InvalidRequest, InvalidState, NotFound
from ..domain.ids import new_id
from ..domain.periods import US_PER_SECOND
from . import views
from .accounts import Account
from .codec import dumps, loads
from .context import Ctx
from .features import Features, cost, metered, plan_terms
from .ports import Row, Tx
from .subscriptions import ensure_subscription

DEFAULT_TTL_SECONDS = 900
MAX_TTL_SECONDS = 604_800


def _ttl(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TTL_SECONDS:
        raise InvalidRequest(f"ttl_seconds must be a whole number from 1 to {MAX_TTL_SECONDS}", "ttl_seconds")
    return value


def view(tx: Tx, ctx: Ctx, row: Row, account: Account | None = None,
         entries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    features = Features(tx, ctx.env_id)
    unit_precision = features.precision(row["feature_key"])
    precision = features.precision(row["charged_feature_key"])
    held = sum(h["amount"] for h in tx.holds_of(row["id"])) if row["status"] == "held" else 0
    out = {
        "id": row["id"], "object": "reservation", "status": row["status"],
        "end_user_id": row["end_user_id"], "feature_key": row["feature_key"],
        "charged_feature_key": row["charged_feature_key"],
        "units": views.amount(row["units"], unit_precision), "amount": views.amount(row["amount"], precision),
        "held": views.amount(held, precision),
        "committed_amount": views.amount(row["committed_amount"], precision),
        "expires_at": views.ts(row["expires_at_us"]), "ended_at": views.ts(row["ended_at_us"]),
        "created_at": views.ts(row["created_at_us"]), "metadata": loads(row["metadata"]),
    }
    if account is not None:
        out["balance"] = views.amount(account.spendable(), precision)
    if entries is not None:
        out["entries"] = [views.ledger_entry(e, precision) for e in entries]
    return out


def reserve(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    features = Features(tx, ctx.env_id)
    feature = metered(features, data["feature_key"])
    units = to_minor(data["units"], feature.precision, "units")
    charged, amount = cost(features, feature, units)
    ttl = DEFAULT_TTL_SECONDS if data.get("ttl_seconds") is None else _ttl(data["ttl_seconds"])
    end_user_id = data["end_user_id"]
    sub = ensure_subscription(tx, ctx, end_user_id)
    terms = plan_terms(tx, sub and sub["variant_id"], feature)
    terms.require_enabled(feature)
    unlimited = terms.unlimited
    reservation_id = new_id("rsv")
    account = Account(tx, ctx, end_user_id, charged.key, charged.precision)
    entries: list[dict[str, Any]] = []
    if not unlimited and amount > 0:
        draw = account.hold(amount, reservation_id)
        if draw.shortfall:
            raise InsufficientBalance(
                f"{end_user_id} has {views.amount(account.spendable(), charged.precision)} {charged.key}, "
                f"this reservation needs {views.amount(amount, charged.precision)}", "units")
        entries = draw.entries
    row = {
        "id": reservation_id, "env_id": ctx.env_id, "end_user_id": end_user_id, "feature_key": feature.key,
        "charged_feature_key": charged.key, "units": units, "amount": 0 if unlimited else amount,
        "committed_amount": 0, "status": "held", "expires_at_us": ctx.now_us + ttl * US_PER_SECOND,
        "metadata": dumps(data.get("metadata") or {}), "created_at_us": ctx.now_us, "ended_at_us": None,
    }
    tx.insert("reservations", row)
    return view(tx, ctx, row, account, entries)


def _held(tx: Tx, ctx: Ctx, reservation_id: str) -> tuple[Row, Account]:
    """The reservation, settled to now, and its account; InvalidState unless still held."""
    row = tx.get("reservations", env_id=ctx.env_id, id=reservation_id)
    if row is None:
        raise NotFound(f"no reservation {reservation_id!r}")
    ensure_subscription(tx, ctx, row["end_user_id"])
    features = Features(tx, ctx.env_id)
    account = Account(tx, ctx, row["end_user_id"], row["charged_feature_key"],
                      features.precision(row["charged_feature_key"]))
    row = tx.get("reservations", id=reservation_id)
    assert row is not None
    if row["status"] != "held":
        raise InvalidState(f"reservation {reservation_id} is {row['status']}, not held")
    return row, account


def commit(tx: Tx, ctx: Ctx, reservation_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """Charge the actual cost; ``final`` (default) releases the rest.

    Committing more than is held draws the excess from the free balance; if that is not enough
    either, nothing changes and the answer is 402.
    """
    row, account = _held(tx, ctx, reservation_id)
    features = Features(tx, ctx.env_id)
    feature = features.require(row["feature_key"])
    units = to_minor(data["units"], feature.precision, "units", allow_zero=True)
    _, amount = cost(features, feature, units)
    final = data.get("final", True) is not False
    held = sum(h["amount"] for h in tx.holds_of(reservation_id))
    sub = tx.live_subscription(ctx.env_id, row["end_user_id"])
    terms = plan_terms(tx, sub and sub["variant_id"], feature)
    # A reservation made under an unlimited entitlement holds nothing and charges nothing.
    unlimited = row["amount"] == 0 and held == 0 and row["committed_amount"] == 0 and terms.unlimited
    usage_id = new_id("use")
    entries: list[dict[str, Any]] = []
    overage = 0
    if not unlimited:
        excess = max(0, amount - held)
        if excess:
            allow = terms.allow_overage
            draw = account.draw(excess, usage_id=usage_id, reservation_id=reservation_id, partial=allow,
                                reason="commit beyond the reservation")
            if draw.shortfall and not allow:
                raise InsufficientBalance(
                    f"the reservation holds {views.amount(held, account.precision)} and the free balance is "
                    f"{views.amount(account.spendable(), account.precision)}; the commit needs "
                    f"{views.amount(amount, account.precision)}", "units")
            entries += draw.entries
            overage = draw.shortfall
        entries += account.commit_holds(reservation_id, min(amount, held), usage_id)
        if final:
            entries += account.release_holds(reservation_id, reason="rest of a final commit")
    values: dict[str, Any] = {"committed_amount": row["committed_amount"] + amount}
    if final:
        values |= {"status": "committed", "ended_at_us": ctx.now_us}
    tx.update("reservations", {"id": reservation_id}, values)
    tx.insert("usage_events", {
        "id": usage_id, "env_id": ctx.env_id, "end_user_id": row["end_user_id"], "feature_key": row["feature_key"],
        "charged_feature_key": row["charged_feature_key"], "units": units, "amount": amount, "overage": overage,
        "timestamp_us": ctx.now_us, "metadata": "{}", "created_at_us": ctx.now_us, "reservation_id": reservation_id,
    })
    updated = tx.get("reservations", id=reservation_id)
    assert updated is not None
    return view(tx, ctx, updated, account, entries) | {"usage_id": usage_id}


def release(tx: Tx, ctx: Ctx, reservation_id: str) -> dict[str, Any]:
    """Release everything still held: no outcome, no charge."""
    _, account = _held(tx, ctx, reservation_id)
    entries = account.release_holds(reservation_id, reason="released")
    tx.update("reservations", {"id": reservation_id}, {"status": "released", "ended_at_us": ctx.now_us})
    updated = tx.get("reservations", id=reservation_id)
    assert updated is not None
    return view(tx, ctx, updated, account, entries)


def extend(tx: Tx, ctx: Ctx, reservation_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """Move ``expires_at`` to ``ttl_seconds`` from now."""
    _, account = _held(tx, ctx, reservation_id)
    ttl = _ttl(data.get("ttl_seconds"))
    tx.update("reservations", {"id": reservation_id}, {"expires_at_us": ctx.now_us + ttl * US_PER_SECOND})
    updated = tx.get("reservations", id=reservation_id)
    assert updated is not None
    return view(tx, ctx, updated, account)


def get(tx: Tx, ctx: Ctx, reservation_id: str) -> dict[str, Any]:
    """A reservation as of now: one past its ``expires_at`` reads ``expired`` even before the sweep."""
    row = tx.get("reservations", env_id=ctx.env_id, id=reservation_id)
    if row is None:
        raise NotFound(f"no reservation {reservation_id!r}")
    return as_of_now(tx, ctx, row)


def as_of_now(tx: Tx, ctx: Ctx, row: Row) -> dict[str, Any]:
    out = view(tx, ctx, row)
    if row["status"] == "held" and row["expires_at_us"] <= ctx.now_us:
        out |= {"status": "expired", "held": views.amount(0, 0), "ended_at": out["expires_at"]}
    return out
