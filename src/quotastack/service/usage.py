"""Recording usage: draw the cost from the balance, or record overage, or refuse with nothing done."""

from __future__ import annotations

from typing import Any

from ..domain import periods
from ..domain.amounts import to_minor
from ..domain.errors import InsufficientBalance
from ..domain.ids import new_id
from . import views
from .accounts import Account
from .codec import dumps
from .context import Ctx
from .features import Features, cost, metered, plan_terms
from .ports import Tx
from .subscriptions import ensure_subscription


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
    terms = plan_terms(tx, sub and sub["variant_id"], feature)
    terms.require_enabled(feature)
    unlimited, allow_overage = terms.unlimited, terms.allow_overage
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
