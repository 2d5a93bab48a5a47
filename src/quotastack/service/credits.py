"""Grants, voids, pack purchases and balances."""

from __future__ import annotations

from typing import Any

from ..domain import periods
from ..domain.amounts import to_minor
from ..domain.errors import InsufficientBalance, InvalidRequest, InvalidState, NotFound
from ..domain.periods import Duration
from . import views
from .accounts import Account
from .catalog import GRANT_PRIORITY, duration, pack_price
from .codec import loads
from .context import Ctx
from .features import Feature, Features
from .ports import Tx
from .subscriptions import capped, ensure_subscription


def grantable(features: Features, key: str, param: str = "feature_key") -> Feature:
    feature = features.require(key, param)
    if feature.type != "metered":
        raise InvalidRequest(f"{key} is a boolean feature: it has no balance", param)
    if feature.credit_pool is not None:
        raise InvalidRequest(f"{key} draws on the credit pool {feature.credit_pool}: grant that instead",
                             param)
    return feature


def plan_cap(tx: Tx, variant_id: str | None, feature_key: str) -> int | None:
    if variant_id is None:
        return None
    ent = tx.entitlement(variant_id, feature_key)
    return None if ent is None else ent["max_balance"]


def grant(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    features = Features(tx, ctx.env_id)
    feature = grantable(features, data["feature_key"])
    amount = to_minor(data["amount"], feature.precision, "amount")
    effective_at_us = ctx.now_us
    if data.get("effective_at") is not None:
        effective_at_us = periods.parse_rfc3339(data["effective_at"], "effective_at")
    if data.get("expires_at") is not None and data.get("expires_after") is not None:
        raise InvalidRequest("give expires_at or expires_after, not both", "expires_after")
    expires_at_us = None
    if data.get("expires_at") is not None:
        expires_at_us = periods.parse_rfc3339(data["expires_at"], "expires_at")
    elif data.get("expires_after") is not None:
        span = duration(data["expires_after"], "expires_after")
        assert span is not None
        expires_at_us = periods.after(max(effective_at_us, ctx.now_us), span, periods.zone("UTC"))
    if expires_at_us is not None and expires_at_us <= max(effective_at_us, ctx.now_us):
        raise InvalidRequest("expires_at must be after now and after effective_at", "expires_at")
    sub = ensure_subscription(tx, ctx, data["end_user_id"])
    account = Account(tx, ctx, data["end_user_id"], feature.key, feature.precision)
    source = data.get("source") or "manual"
    granted, reason = amount, None
    if source != "purchase":
        granted, reason = capped(account, amount, plan_cap(tx, sub and sub["variant_id"], feature.key))
    if granted == 0:
        raise InvalidState(f"{reason}: the balance is at its max_balance", "amount")
    row = account.grant(granted, priority=GRANT_PRIORITY if data.get("priority") is None else data["priority"],
                        effective_at_us=effective_at_us, expires_at_us=expires_at_us, source=source,
                        metadata=data.get("metadata"), reason=reason)
    return views.block(row, feature.precision) | {"requested_amount": views.amount(amount, feature.precision)}


def get_block(tx: Tx, ctx: Ctx, block_id: str) -> dict[str, Any]:
    block = tx.get("blocks", env_id=ctx.env_id, id=block_id)
    if block is None:
        raise NotFound(f"no credit block {block_id!r}")
    return views.block(block, Features(tx, ctx.env_id).precision(block["feature_key"]))


def void(tx: Tx, ctx: Ctx, block_id: str) -> dict[str, Any]:
    block = tx.get("blocks", env_id=ctx.env_id, id=block_id)
    if block is None:
        raise NotFound(f"no credit block {block_id!r}")
    features = Features(tx, ctx.env_id)
    precision = features.precision(block["feature_key"])
    tx.lock_end_user(ctx.env_id, block["end_user_id"], ctx.now_us)
    account = Account(tx, ctx, block["end_user_id"], block["feature_key"], precision)
    row = account.rows.get(block_id)
    if row is None:
        current = tx.get("blocks", id=block_id)
        assert current is not None
        raise InvalidState(f"credit block {block_id} is {current['status']}")
    account.void(row, reason="voided")
    return views.block(row, precision)


def purchase_pack(tx: Tx, ctx: Ctx, key: str, data: dict[str, Any]) -> dict[str, Any]:
    pack = tx.get("packs", env_id=ctx.env_id, key=key)
    if pack is None:
        raise NotFound(f"no pack {key!r}")
    features = Features(tx, ctx.env_id)
    feature = features.require(pack["feature_key"])
    end_user_id = data["end_user_id"]
    ensure_subscription(tx, ctx, end_user_id)
    paid: dict[str, Any] = {"pay_with": data.get("pay_with") or "external"}
    if paid["pay_with"] == "wallet":
        price = pack_price(pack)
        if price is None:
            raise InvalidRequest(f"pack {key} has no price to pay from a wallet", "pay_with")
        wallet = wallet_feature(tx, ctx, price["currency"])
        cost = to_minor(price["amount"], wallet.precision, "price.amount", allow_zero=True)
        if cost > 0:
            account = Account(tx, ctx, end_user_id, wallet.key, wallet.precision)
            draw = account.draw(cost, reason=f"pack purchase: {key}")
            if draw.shortfall:
                raise InsufficientBalance(
                    f"the {wallet.key} wallet holds {views.amount(account.spendable(), wallet.precision)}, "
                    f"the pack costs {price['amount']}")
            paid["wallet_feature_key"] = wallet.key
            paid["wallet_entries"] = [views.ledger_entry(e, wallet.precision) for e in draw.entries]
    expires_after = Duration.from_dict(loads(pack["expires_after"]))
    expires_at_us = periods.after(ctx.now_us, expires_after, periods.zone("UTC")) if expires_after else None
    account = Account(tx, ctx, end_user_id, feature.key, feature.precision)
    row = account.grant(pack["amount"], priority=pack["priority"], effective_at_us=ctx.now_us,
                        expires_at_us=expires_at_us, source="purchase",
                        metadata={"pack_key": key}, reason=f"pack {key}")
    return views.block(row, feature.precision) | {"pack_key": key, "payment": paid}


def wallet_feature(tx: Tx, ctx: Ctx, currency: str) -> Feature:
    """The metered feature whose unit is ``currency``: the end user's prepaid wallet."""
    row = tx.get("features", env_id=ctx.env_id, unit=currency, type="metered")
    if row is None:
        raise InvalidRequest(f"no wallet feature: create a metered feature with unit {currency!r}",
                             "pay_with")
    return Feature.from_row(row)


def balances(tx: Tx, ctx: Ctx, end_user_id: str, feature_key: str | None,
             at_us: int | None) -> dict[str, Any]:
    """Every metered feature the end user holds or is entitled to, settled to now."""
    features = Features(tx, ctx.env_id)
    if feature_key is not None:
        grantable(features, feature_key)
    sub = ensure_subscription(tx, ctx, end_user_id)
    keys: list[str] = []
    unlimited: set[str] = set()
    for ent in tx.entitlements_of(sub["variant_id"]) if sub is not None else []:
        feature = features.find(ent["feature_key"])
        if feature and feature.type == "metered" and feature.credit_pool is None:
            keys.append(feature.key)
        if ent["unlimited"]:
            unlimited.add(ent["feature_key"])
    for block in tx.balances_at(ctx.env_id, end_user_id, at_us if at_us is not None else ctx.now_us):
        if block["feature_key"] not in keys:
            keys.append(block["feature_key"])
    if feature_key is not None:
        keys = [feature_key]
    data = []
    for key in keys:
        precision = features.precision(key)
        account = Account(tx, ctx, end_user_id, key, precision)
        frozen = sum(r["remaining"] for r in account.rows.values() if r["status"] == "frozen")
        if at_us is None or at_us >= ctx.now_us:
            at = ctx.now_us if at_us is None else at_us
            rows = [r for r in account.rows.values() if r["status"] == "active"
                    and r["effective_at_us"] <= at and (r["expires_at_us"] is None or r["expires_at_us"] > at)]
            reserved = account.reserved
        else:
            rows = [dict(r) for r in tx.balances_at(ctx.env_id, end_user_id, at_us) if r["feature_key"] == key]
            reserved = tx.reserved_at(ctx.env_id, end_user_id, key, at_us)
        rows = [r for r in rows if r["remaining"] > 0]
        balance = sum(r["remaining"] for r in rows)
        data.append({
            "feature_key": key, "balance": views.amount(balance, precision),
            "reserved": views.amount(reserved, precision), "unlimited": key in unlimited,
            "frozen": views.amount(frozen if at_us is None or at_us >= ctx.now_us else 0, precision),
            "blocks": [_block_summary(r, precision) for r in rows],
        })
    return {"object": "balances", "end_user_id": end_user_id,
            "at": views.ts(at_us if at_us is not None else ctx.now_us), "data": data}


def _block_summary(row: dict[str, Any], precision: int) -> dict[str, Any]:
    return {"id": row["id"], "remaining": views.amount(row["remaining"], precision),
            "original_amount": views.amount(row["original_amount"], precision),
            "priority": row["priority"], "effective_at": views.ts(row["effective_at_us"]),
            "expires_at": views.ts(row["expires_at_us"]), "source": row["source"]}
