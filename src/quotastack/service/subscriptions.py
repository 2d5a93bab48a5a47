"""Subscriptions over time: create, the default-plan fallback, boundaries, and every transition.

An end user with no live subscription is on the environment's default plan: the first request
that names them (a check, a usage, a grant…) gives them a default-plan subscription, whose
allowances are granted like any other plan's. Creating a paid subscription ends that one, and
when a paid subscription ends the end user falls back to the default plan.

Time is processed on demand. ``next_due_us`` is the earliest boundary not yet processed (the
end of the period, or of an entitlement's reset window); ``advance`` processes every boundary up
to now, in order, inside the request's own transaction, before the request does anything else.
So a check or a usage at a boundary instant sees the new window whether or not the background
sweep has run. The allowed transitions are the table in ``domain/lifecycle.py``.
"""

from __future__ import annotations

from typing import Any

from ..domain import lifecycle, periods
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
from .summaries import summary

PLAN_SOURCES = ("plan", "rollover")


# ---- reading --------------------------------------------------------------------------------------

def _require(tx: Tx, ctx: Ctx, subscription_id: str) -> Row:
    row = tx.get("subscriptions", env_id=ctx.env_id, id=subscription_id)
    if row is None:
        raise NotFound(f"no subscription {subscription_id!r}")
    return row


def get_subscription(tx: Tx, ctx: Ctx, subscription_id: str) -> dict[str, Any]:
    return views.subscription(_require(tx, ctx, subscription_id))


def _reload(tx: Tx, sub: Row) -> Row:
    row = tx.get("subscriptions", id=sub["id"])
    assert row is not None
    return row


def _period(variant_id: str, tx: Tx) -> Duration:
    variant = tx.get("plan_variants", id=variant_id)
    assert variant is not None
    period = Duration.from_dict(loads(variant["billing_period"]))
    assert period is not None
    return period


# ---- create, and the default plan ----------------------------------------------------------------

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
        live = advance(tx, ctx, live)
    if live is not None:
        if not live["is_default_plan"]:
            raise SubscriptionExists(
                f"end user {end_user_id!r} already has subscription {live['id']} ({live['status']})",
                "end_user_id")
        end_subscription(tx, ctx, live, "canceled", reason="replaced")
    row = start(tx, ctx, end_user_id, variant, start_us, trial, tz_name,
                auto_renew=data.get("auto_renew", True), metadata=data.get("metadata"))
    return views.subscription(row)


def ensure_subscription(tx: Tx, ctx: Ctx, end_user_id: str) -> Row | None:
    """The end user's live subscription, brought up to now; the default plan when there is none.

    Every request that touches an end user's balances calls this first.
    """
    tx.lock_end_user(ctx.env_id, end_user_id, ctx.now_us)
    live = tx.live_subscription(ctx.env_id, end_user_id)
    if live is not None:
        return advance(tx, ctx, live)
    variant = tx.default_variant(ctx.env_id)
    if variant is None:
        return None
    return start(tx, ctx, end_user_id, variant, ctx.now_us, None, "UTC", auto_renew=True, metadata=None)


def needs_no_write(subscription: Row | None, default_plan: bool, now_us: int) -> bool:
    """Whether ``ensure_subscription`` would write nothing for an existing end user whose live
    subscription is ``subscription`` (a row with its ``next_due_us``, or None): one with no
    boundary due by ``now_us``, or none and no default plan to start."""
    if subscription is None:
        return not default_plan
    return subscription["next_due_us"] is None or subscription["next_due_us"] > now_us


def start(tx: Tx, ctx: Ctx, end_user_id: str, variant: Row, start_us: int, trial: Duration | None,
          tz_name: str, *, auto_renew: bool, metadata: Any) -> Row:
    """Insert a live subscription and grant the windows that contain ``ctx.now_us``."""
    plan = tx.get("plans", id=variant["plan_id"])
    assert plan is not None
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
        "metadata": dumps(metadata or {}), "created_at_us": ctx.now_us, "next_due_us": period_end_us,
    }
    tx.insert("subscriptions", row)
    sub = _reload(tx, row)
    for ent in _allowances(tx, sub["variant_id"]):
        window = window_of(sub, Duration.from_dict(loads(ent["reset"])), ctx.now_us)
        grant_window(tx, ctx, sub, ent, *window)
    sub = _reschedule(tx, sub)
    record_event(tx, ctx, "subscription.created", views.subscription(sub))
    return sub


# ---- windows and grants ---------------------------------------------------------------------------

def window_of(sub: Row, reset: Duration | None, at_us: int) -> tuple[int, int]:
    """The reset window of an entitlement that contains ``at_us``.

    Without ``reset`` the window is the billing period. Windows are anchored at the
    subscription's anchor and never outlast a trial.
    """
    if reset is None:
        return sub["current_period_start_us"], sub["current_period_end_us"]
    start_us, end_us = periods.window_containing(sub["anchor_us"], reset, at_us, periods.zone(sub["timezone"]))
    if sub["trial_end_us"] is not None and start_us < sub["trial_end_us"]:
        end_us = min(end_us, sub["trial_end_us"])
    return start_us, end_us


def _allowances(tx: Tx, variant_id: str) -> list[Row]:
    """The variant's entitlements that grant an allowance each window."""
    return [e for e in tx.entitlements_of(variant_id)
            if e["amount"] is not None and e["amount"] > 0 and not e["unlimited"] and e["enabled"]]


def capped(account: Account, amount: int, max_balance: int | None) -> tuple[int, str | None]:
    """How much of ``amount`` a grant may add under the accumulation cap, and why not all."""
    if max_balance is None:
        return amount, None
    room = max(0, max_balance - account.balance - account.reserved)
    if amount <= room:
        return amount, None
    kept, asked = views.amount(amount - room, account.precision), views.amount(amount, account.precision)
    return room, f"max_balance: {kept} of {asked} not granted"


def grant_window(tx: Tx, ctx: Ctx, sub: Row, ent: Row, start_us: int, end_us: int, used: int = 0) -> None:
    """Grant ``ent``'s allowance for the window ``[start, end)``, first rolling over the last one.

    The previous window's allowance expires at ``start``; with ``rollover``, the part of it left
    unused is carried into a rollover block, up to ``max_amount`` held in rollover blocks at
    once. Both grants respect ``max_balance``. ``used``: what the end user already used of this
    window's allowance under an earlier variant (after an immediate change).
    """
    assert start_us <= ctx.now_us
    feature = Features(tx, ctx.env_id).require(ent["feature_key"])
    # Everything due before the boundary first, so ``remaining`` is what was left at it.
    account = Account(tx, ctx.at(start_us - 1), sub["end_user_id"], feature.key, feature.precision)
    unused = sum(r["remaining"] for r in account.rows.values()
                 if r["subscription_id"] == sub["id"] and r["source"] == "plan" and r["status"] == "active"
                 and r["expires_at_us"] == start_us)
    account.ctx = ctx
    account.settle(ctx.now_us)
    rollover = loads(ent["rollover"])
    if rollover is not None and unused > 0:
        carried = sum(r["remaining"] for r in account.rows.values()
                      if r["subscription_id"] == sub["id"] and r["source"] == "rollover" and r["status"] == "active")
        carry, reason = capped(account, min(unused, max(0, rollover["max_amount"] - carried)), ent["max_balance"])
        if carry > 0:
            life = Duration.from_dict(rollover.get("expires_after"))
            expires = periods.after(start_us, life, periods.zone(sub["timezone"])) if life else None
            account.grant(carry, priority=ent["priority"], effective_at_us=start_us, expires_at_us=expires,
                          source="rollover", subscription_id=sub["id"], entry_type="rollover",
                          metadata={"unused": views.amount(unused, feature.precision)},
                          reason=reason or f"rolled over: {views.amount(carry, feature.precision)} of "
                                           f"{views.amount(unused, feature.precision)} unused")
    amount, reason = capped(account, max(0, ent["amount"] - used), ent["max_balance"])
    if amount > 0:
        account.grant(amount, priority=ent["priority"], effective_at_us=start_us, expires_at_us=end_us,
                      source="plan", subscription_id=sub["id"], metadata={"window_start": views.ts(start_us)},
                      reason=reason)
    tx.upsert_window(sub["id"], feature.key, start_us, end_us, used)


def _reschedule(tx: Tx, sub: Row) -> Row:
    """Set ``next_due_us``: the period's end or the first window end, whichever is sooner.

    Windows of features the current variant no longer grants are dropped here: left behind,
    their past end would stay due for ever.
    """
    due = None
    if sub["live"] and sub["status"] in ("trialing", "active"):
        granted = {e["feature_key"] for e in _allowances(tx, sub["variant_id"])}
        ends = []
        for window in tx.windows_of(sub["id"]):
            if window["feature_key"] in granted:
                ends.append(window["window_end_us"])
            else:
                tx.delete_windows(sub["id"], window["feature_key"])
        due = min([sub["current_period_end_us"], *ends])
    tx.update("subscriptions", {"id": sub["id"]}, {"next_due_us": due})
    return _reload(tx, sub)


# ---- time -------------------------------------------------------------------------------------------

def advance(tx: Tx, ctx: Ctx, sub: Row) -> Row | None:
    """Process every boundary of ``sub`` up to now, in order; the live subscription after it."""
    current: Row | None = sub
    while current is not None and current["next_due_us"] is not None and current["next_due_us"] <= ctx.now_us:
        due = current["next_due_us"]
        at = ctx.at(due)
        if due >= current["current_period_end_us"]:
            current = _period_end(tx, at, current)
        else:
            _reset_windows(tx, at, current)
            current = _reschedule(tx, current)
        # Every step moves time forward (or ends the subscription); anything else is a bug that
        # would spin for ever, holding the end user's lock.
        assert current is None or current["id"] != sub["id"] or current["next_due_us"] is None \
            or current["next_due_us"] > due, f"subscription {sub['id']} does not advance past {due}"
    return current


def _reset_windows(tx: Tx, at: Ctx, sub: Row) -> None:
    """Grant the next window of every entitlement whose window ends now."""
    ends = {w["feature_key"]: w["window_end_us"] for w in tx.windows_of(sub["id"])}
    for ent in _allowances(tx, sub["variant_id"]):
        if ends.get(ent["feature_key"], at.now_us) <= at.now_us:
            window = window_of(sub, Duration.from_dict(loads(ent["reset"])), at.now_us)
            grant_window(tx, at, sub, ent, *window)


def _period_end(tx: Tx, at: Ctx, sub: Row, renewing: bool = False) -> Row | None:
    """The end of the current period: renew, end the trial, apply a scheduled change, or end.

    ``renewing``: the tenant asked for the next period now, whatever ``auto_renew`` says.
    """
    t = at.now_us
    _summarise_period(tx, at, sub)
    outcome = "active" if renewing else lifecycle.at_period_end(
        sub["status"], bool(sub["cancel_at_period_end"]), bool(sub["auto_renew"]))
    if outcome in ("canceled", "expired"):
        end_subscription(tx, at, sub, outcome, reason="period end")
        return fall_back(tx, at, sub)
    values: dict[str, Any] = {"status": outcome}
    event = "subscription.renewed"
    change = loads(sub["scheduled_change"])
    variant_id = sub["variant_id"]
    if change is not None:
        variant_id = change["plan_variant_id"]
        values |= _variant_columns(tx, variant_id) | {"scheduled_change": None}
        event = "subscription.updated"
    period = _period(variant_id, tx)
    tz = periods.zone(sub["timezone"])
    if sub["status"] == "trialing":
        values |= {"anchor_us": t, "current_period_start_us": t, "current_period_end_us": periods.after(t, period, tz)}
        event = "subscription.updated"
    else:
        values |= dict(zip(("current_period_start_us", "current_period_end_us"),
                           periods.window_containing(sub["anchor_us"], period, t, tz)))
    tx.update("subscriptions", {"id": sub["id"]}, values)
    sub = _reload(tx, sub)
    _reset_windows(tx, at, sub)
    sub = _reschedule(tx, sub)
    record_event(tx, at, event, views.subscription(sub))
    return sub


def _variant_columns(tx: Tx, variant_id: str) -> dict[str, Any]:
    variant = tx.get("plan_variants", id=variant_id)
    assert variant is not None
    plan = tx.get("plans", id=variant["plan_id"])
    assert plan is not None
    return {"variant_id": variant_id, "plan_id": plan["id"], "is_default_plan": bool(plan["is_default"])}


def _summarise_period(tx: Tx, at: Ctx, sub: Row) -> None:
    """A ``usage.period_summary`` event for each priced feature that went over its allowance."""
    for ent in tx.entitlements_of(sub["variant_id"]):
        if ent["pricing"] is None:
            continue
        result = summary(tx, at, sub["end_user_id"], ent["feature_key"], sub["current_period_start_us"],
                         at.now_us, variant_id=sub["variant_id"])
        if result["overage_units"] > 0:
            record_event(tx, at, "usage.period_summary", result | {"subscription_id": sub["id"]})


def fall_back(tx: Tx, at: Ctx, ended: Row) -> Row | None:
    """After a subscription ends, the end user is on the default plan from that instant."""
    variant = tx.default_variant(at.env_id)
    if variant is None:
        return None
    return start(tx, at, ended["end_user_id"], variant, at.now_us, None, ended["timezone"], auto_renew=True,
                 metadata=None)


def end_subscription(tx: Tx, ctx: Ctx, sub: Row, status: str, reason: str) -> None:
    """End ``sub`` now: its plan and rollover blocks expire and it stops being live."""
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
              {"status": status, "live": False, "ended_at_us": ctx.now_us, "next_due_us": None})
    ended = _reload(tx, sub)
    record_event(tx, ctx, f"subscription.{status}", views.subscription(ended) | {"reason": reason})


# ---- transitions the API asks for -----------------------------------------------------------------

def _current(tx: Tx, ctx: Ctx, subscription_id: str) -> Row:
    """The subscription, locked and brought up to now."""
    sub = _require(tx, ctx, subscription_id)
    tx.lock_end_user(ctx.env_id, sub["end_user_id"], ctx.now_us)
    if sub["live"]:
        advance(tx, ctx, _reload(tx, sub))
    return _reload(tx, sub)


def change(tx: Tx, ctx: Ctx, subscription_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """Move to another variant now (allowances replaced for the current window) or at period end."""
    sub = _current(tx, ctx, subscription_id)
    lifecycle.transition(sub["status"], "change")
    variant = tx.get("plan_variants", env_id=ctx.env_id, id=data["plan_variant_id"])
    if variant is None:
        raise NotFound(f"no plan variant {data['plan_variant_id']!r}", "plan_variant_id")
    if data.get("timing", "immediate") == "period_end":
        scheduled = {"plan_variant_id": variant["id"], "plan_id": variant["plan_id"],
                     "at": views.ts(sub["current_period_end_us"])}
        tx.update("subscriptions", {"id": sub["id"]}, {"scheduled_change": dumps(scheduled)})
    else:
        _replace_allowances(tx, ctx, sub, variant["id"])
        tx.update("subscriptions", {"id": sub["id"]}, _variant_columns(tx, variant["id"]) | {"scheduled_change": None})
        _reschedule(tx, _reload(tx, sub))
    sub = _reload(tx, sub)
    record_event(tx, ctx, "subscription.updated", views.subscription(sub))
    return views.subscription(sub)


def _replace_allowances(tx: Tx, ctx: Ctx, sub: Row, variant_id: str) -> None:
    """The new variant's allowances for the current windows, less what was used in them.

    What was used of a window is carried in ``allowance_windows.used`` across any number of
    changes. Credits held by reservations count as used: released later, they return to the
    allowance block they came from, which the change has ended.
    """
    features = Features(tx, ctx.env_id)
    used = {w["feature_key"]: w["used"] for w in tx.windows_of(sub["id"])}
    for block in tx.subscription_blocks(sub["id"]):
        if block["source"] != "plan":
            continue
        feature_key = block["feature_key"]
        account = Account(tx, ctx, sub["end_user_id"], feature_key, features.precision(feature_key))
        row = account.rows.get(block["id"])
        if row is None or row["status"] != "active":
            continue
        used[feature_key] = used.get(feature_key, 0) + row["original_amount"] - row["remaining"]
        account.expire(row, at_us=ctx.now_us, reason="plan changed")
    tx.delete_windows(sub["id"])
    for ent in _allowances(tx, variant_id):
        window = window_of(sub, Duration.from_dict(loads(ent["reset"])), ctx.now_us)
        grant_window(tx, ctx, sub, {**ent, "rollover": None}, *window, used=used.get(ent["feature_key"], 0))


def pause(tx: Tx, ctx: Ctx, subscription_id: str) -> dict[str, Any]:
    """Freeze the plan's blocks: not spendable, not expiring, not resetting, until resumed."""
    sub = _current(tx, ctx, subscription_id)
    lifecycle.transition(sub["status"], "pause")
    for block in tx.subscription_blocks(sub["id"]):
        if block["status"] == "active":
            tx.update("blocks", {"id": block["id"]}, {"status": "frozen"})
    tx.update("subscriptions", {"id": sub["id"]},
              {"status": "paused", "paused_at_us": ctx.now_us, "next_due_us": None})
    sub = _reload(tx, sub)
    record_event(tx, ctx, "subscription.paused", views.subscription(sub))
    return views.subscription(sub)


def resume(tx: Tx, ctx: Ctx, subscription_id: str) -> dict[str, Any]:
    """Back to active; the period, the windows and every plan block's expiry move later by the pause."""
    sub = _current(tx, ctx, subscription_id)
    lifecycle.transition(sub["status"], "resume")
    paused_us = ctx.now_us - sub["paused_at_us"]
    for block in tx.subscription_blocks(sub["id"]):
        if block["status"] == "frozen":
            expires = None if block["expires_at_us"] is None else block["expires_at_us"] + paused_us
            tx.update("blocks", {"id": block["id"]}, {"status": "active", "expires_at_us": expires})
    tx.shift_windows(sub["id"], paused_us)
    trial_end = None if sub["trial_end_us"] is None else sub["trial_end_us"] + paused_us
    tx.update("subscriptions", {"id": sub["id"]}, {
        "status": lifecycle.resumed_status(trial_end, ctx.now_us), "paused_at_us": None,
        "cancel_at_period_end": False, "anchor_us": sub["anchor_us"] + paused_us, "trial_end_us": trial_end,
        "current_period_start_us": sub["current_period_start_us"] + paused_us,
        "current_period_end_us": sub["current_period_end_us"] + paused_us})
    sub = _reschedule(tx, _reload(tx, sub))
    record_event(tx, ctx, "subscription.resumed", views.subscription(sub))
    return views.subscription(sub)


def cancel(tx: Tx, ctx: Ctx, subscription_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """At period end (default): ``cancel_at_period_end``. Immediately: ended now, default plan next."""
    sub = _current(tx, ctx, subscription_id)
    lifecycle.transition(sub["status"], "cancel")
    if data.get("at", "period_end") == "immediately":
        end_subscription(tx, ctx, sub, "canceled", reason="canceled immediately")
        fall_back(tx, ctx, sub)
    else:
        tx.update("subscriptions", {"id": sub["id"]}, {"cancel_at_period_end": True})
        record_event(tx, ctx, "subscription.updated", views.subscription(_reload(tx, sub)))
    return views.subscription(_reload(tx, sub))


def renew(tx: Tx, ctx: Ctx, subscription_id: str) -> dict[str, Any]:
    """Start the next period now (the tenant's payment went through): a boundary, here and now."""
    sub = _current(tx, ctx, subscription_id)
    lifecycle.transition(sub["status"], "renew")
    now = ctx.now_us
    for block in tx.subscription_blocks(sub["id"]):
        if block["source"] == "plan" and block["status"] == "active":
            tx.update("blocks", {"id": block["id"]}, {"expires_at_us": now})
    tx.end_windows(sub["id"], now)
    trial_end = min(sub["trial_end_us"], now) if sub["trial_end_us"] is not None else None
    tx.update("subscriptions", {"id": sub["id"]}, {
        "anchor_us": now, "current_period_end_us": now, "trial_end_us": trial_end, "cancel_at_period_end": False})
    _period_end(tx, ctx, _reload(tx, sub), renewing=True)
    return views.subscription(_reload(tx, sub))


def advance_due(tx: Tx, ctx: Ctx, limit: int) -> int:
    """Bring every subscription of the environment that is due up to now (the sweep, the clock)."""
    due = tx.due_subscriptions(ctx.env_id, ctx.now_us, limit)
    for row in sorted(due, key=lambda r: r["end_user_id"]):
        tx.lock_end_user(ctx.env_id, row["end_user_id"], ctx.now_us)
        current = _reload(tx, row)
        if current["live"]:
            advance(tx, ctx, current)
    return len(due)
