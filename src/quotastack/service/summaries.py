"""Usage summaries: units used, included and over the allowance, priced by the plan's tiers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ..domain.pricing import Tier, price
from . import views
from .codec import loads
from .context import Ctx
from .features import Features, plan_terms
from .ports import Tx


def summary(tx: Tx, ctx: Ctx, end_user_id: str, feature_key: str, from_us: int | None,
            to_us: int | None, variant_id: str | None = None) -> dict[str, Any]:
    """What was used in ``[from, to)``, what the allowance covered, and the overage, priced.

    For a feature with its own balance, every usage charged to it counts, including that of the
    features drawing on it as a credit pool; its units are its credits. For a feature drawing on a
    pool, ``units`` are its own and the overage is in the pool's credits (``overage_amount``):
    converting credits back to units would not be exact. Pricing applies to the overage of the
    feature whose terms carry it.
    """
    features = Features(tx, ctx.env_id)
    feature = features.require(feature_key)
    charged = features.charged(feature)
    sub = tx.live_subscription(ctx.env_id, end_user_id)
    if from_us is None and sub is not None:
        from_us = sub["current_period_start_us"]
    if to_us is None:
        to_us = sub["current_period_end_us"] if sub is not None else ctx.now_us
    pooled = charged is not feature
    totals = tx.usage_totals(ctx.env_id, end_user_id, feature.key, from_us, to_us, charged_to=not pooled)
    units = views.amount(totals["units"], feature.precision) or Decimal(0)
    amount = views.amount(totals["amount"], charged.precision) or Decimal(0)
    overage = views.amount(totals["overage"], charged.precision) or Decimal(0)
    result: dict[str, Any] = {
        "object": "usage_summary", "end_user_id": end_user_id, "feature_key": feature.key,
        "from": views.ts(from_us), "to": views.ts(to_us), "events": totals["events"],
        "units": amount if not pooled else units,
        "included_units": None if pooled else amount - overage,
        "overage_units": None if pooled else overage,
        "charged_feature_key": charged.key, "amount": amount, "overage_amount": overage, "pricing": None,
    }
    terms = plan_terms(tx, variant_id or (sub and sub["variant_id"]), feature).priced
    pricing = loads(terms["pricing"]) if terms is not None and terms["pricing"] else None
    if pricing:
        tiers = [Tier(Decimal(t["up_to"]) if t["up_to"] is not None else None, Decimal(t["unit_price"]))
                 for t in pricing["tiers"]]
        total, rows = price(pricing["mode"], tiers, overage)
        result["pricing"] = {"mode": pricing["mode"], "currency": pricing["currency"], "amount": total,
                             "tiers": rows}
    return result
