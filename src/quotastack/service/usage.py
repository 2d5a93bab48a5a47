"""Recording usage: draw the cost from the balance, or record overage, or refuse with nothing done."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..domain import periods
from ..domain.amounts import to_minor
from ..domain.errors import InsufficientBalance, QuotaStackError
from ..domain.ids import new_id
from . import views
from .accounts import Account, Loaded, Pending, load_accounts
from .codec import dumps
from .context import Ctx
from .features import Feature, Features, Terms, cost, feature_in, metered, plan_terms, terms_in
from .ports import Row, Tx
from .subscriptions import ensure_subscription, needs_no_write


@dataclass(frozen=True, slots=True)
class Usage:
    """One usage event, checked and priced; nothing read or written for the end user yet."""

    end_user_id: str
    feature: Feature
    charged: Feature  # the feature whose balance pays: ``feature`` or its credit pool
    units: int
    amount: int
    timestamp_us: int
    metadata: Any


# What ``prepare`` makes of a feature key and units: (feature, charged feature, units, amount).
Priced = tuple[Feature, Feature, int, int]


def prepare(features: Features, ctx: Ctx, data: dict[str, Any],
            priced: dict[tuple[Any, ...], Priced] | None = None) -> Usage:
    """``data`` checked and priced. ``priced`` keeps the pricing of each feature key and units
    within one unit of work (a batch's events mostly repeat a few): it depends on nothing else."""
    units_in = data["units"]
    memo = None
    if priced is not None and type(units_in) in (int, str, Decimal):
        memo = (data["feature_key"], type(units_in), units_in)
        known = priced.get(memo)
        if known is not None:
            return _usage(ctx, data, *known)
    feature = metered(features, data["feature_key"])
    units = to_minor(units_in, feature.precision, "units")
    charged, amount = cost(features, feature, units)
    if memo is not None:
        priced[memo] = (feature, charged, units, amount)
    return _usage(ctx, data, feature, charged, units, amount)


def _usage(ctx: Ctx, data: dict[str, Any], feature: Feature, charged: Feature, units: int, amount: int) -> Usage:
    timestamp_us = ctx.now_us
    if data.get("timestamp") is not None:
        timestamp_us = periods.parse_rfc3339(data["timestamp"], "timestamp")
    return Usage(data["end_user_id"], feature, charged, units, amount, timestamp_us, data.get("metadata") or {})


def record_usage(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    """One usage event: lock the end user, read its state in one statement, charge it.

    ``Tx.usage_state`` reads the feature, the subscription, the plan's terms and the account
    together, after the end user's lock. When the subscription has a boundary due, or the end
    user starts on the default plan, those writes come first (``ensure_subscription``, which may
    grant blocks), and the terms and the account are read again after them, as any other
    request does. A refused or invalid usage rolls back with its unit of work (the lock's
    upsert included), so the lock taken before the checks leaves nothing behind.
    """
    end_user_id = data["end_user_id"]
    tx.lock_end_user(ctx.env_id, end_user_id, ctx.now_us)
    state, blocks = tx.usage_state(ctx.env_id, end_user_id, data["feature_key"])
    features = Features(tx, ctx.env_id)
    feature = None if state is None else feature_in(state, "f_")
    features.known(data["feature_key"], feature)
    if feature is not None and feature.credit_pool is not None:
        features.known(feature.credit_pool, feature_in(state, "p_"))  # type: ignore[arg-type]
    usage = prepare(features, ctx, data)
    assert state is not None  # prepare refuses an unknown feature
    sub = None if state["s_id"] is None else {"variant_id": state["s_variant_id"], "next_due_us": state["s_next_due_us"]}
    loaded: Loaded | None = None
    if needs_no_write(sub, bool(state["default_plan"]), ctx.now_us):
        terms = terms_in(state, sub and sub["variant_id"], usage.feature)
        loaded = Loaded(blocks, int(state["held_reserved"] or 0), state["held_first_expiry_us"])
    else:
        sub = ensure_subscription(tx, ctx, end_user_id)
        terms = plan_terms(tx, sub and sub["variant_id"], usage.feature)
    terms.require_enabled(usage.feature)
    account = Account(tx, ctx, end_user_id, usage.charged.key, usage.charged.precision, loaded)
    return charge(tx, ctx, usage, terms, account)


def charge(tx: Tx, ctx: Ctx, usage: Usage, terms: Terms, account: Account) -> dict[str, Any]:
    """Draw ``usage`` from ``account`` (or record its overage) and write its usage event.

    Refused with ``402`` before anything is written when the balance does not cover it and the
    plan does not allow overage. With ``account.pending``, the rows are held back there.
    """
    charged, amount = usage.charged, usage.amount
    unlimited, allow_overage = terms.unlimited, terms.allow_overage
    usage_id = new_id("use")
    entries: list[dict[str, Any]] = []
    overage = 0
    if not unlimited and amount > 0:
        draw = account.draw(amount, usage_id=usage_id, partial=allow_overage)
        if draw.shortfall and not allow_overage:
            raise InsufficientBalance(
                f"{usage.end_user_id} has {views.amount(account.spendable(), charged.precision)} "
                f"{charged.key}, this usage needs {views.amount(amount, charged.precision)}", "units")
        entries, overage = draw.entries, draw.shortfall
    row = {
        "id": usage_id, "env_id": ctx.env_id, "end_user_id": usage.end_user_id, "feature_key": usage.feature.key,
        "charged_feature_key": charged.key, "units": usage.units, "amount": amount, "overage": overage,
        "timestamp_us": usage.timestamp_us, "metadata": dumps(usage.metadata), "created_at_us": ctx.now_us,
    }
    if account.pending is None:
        tx.insert("usage_events", row)
    else:
        account.pending.usage.append(row)
    return {
        "id": usage_id, "object": "usage", "end_user_id": usage.end_user_id, "feature_key": usage.feature.key,
        "units": views.amount(usage.units, usage.feature.precision),
        "amount": views.amount(amount, charged.precision), "charged_feature_key": charged.key,
        "balance": None if unlimited else views.amount(account.spendable(), charged.precision),
        "overage": views.amount(overage, charged.precision), "unlimited": unlimited,
        "timestamp": views.ts(usage.timestamp_us), "created_at": views.ts(ctx.now_us),
        "metadata": usage.metadata,
        "entries": [views.ledger_entry(e, charged.precision) for e in entries],
    }


# What ``record_batch`` says of each event: ("ok", the usage), ("refused", the error) or
# ("slow", whatever the caller's own path for one event returned).
Outcome = tuple[str, Any]


def record_batch(tx: Tx, ctx: Ctx, events: Sequence[tuple[int, str, dict[str, Any] | None]],
                 slow: Callable[[int], Any]) -> dict[int, Outcome]:
    """A batch of usage events, each standing alone, with the same outcome as one by one.

    ``events``: (index, end user, validated event or None) in the order to record them, each
    end user's events together. An end user whose events are all plain (valid, no idempotency
    key) and whose state needs no write before the usage itself (an existing end user whose live
    subscription has nothing due, or who has none and no default plan applies, and whose
    balances have no grant, expiry or reservation expiry due) takes the fast lane: read with the
    batch's other such end users in a handful of statements, charged in memory, its rows written
    with the batch's in one ``executemany`` per table. Every other end user's events go one by
    one through ``slow(index)`` (the caller's single-event path, in its own savepoint), in order.

    A refused event writes nothing in either lane, and the fast lane's end users need no write
    but their usage, so an end user whose events are all refused leaves no trace, as one by one.
    """
    features = Features(tx, ctx.env_id)
    groups: dict[str, list[tuple[int, dict[str, Any] | None]]] = {}
    for i, user, data in events:
        groups.setdefault(user, []).append((i, data))
    prepared: dict[int, Usage] = {}
    priced: dict[tuple[Any, ...], Priced] = {}
    candidates: list[str] = []
    for user, items in groups.items():
        try:
            for i, data in items:
                if data is None or data["end_user_id"] != user:
                    raise LookupError
                prepared[i] = prepare(features, ctx, data, priced)
        except (LookupError, QuotaStackError):
            continue
        candidates.append(user)
    fast = _fast_lane(tx, ctx, candidates, [prepared[i] for user in candidates for i, _ in groups[user]])

    pending = Pending()
    outcomes: dict[int, Outcome] = {}
    terms_of: dict[tuple[str | None, str], Terms] = {}
    accounts: dict[tuple[str, str], Account] = {}
    for user, items in groups.items():
        if user not in fast:
            pending.flush(tx)  # what the single-event path reads must be written first
            for i, _ in items:
                outcomes[i] = ("slow", slow(i))
            continue
        variant_id, loaded = fast[user]
        for i, _ in items:
            usage = prepared[i]
            feature = usage.feature
            if (variant_id, feature.key) not in terms_of:
                terms_of[variant_id, feature.key] = plan_terms(tx, variant_id, feature)
            terms = terms_of[variant_id, feature.key]
            pair = (user, usage.charged.key)
            try:
                terms.require_enabled(feature)
                if pair not in accounts:
                    accounts[pair] = Account(tx, ctx, user, usage.charged.key, usage.charged.precision,
                                             loaded.get(pair) or Loaded(), pending)
                outcomes[i] = ("ok", charge(tx, ctx, usage, terms, accounts[pair]))
            except QuotaStackError as exc:
                outcomes[i] = ("refused", exc)
    pending.flush(tx)
    return outcomes


def _fast_lane(tx: Tx, ctx: Ctx, users: list[str], usages: list[Usage],
               ) -> dict[str, tuple[str | None, dict[tuple[str, str], Loaded]]]:
    """Of ``users``, those that can take the fast lane: each with its plan variant and balances."""
    if not users:
        return {}
    existing = tx.existing_end_users(ctx.env_id, users)
    live: dict[str, Row] = {row["end_user_id"]: row for row in tx.live_subscriptions(ctx.env_id, sorted(existing))
                            } if existing else {}
    has_default: bool | None = None
    eligible: dict[str, str | None] = {}
    for user in users:
        if user not in existing:
            continue  # its first mention creates it: one by one
        sub = live.get(user)
        if sub is None and has_default is None:
            has_default = tx.default_variant(ctx.env_id) is not None
        if needs_no_write(sub, bool(has_default), ctx.now_us):  # else its boundaries first: one by one
            eligible[user] = sub and sub["variant_id"]
    if not eligible:
        return {}
    charged_keys = sorted({u.charged.key for u in usages if u.end_user_id in eligible})
    loaded = load_accounts(tx, ctx.env_id, sorted(eligible), charged_keys)
    out: dict[str, tuple[str | None, dict[tuple[str, str], Loaded]]] = {}
    needed: dict[str, set[str]] = {}
    for u in usages:
        needed.setdefault(u.end_user_id, set()).add(u.charged.key)
    for user, variant_id in eligible.items():
        mine = {(user, key): loaded.get((user, key)) or Loaded() for key in needed[user]}
        if all(Account.is_settled(state, ctx.now_us) for state in mine.values()):
            out[user] = (variant_id, mine)
    return out
