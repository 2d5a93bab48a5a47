"""Subscriptions: create, read, and the default-plan fallback.

An end user with no live subscription is on the environment's default plan: the first request
that names them (a check, a usage, a grant…) gives them a default-plan subscription, whose
allowances are granted like any other plan's. Creating a paid subscription ends that one.
"""

from __future__ import annotations

from typing import Any

from ..domain import periods
from ..domain.errors import InvalidRequest, NotFound, SubscriptionExists
from ..domain.ids import new_id
from ..domain.periods import Duration
from . import views
from .accounts import Account, record_event
from .catalog import duration
from .codec import dumps, loads
from .context import Ctx
from .features import Features
from .ports import Row, Tx


def get_subscription(tx: Tx, ctx: Ctx, subscription_id: str) -> dict[str, Any]:
    row = tx.get("subscriptions", env_id=ctx.env_id, id=subscription_id)
    if row is None:
        raise NotFound(f"no subscription {subscription_id!r}")
    return views.subscription(row)


def create_subscription(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    variant = tx.get("plan_variants", env_id=ctx.env_id, id=data["plan_variant_id"])
    if variant is None:
        raise NotFound(f"no plan variant {data['plan_variant_id']!r}", "plan_variant_id")
    tz_name = data.get("timezone") or "UTC"
    periods.zone(tz_name)
    start_us = ctx.now_us
    if data.get("start_at") is not None:
        start_us = periods.parse_rfc3339(data["start_at"], "start_at")
        if start_us > ctx.now_us:
            raise InvalidRequest("start_at cannot be in the future", "start_at")
    trial_spec = data.get("trial", None)
    if trial_spec is False:
        trial = None
    elif trial_spec is None or trial_spec is True:
        trial = Duration.from_dict(loads(variant["trial_period"]))
    else:
        trial = duration(trial_spec, "trial")
    end_user_id = data["end_user_id"]
    tx.lock_end_user(ctx.env_id, end_user_id, ctx.now_us)
    live = tx.live_subscription(ctx.env_id, end_user_id)
    if live is not None:
        if not live["is_default_plan"]:
            raise SubscriptionExists(
                f"end user {end_user_id!r} already has subscription {live['id']} ({live['status']})",
                "end_user_id")
        end_subscription(tx, ctx, live, "canceled", reason="replaced")
    plan = tx.get("plans", id=variant["plan_id"])
    assert plan is not None
    row = _start(tx, ctx, end_user_id, plan, variant, start_us, trial, tz_name,
                 auto_renew=data.get("auto_renew", True), metadata=data.get("metadata"))
    return views.subscription(row)


def ensure_subscription(tx: Tx, ctx: Ctx, end_user_id: str) -> Row | None:
    """The end user's live subscription, starting the default plan when there is none."""
    tx.lock_end_user(ctx.env_id, end_user_id, ctx.now_us)
    live = tx.live_subscription(ctx.env_id, end_user_id)
    if live is not None:
        return live
    variant = tx.default_variant(ctx.env_id)
    if variant is None:
        return None
    plan = tx.get("plans", id=variant["plan_id"])
    assert plan is not None
    return _start(tx, ctx, end_user_id, plan, variant, ctx.now_us, None, "UTC", auto_renew=True,
                  metadata=None)


def _start(tx: Tx, ctx: Ctx, end_user_id: str, plan: Row, variant: Row, start_us: int,
           trial: Duration | None, tz_name: str, *, auto_renew: bool, metadata: Any) -> Row:
    tz = periods.zone(tz_name)
    period = Duration.from_dict(loads(variant["billing_period"]))
    assert period is not None
    trial_end_us = periods.after(start_us, trial, tz) if trial else None
    if trial_end_us is not None and trial_end_us > ctx.now_us:
        status, anchor_us = "trialing", start_us
        period_start_us, period_end_us = start_us, trial_end_us
    else:
        status = "active"
        anchor_us = trial_end_us if trial_end_us is not None else start_us
        period_start_us, period_end_us = periods.window_containing(anchor_us, period, ctx.now_us, tz)
    row = {
        "id": new_id("sub"), "env_id": ctx.env_id, "end_user_id": end_user_id, "plan_id": plan["id"],
        "variant_id": variant["id"], "is_default_plan": bool(plan["is_default"]), "status": status,
        "live": True, "anchor_us": anchor_us, "current_period_start_us": period_start_us,
        "current_period_end_us": period_end_us, "trial_end_us": trial_end_us,
        "cancel_at_period_end": False, "paused_at_us": None, "auto_renew": bool(auto_renew),
        "timezone": tz_name, "scheduled_change": None, "ended_at_us": None,
        "metadata": dumps(metadata or {}), "created_at_us": ctx.now_us,
    }
    tx.insert("subscriptions", row)
    grant_allowances(tx, ctx, row, variant["id"])
    record_event(tx, ctx, "subscription.created", views.subscription(row))
    return row


def window_of(sub: Row, reset: Duration | None, at_us: int) -> tuple[int, int]:
    """The reset window of an entitlement that contains ``at_us``.

    Without ``reset`` the window is the billing period. Windows are anchored at the
    subscription's anchor and never outlast a trial.
    """
    if reset is None:
        return sub["current_period_start_us"], sub["current_period_end_us"]
    start, end = periods.window_containing(sub["anchor_us"], reset, at_us, periods.zone(sub["timezone"]))
    if sub["trial_end_us"] is not None and start < sub["trial_end_us"]:
        end = min(end, sub["trial_end_us"])
    return start, end


def grant_allowances(tx: Tx, ctx: Ctx, sub: Row, variant_id: str) -> None:
    """Grant each metered entitlement's allowance for the window that contains now."""
    features = Features(tx, ctx.env_id)
    for ent in tx.entitlements_of(variant_id):
        if ent["amount"] is None or ent["amount"] == 0 or ent["unlimited"] or not ent["enabled"]:
            continue
        feature = features.require(ent["feature_key"])
        start_us, end_us = window_of(sub, Duration.from_dict(loads(ent["reset"])), ctx.now_us)
        account = Account(tx, ctx, sub["end_user_id"], feature.key, feature.precision)
        amount, reason = capped(account, ent["amount"], ent["max_balance"])
        if amount == 0:
            continue
        account.grant(amount, priority=ent["priority"], effective_at_us=start_us,
                      expires_at_us=end_us, source="plan", subscription_id=sub["id"],
                      metadata={"window_start": views.ts(start_us)}, reason=reason)


def capped(account: Account, amount: int, max_balance: int | None) -> tuple[int, str | None]:
    """How much of ``amount`` a grant may add under the accumulation cap, and why not all."""
    if max_balance is None:
        return amount, None
    room = max(0, max_balance - account.balance - account.reserved)
    if amount <= room:
        return amount, None
    return room, f"max_balance: {amount - room} of {amount} not granted"


def end_subscription(tx: Tx, ctx: Ctx, sub: Row, status: str, reason: str) -> None:
    """End ``sub`` now: its plan blocks expire and it stops being live."""
    features = Features(tx, ctx.env_id)
    by_feature: dict[str, list[Row]] = {}
    for block in tx.subscription_blocks(sub["id"]):
        by_feature.setdefault(block["feature_key"], []).append(block)
    for feature_key, blocks in by_feature.items():
        account = Account(tx, ctx, sub["end_user_id"], feature_key, features.precision(feature_key))
        for block in blocks:
            row = account.rows.get(block["id"])
            if row is not None:
                account.expire(row, at_us=ctx.now_us, reason=f"subscription {status}")
    tx.update("subscriptions", {"id": sub["id"]},
              {"status": status, "live": False, "ended_at_us": ctx.now_us})
    ended = tx.get("subscriptions", id=sub["id"])
    assert ended is not None
    record_event(tx, ctx, f"subscription.{status}", views.subscription(ended) | {"reason": reason})
