"""The entitlement check: could this end user use this feature now? The hot path.

A check only reads. The one exception is an end user the environment has never seen while it
has a default plan: ``check`` answers ``NEEDS_SUBSCRIPTION``, and the caller runs
``ensure_subscription`` in a write transaction first (once per end user), so that what the
check reports is what the ledger holds.
"""

from __future__ import annotations

from typing import Any, Final

from ..domain.amounts import to_minor
from ..domain.periods import Duration
from . import views
from .codec import loads
from .context import Ctx
from .features import Features
from .ports import Row, Tx
from .subscriptions import window_of
from .usage import cost, plan_terms

NEEDS_SUBSCRIPTION: Final = object()


def check(tx: Tx, ctx: Ctx, end_user_id: str, feature_key: str, units: object = 1) -> Any:
    features = Features(tx, ctx.env_id)
    result: dict[str, Any] = {
        "allowed": False, "balance": None, "end_user_id": end_user_id, "feature_key": feature_key,
        "unlimited": False, "reason": None, "resets_at": None, "units": None,
    }
    feature = features.find(feature_key)
    if feature is None:
        result["reason"] = "unknown_feature"
        return result
    units_minor = to_minor(units, feature.precision, "units")
    result["units"] = views.amount(units_minor, feature.precision)
    sub = tx.live_subscription(ctx.env_id, end_user_id)
    if sub is None and tx.default_variant(ctx.env_id) is not None:
        return NEEDS_SUBSCRIPTION
    own, pool = plan_terms(tx, sub and sub["variant_id"], feature)
    if feature.type == "boolean":
        result["allowed"] = bool(own and own["enabled"])
        result["reason"] = None if result["allowed"] else "feature_disabled" if own else "no_entitlement"
        return result
    if own is not None and not own["enabled"]:
        result["reason"] = "feature_disabled"
        return result
    if (own and own["unlimited"]) or (pool and pool["unlimited"]):
        result.update(allowed=True, unlimited=True)
        return result
    charged, amount = cost(features, feature, units_minor)
    terms = own if own is not None and own["amount"] is not None else pool or own
    balance = tx.spendable(ctx.env_id, end_user_id, charged.key, ctx.now_us)
    result["balance"] = views.amount(balance, charged.precision)
    if charged is not feature:
        result["credit_pool"] = charged.key
        result["amount"] = views.amount(amount, charged.precision)
    if terms is not None and sub is not None:
        result["resets_at"] = _resets_at(sub, terms, ctx.now_us)
    if balance >= amount or (terms is not None and terms["overage"] == "allow"):
        result["allowed"] = True
        if balance < amount:
            result["overage"] = True
    else:
        result["reason"] = "no_entitlement" if terms is None and balance == 0 else "insufficient_balance"
    return result


def _resets_at(sub: Row, terms: Row, now_us: int) -> str | None:
    if terms["amount"] is None:
        return None
    reset = Duration.from_dict(loads(terms["reset"]))
    return views.ts(window_of(sub, reset, now_us)[1])


def entitlements(tx: Tx, ctx: Ctx, end_user_id: str) -> Any:
    """The check, for units of 1, of every feature of the environment."""
    out = []
    for row in tx.page("features", ctx.env_id, {}, 10_000, None):
        item = check(tx, ctx, end_user_id, row["key"])
        if item is NEEDS_SUBSCRIPTION:
            return NEEDS_SUBSCRIPTION
        out.append(item)
    out.reverse()
    return {"object": "list", "end_user_id": end_user_id, "data": out}
