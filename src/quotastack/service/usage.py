"""Recording usage: draw the cost from the balance, or record overage, or refuse with nothing done."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ..domain import periods
from ..domain.amounts import MAX_MINOR, scale_round, to_minor
from ..domain.errors import InsufficientBalance, InvalidAmount, InvalidRequest
from ..domain.ids import new_id
from ..domain.pricing import Tier, price
from . import views
from .accounts import Account
from .codec import dumps, loads
from .context import Ctx
from .features import Feature, Features
from .ports import Row, Tx
from .subscriptions import ensure_subscription


def cost(features: Features, feature: Feature, units: int) -> tuple[Feature, int]:
    """The feature whose balance pays for ``units`` of ``feature``, and how much it pays."""
    charged = features.charged(feature)
    if charged is feature:
        return feature, units
    assert feature.credits_per_unit is not None
    amount = scale_round(units, feature.precision, feature.credits_per_unit, charged.precision)
    if amount > MAX_MINOR:
        raise InvalidAmount("units × credits_per_unit is out of range", "units")
    return charged, amount


def plan_terms(tx: Tx, variant_id: str | None, feature: Feature) -> tuple[Row | None, Row | None]:
    """The plan's entitlement rows for ``feature`` and for the pool it draws on."""
    if variant_id is None:
        return None, None
    own = tx.entitlement(variant_id, feature.key)
    pool = tx.entitlement(variant_id, feature.credit_pool) if feature.credit_pool else None
    return own, pool


def metered(features: Features, key: str) -> Feature:
    feature = features.require(key)
    if feature.type != "metered":
        raise InvalidRequest(f"{feature.key} is a boolean feature: usage is recorded for metered ones",
                             "feature_key")
    return feature


def record_usage(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    features = Features(tx, ctx.env_id)
    feature = metered(features, data["feature_key"])
    units = to_minor(data["units"], feature.precision, "units")
    charged, amount = cost(features, feature, units)
    timestamp_us = ctx.now_us
    if data.get("timestamp") is not None:
        timestamp_us = periods.parse_rfc3339(data["timestamp"], "timestamp")
    end_user_id = data["end_user_id"]
    sub = ensure_subscription(tx, ctx, end_user_id)
    own, pool = plan_terms(tx, sub and sub["variant_id"], feature)
    if own is not None and not own["enabled"]:
        raise InsufficientBalance(f"{feature.key} is disabled on the end user's plan", "feature_key")
    unlimited = bool((own and own["unlimited"]) or (pool and pool["unlimited"]))
    terms = own if own is not None and own["amount"] is not None else pool or own
    allow_overage = terms is not None and terms["overage"] == "allow"
    usage_id = new_id("use")
    account = Account(tx, ctx, end_user_id, charged.key, charged.precision)
    entries: list[dict[str, Any]] = []
    overage = 0
    if not unlimited and amount > 0:
        draw = account.draw(amount, usage_id=usage_id, partial=allow_overage)
        if draw.shortfall and not allow_overage:
            raise InsufficientBalance(
                f"{end_user_id} has {views.amount(account.spendable(), charged.precision)} "
                f"{charged.key}, this usage needs {views.amount(amount, charged.precision)}", "units")
        entries, overage = draw.entries, draw.shortfall
    row = {
        "id": usage_id, "env_id": ctx.env_id, "end_user_id": end_user_id, "feature_key": feature.key,
        "charged_feature_key": charged.key, "units": units, "amount": amount, "overage": overage,
        "timestamp_us": timestamp_us, "metadata": dumps(data.get("metadata") or {}),
        "created_at_us": ctx.now_us,
    }
    tx.insert("usage_events", row)
    return {
        "id": usage_id, "object": "usage", "end_user_id": end_user_id, "feature_key": feature.key,
        "units": views.amount(units, feature.precision),
        "amount": views.amount(amount, charged.precision), "charged_feature_key": charged.key,
        "balance": None if unlimited else views.amount(account.spendable(), charged.precision),
        "overage": views.amount(overage, charged.precision), "unlimited": unlimited,
        "timestamp": views.ts(timestamp_us), "created_at": views.ts(ctx.now_us),
        "metadata": data.get("metadata") or {},
        "entries": [views.ledger_entry(e, charged.precision) for e in entries],
    }


def summary(tx: Tx, ctx: Ctx, end_user_id: str, feature_key: str, from_us: int | None,
            to_us: int | None) -> dict[str, Any]:
    """Units used, included and over the allowance in ``[from, to)``, priced by the plan's tiers."""
    features = Features(tx, ctx.env_id)
    feature = features.require(feature_key)
    charged = features.charged(feature)
    sub = tx.live_subscription(ctx.env_id, end_user_id)
    if from_us is None and sub is not None:
        from_us = sub["current_period_start_us"]
    if to_us is None:
        to_us = sub["current_period_end_us"] if sub is not None else ctx.now_us
    totals = tx.usage_totals(ctx.env_id, end_user_id, feature.key, from_us, to_us)
    units = views.amount(totals["units"], feature.precision) or Decimal(0)
    overage_credits = views.amount(totals["overage"], charged.precision) or Decimal(0)
    overage_units = overage_credits if charged is feature else overage_credits / (feature.credits_per_unit or 1)
    result: dict[str, Any] = {
        "object": "usage_summary", "end_user_id": end_user_id, "feature_key": feature.key,
        "from": views.ts(from_us), "to": views.ts(to_us), "events": totals["events"],
        "units": units, "included_units": units - overage_units, "overage_units": overage_units,
        "pricing": None,
    }
    own, pool = plan_terms(tx, sub and sub["variant_id"], feature)
    terms = own if own is not None and own["pricing"] else pool
    pricing = loads(terms["pricing"]) if terms is not None and terms["pricing"] else None
    if pricing:
        tiers = [Tier(Decimal(t["up_to"]) if t["up_to"] is not None else None, Decimal(t["unit_price"]))
                 for t in pricing["tiers"]]
        total, rows = price(pricing["mode"], tiers, overage_units)
        result["pricing"] = {"mode": pricing["mode"], "currency": pricing["currency"], "amount": total,
                             "tiers": rows}
    return result
