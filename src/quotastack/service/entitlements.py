"""The entitlement check: could this end user use this feature now? The hot path.

A check only reads, except when its end user's subscription has something due: a boundary
(renewal, a reset window, a trial end) at or before now that no request has processed yet, or an
end user the environment has never seen while it has a default plan. Then ``check`` answers
``NEEDS_WRITE``, and the caller runs ``ensure_subscription`` in a write transaction and checks
again, so that a check at a boundary instant sees the new window and reports exactly what the
ledger holds. That happens once per boundary per end user.
"""

from __future__ import annotations

from typing import Any, Final

from decimal import Decimal
from functools import lru_cache

from ..domain.amounts import MAX_MINOR, scale_round, to_minor
from ..domain.errors import InvalidAmount
from ..domain.periods import Duration
from . import views
from .codec import loads
from .context import Ctx
from .ports import Row, Tx
from .subscriptions import window_of

NEEDS_WRITE: Final = object()


def check(tx: Tx, ctx: Ctx, end_user_id: str, feature_key: str, units: object = 1) -> Any:
    """Could ``end_user_id`` use ``units`` of ``feature_key`` now? Reads one snapshot row."""
    snap = tx.entitlement_snapshot(ctx.env_id, end_user_id, feature_key, ctx.now_us)
    return evaluate(snap, ctx, end_user_id, feature_key, units)


def evaluate(snap: Row | None, ctx: Ctx, end_user_id: str, feature_key: str, units: object = 1) -> Any:
    """The check's answer from its snapshot (``Tx.entitlement_snapshot`` or ``Tx.check_snapshot``)."""
    return _answer(snap, ctx, end_user_id, feature_key, units)[0]


def evaluate_until(snap: Row, ctx: Ctx, end_user_id: str, feature_key: str, units: object = 1,
                   ) -> tuple[Any, int | None]:
    """The answer, and the first instant (the environment's time) at which time alone may change
    it, None when none ahead does. ``snap`` is a ``Tx.check_snapshot(horizon=True)`` row: its
    ``h_*`` columns are the subscription's next boundary, the next block of the charged feature to
    take effect or expire, the next held reservation to expire; an answer that names a
    ``resets_at`` ends there too (a paused subscription, or an allowance of 0, has no boundary due
    though its window moves)."""
    result, window_end = _answer(snap, ctx, end_user_id, feature_key, units)
    instants = [snap[c] for c in ("h_due", "h_blocks", "h_reservation") if snap[c] is not None]
    if window_end is not None:
        instants.append(window_end)
    return result, min(instants, default=None)


def answers(tx: Tx, ctx: Ctx, feature_key: str, after: str, limit: int,
            ) -> tuple[list[tuple[str, Any, int | None]], str | None]:
    """The check's answer for 1 unit of ``feature_key`` now, with its horizon (``evaluate_until``),
    for up to ``limit`` of the environment's end users whose ids sort after ``after``, in id order.
    End users whose check would need a write are left out. Also returns the last id read (the
    next run's ``after``), None when there are no more."""
    rows = tx.check_snapshots(ctx.env_id, feature_key, ctx.now_us, after, limit)
    out = []
    for snap in rows:
        result, until = evaluate_until(snap, ctx, snap["end_user_id"], feature_key)
        if result is not NEEDS_WRITE:
            out.append((snap["end_user_id"], result, until))
    return out, rows[-1]["end_user_id"] if len(rows) == limit else None


def _answer(snap: Row | None, ctx: Ctx, end_user_id: str, feature_key: str, units: object,
            ) -> tuple[Any, int | None]:
    """``evaluate``'s answer, and the end of the window its ``resets_at`` names (or None)."""
    result: dict[str, Any] = {
        "allowed": False, "balance": None, "end_user_id": end_user_id, "feature_key": feature_key,
        "unlimited": False, "reason": None, "resets_at": None, "units": None,
    }
    if snap is None or snap["f_key"] is None:
        result["reason"] = "unknown_feature"
        return result, None
    precision = snap["f_precision"]
    units_minor = to_minor(units, precision, "units")
    result["units"] = views.amount(units_minor, precision)
    if snap["needs_write"]:
        return NEEDS_WRITE, None
    has_own, has_pool = snap["own_enabled"] is not None, snap["pool_enabled"] is not None
    if snap["f_type"] == "boolean":
        result["allowed"] = bool(has_own and snap["own_enabled"])
        result["reason"] = None if result["allowed"] else "feature_disabled" if has_own else "no_entitlement"
        return result, None
    if has_own and not snap["own_enabled"]:
        result["reason"] = "feature_disabled"
        return result, None
    if (has_own and snap["own_unlimited"]) or (has_pool and snap["pool_unlimited"]):
        result.update(allowed=True, unlimited=True)
        return result, None
    amount, charged_precision = units_minor, precision
    if snap["f_pool"] is not None:
        charged_precision = snap["pool_precision"]
        amount = scale_round(units_minor, precision, Decimal(snap["f_rate"]), charged_precision)
        if amount > MAX_MINOR:  # usage refuses it too (usage.cost)
            raise InvalidAmount("units × credits_per_unit is out of range", "units")
        result["credit_pool"] = snap["f_pool"]
        result["amount"] = views.amount(amount, charged_precision)
    # The terms that govern the balance: the feature's own allowance, else its pool's.
    side = "own" if has_own and snap["own_amount"] is not None else "pool" if has_pool else "own" if has_own else None
    balance = int(snap["free"]) + int(snap["returned"])
    result["balance"] = views.amount(balance, charged_precision)
    window_end = None
    if side is not None and snap["sub_id"] is not None and snap[f"{side}_amount"] is not None:
        window_end = window_of(snap, _duration(snap[f"{side}_reset"]), ctx.now_us)[1]
        result["resets_at"] = views.ts(window_end)
    allow_overage = side is not None and snap[f"{side}_overage"] == "allow"
    if balance >= amount or allow_overage:
        result["allowed"] = True
        if balance < amount:
            result["overage"] = True
    elif snap["sub_status"] == "paused" and side is not None:
        result["reason"] = "subscription_paused"
    else:
        result["reason"] = "no_entitlement" if side is None and balance == 0 else "insufficient_balance"
    return result, window_end


@lru_cache(maxsize=4096)
def _duration(text: str | None) -> Duration | None:
    return Duration.from_dict(loads(text))


def entitlements(tx: Tx, ctx: Ctx, end_user_id: str) -> Any:
    """The check, for units of 1, of every feature of the environment."""
    out = []
    for row in tx.page("features", ctx.env_id, {}, 10_000, None):
        item = check(tx, ctx, end_user_id, row["key"])
        if item is NEEDS_WRITE:
            return NEEDS_WRITE
        out.append(item)
    out.reverse()
    return {"object": "list", "end_user_id": end_user_id, "data": out}
