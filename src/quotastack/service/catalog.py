"""Features, plans, plan variants and top-up packs."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ..domain.amounts import to_decimal, to_minor
from ..domain.errors import InvalidAmount, InvalidRequest, NotFound
from ..domain.ids import new_id
from ..domain.periods import Duration
from . import views
from .codec import dumps, loads
from .context import Ctx
from .features import Feature, Features
from .ports import Row, Tx

PLAN_PRIORITY = 100
GRANT_PRIORITY = 100


def duration(data: dict[str, Any] | None, param: str) -> Duration | None:
    if data is None:
        return None
    try:
        return Duration(data["every"], data["unit"])
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, f"{param}.{exc.param}") from None


def _price(data: dict[str, Any] | None, param: str) -> str | None:
    if data is None:
        return None
    value = to_decimal(data["amount"], f"{param}.amount")
    if value < 0:
        raise InvalidAmount(f"{param}.amount must not be negative", f"{param}.amount")
    return dumps({"amount": value, "currency": data["currency"]})


# ---- features ---------------------------------------------------------------------------------

def create_feature(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    if tx.get("features", env_id=ctx.env_id, key=data["key"]) is not None:
        raise InvalidRequest(f"a feature with key {data['key']!r} already exists", "key")
    row = {
        "id": new_id("feat"), "env_id": ctx.env_id, "key": data["key"],
        "name": data.get("name") or data["key"], "type": data["type"],
        "unit": data.get("unit"), "metadata": dumps(data.get("metadata") or {}),
        "created_at_us": ctx.now_us,
    }
    row |= _feature_shape(tx, ctx, data, data["key"])
    tx.insert("features", row)
    return views.feature(row)


def _feature_shape(tx: Tx, ctx: Ctx, data: dict[str, Any], key: str) -> dict[str, Any]:
    precision = data.get("precision")
    precision = 0 if precision is None else precision
    pool, rate = data.get("credit_pool"), data.get("credits_per_unit")
    if data["type"] == "boolean":
        if precision != 0 or pool is not None or rate is not None:
            raise InvalidRequest("a boolean feature has no precision, credit_pool or credits_per_unit",
                                 "type")
        return {"precision": 0, "credit_pool": None, "credits_per_unit": None}
    if pool is None:
        if rate is not None:
            raise InvalidRequest("credits_per_unit needs a credit_pool", "credits_per_unit")
        return {"precision": precision, "credit_pool": None, "credits_per_unit": None}
    if pool == key:
        raise InvalidRequest("a feature cannot be its own credit pool", "credit_pool")
    pool_feature = Features(tx, ctx.env_id).require(pool, "credit_pool")
    if pool_feature.type != "metered" or pool_feature.credit_pool is not None:
        raise InvalidRequest("a credit pool must be a metered feature with no pool of its own",
                             "credit_pool")
    rate_value = Decimal(1) if rate is None else to_decimal(rate, "credits_per_unit")
    if rate_value <= 0:
        raise InvalidAmount("credits_per_unit must be positive", "credits_per_unit")
    to_minor(rate_value, 9, "credits_per_unit")  # at most 9 decimal places, in range
    return {"precision": precision, "credit_pool": pool, "credits_per_unit": str(rate_value.normalize())}


def update_feature(tx: Tx, ctx: Ctx, key: str, data: dict[str, Any]) -> dict[str, Any]:
    row = _require(tx, "features", ctx, key=key)
    values: dict[str, Any] = {}
    for field in ("name", "unit"):
        if field in data:
            values[field] = data[field]
    if "metadata" in data:
        values["metadata"] = dumps(data["metadata"] or {})
    if any(f in data for f in ("precision", "credit_pool", "credits_per_unit")):
        merged = {"type": row["type"], "precision": row["precision"], "credit_pool": row["credit_pool"],
                  "credits_per_unit": row["credits_per_unit"]} | {
            f: data[f] for f in ("precision", "credit_pool", "credits_per_unit") if f in data}
        shape = _feature_shape(tx, ctx, merged, key)
        changed = {c: v for c, v in shape.items() if v != row[c]}
        if changed and tx.feature_has_entries(ctx.env_id, key):
            raise InvalidRequest("precision and credit_pool cannot change once the feature has "
                                 "ledger entries", next(iter(changed)))
        values |= shape
    if values:
        tx.update("features", {"id": row["id"]}, values)
    return views.feature(tx.get("features", id=row["id"]) or row)


def get_feature(tx: Tx, ctx: Ctx, key: str) -> dict[str, Any]:
    return views.feature(_require(tx, "features", ctx, key=key))


def _require(tx: Tx, table: str, ctx: Ctx, **where: Any) -> Row:
    row = tx.get(table, env_id=ctx.env_id, **where)
    if row is None:
        what = table.rstrip("s").replace("_", " ")
        raise NotFound(f"no {what} {next(iter(where.values()))!r}")
    return row


# ---- plans and variants -------------------------------------------------------------------------

def create_plan(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    if tx.get("plans", env_id=ctx.env_id, key=data["key"]) is not None:
        raise InvalidRequest(f"a plan with key {data['key']!r} already exists", "key")
    if data.get("default") and tx.get("plans", env_id=ctx.env_id, is_default=True) is not None:
        raise InvalidRequest("this environment already has a default plan", "default")
    row = {
        "id": new_id("plan"), "env_id": ctx.env_id, "key": data["key"],
        "name": data.get("name") or data["key"], "is_default": bool(data.get("default")),
        "metadata": dumps(data.get("metadata") or {}), "created_at_us": ctx.now_us,
    }
    tx.insert("plans", row)
    return views.plan(row)


def find_plan(tx: Tx, ctx: Ctx, ref: str) -> Row:
    """A plan by id or by key."""
    row = tx.get("plans", env_id=ctx.env_id, id=ref) if ref.startswith("plan_") else None
    row = row or tx.get("plans", env_id=ctx.env_id, key=ref)
    if row is None:
        raise NotFound(f"no plan {ref!r}")
    return row


def get_plan(tx: Tx, ctx: Ctx, ref: str) -> dict[str, Any]:
    return views.plan(find_plan(tx, ctx, ref))


def create_variant(tx: Tx, ctx: Ctx, plan_ref: str, data: dict[str, Any]) -> dict[str, Any]:
    plan = find_plan(tx, ctx, plan_ref)
    if tx.get("plan_variants", env_id=ctx.env_id, key=data["key"]) is not None:
        raise InvalidRequest(f"a plan variant with key {data['key']!r} already exists", "key")
    period = duration(data.get("billing_period"), "billing_period") or Duration(1, "month")
    trial = duration(data.get("trial_period"), "trial_period")
    features = Features(tx, ctx.env_id)
    variant_id = new_id("var")
    rows = []
    seen: set[str] = set()
    for i, ent in enumerate(data.get("entitlements") or []):
        param = f"entitlements[{i}]"
        if ent["feature_key"] in seen:
            raise InvalidRequest(f"feature {ent['feature_key']!r} is listed twice", f"{param}.feature_key")
        seen.add(ent["feature_key"])
        feature = features.require(ent["feature_key"], f"{param}.feature_key")
        rows.append(_entitlement_row(variant_id, i, feature, ent, param))
    row = {
        "id": variant_id, "env_id": ctx.env_id, "plan_id": plan["id"], "key": data["key"],
        "price": _price(data.get("price"), "price"), "billing_period": dumps(period.as_dict()),
        "trial_period": dumps(trial.as_dict()) if trial else None,
        "metadata": dumps(data.get("metadata") or {}), "created_at_us": ctx.now_us,
    }
    tx.insert("plan_variants", row)
    tx.insert_many("variant_entitlements", rows)
    return variant_view(tx, ctx, row)


def _entitlement_row(variant_id: str, position: int, feature: Feature, ent: dict[str, Any],
                     param: str) -> dict[str, Any]:
    enabled = ent.get("enabled")
    enabled = True if enabled is None else enabled
    unlimited = bool(ent.get("unlimited"))
    has_amount = ent.get("amount") is not None
    row: dict[str, Any] = {
        "variant_id": variant_id, "feature_key": feature.key, "position": position,
        "amount": None, "enabled": enabled, "unlimited": unlimited,
        "priority": PLAN_PRIORITY if ent.get("priority") is None else ent["priority"],
        "max_balance": None, "overage": ent.get("overage") or "block", "reset": None,
        "rollover": None, "pricing": None,
    }
    metered_only = ("amount", "unlimited", "max_balance", "overage", "pricing", "reset", "rollover",
                    "priority")
    if feature.type == "boolean":
        extra = [f for f in metered_only if ent.get(f) not in (None, False)]
        if extra:
            raise InvalidRequest(f"a boolean feature takes only enabled, not {extra[0]}",
                                 f"{param}.{extra[0]}")
        return row
    if unlimited and has_amount:
        raise InvalidRequest("an unlimited entitlement has no amount", f"{param}.amount")
    if feature.credit_pool is not None and (has_amount or ent.get("max_balance") is not None):
        raise InvalidRequest(f"{feature.key} draws on the credit pool {feature.credit_pool}: "
                             "grant the pool feature instead", f"{param}.amount")
    if has_amount:
        row["amount"] = to_minor(ent["amount"], feature.precision, f"{param}.amount", allow_zero=True)
    if ent.get("max_balance") is not None:
        row["max_balance"] = to_minor(ent["max_balance"], feature.precision, f"{param}.max_balance")
    reset = duration(ent.get("reset"), f"{param}.reset")
    row["reset"] = dumps(reset.as_dict()) if reset else None
    if ent.get("rollover") is not None:
        rollover = ent["rollover"]
        expires_after = duration(rollover.get("expires_after"), f"{param}.rollover.expires_after")
        row["rollover"] = dumps({
            "max_amount": to_minor(rollover["max_amount"], feature.precision,
                                   f"{param}.rollover.max_amount", allow_zero=True),
            "expires_after": expires_after.as_dict() if expires_after else None,
        })
    pricing = ent.get("pricing")
    if pricing is not None:
        if row["overage"] != "allow":
            raise InvalidRequest("pricing applies to overage: set overage to allow", f"{param}.pricing")
        row["pricing"] = dumps(_pricing(pricing, f"{param}.pricing"))
    return row


def _pricing(pricing: dict[str, Any], param: str) -> dict[str, Any]:
    tiers = pricing["tiers"]
    if not tiers:
        raise InvalidRequest("pricing needs at least one tier", f"{param}.tiers")
    out = []
    previous = Decimal(0)
    for i, tier in enumerate(tiers):
        up_to = tier.get("up_to")
        last = i == len(tiers) - 1
        if up_to is None and not last:
            raise InvalidRequest("only the last tier may be unbounded", f"{param}.tiers[{i}].up_to")
        if up_to is not None:
            bound = to_decimal(up_to, f"{param}.tiers[{i}].up_to")
            if bound <= previous:
                raise InvalidRequest("tier bounds must increase", f"{param}.tiers[{i}].up_to")
            previous = bound
        price = to_decimal(tier["unit_price"], f"{param}.tiers[{i}].unit_price")
        if price < 0:
            raise InvalidAmount("unit_price must not be negative", f"{param}.tiers[{i}].unit_price")
        out.append({"up_to": None if up_to is None else str(previous.normalize()),
                    "unit_price": str(price)})
    if out[-1]["up_to"] is not None:
        raise InvalidRequest("the last tier must be unbounded (up_to: null)", f"{param}.tiers")
    return {"mode": pricing["mode"], "currency": pricing["currency"], "tiers": out}


def variant_view(tx: Tx, ctx: Ctx, row: Row) -> dict[str, Any]:
    features = Features(tx, ctx.env_id)
    ents = [views.entitlement(e, features.precision(e["feature_key"])) for e in tx.entitlements_of(row["id"])]
    return views.variant(row, ents)


def get_variant(tx: Tx, ctx: Ctx, variant_id: str, plan_ref: str | None = None) -> dict[str, Any]:
    row = _require(tx, "plan_variants", ctx, id=variant_id)
    if plan_ref is not None and row["plan_id"] != find_plan(tx, ctx, plan_ref)["id"]:
        raise NotFound(f"no plan variant {variant_id!r}")
    return variant_view(tx, ctx, row)


# ---- packs ------------------------------------------------------------------------------------

def create_pack(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    if tx.get("packs", env_id=ctx.env_id, key=data["key"]) is not None:
        raise InvalidRequest(f"a pack with key {data['key']!r} already exists", "key")
    feature = Features(tx, ctx.env_id).require(data["feature_key"])
    if feature.type != "metered" or feature.credit_pool is not None:
        raise InvalidRequest("a pack grants a metered feature that is not drawn from a pool",
                             "feature_key")
    expires_after = duration(data.get("expires_after"), "expires_after")
    row = {
        "id": new_id("pack"), "env_id": ctx.env_id, "key": data["key"], "feature_key": feature.key,
        "amount": to_minor(data["amount"], feature.precision, "amount"),
        "price": _price(data.get("price"), "price"),
        "expires_after": dumps(expires_after.as_dict()) if expires_after else None,
        "priority": GRANT_PRIORITY if data.get("priority") is None else data["priority"],
        "metadata": dumps(data.get("metadata") or {}), "created_at_us": ctx.now_us,
    }
    tx.insert("packs", row)
    return views.pack(row, feature.precision)


def get_pack(tx: Tx, ctx: Ctx, key: str) -> dict[str, Any]:
    row = _require(tx, "packs", ctx, key=key)
    return views.pack(row, Features(tx, ctx.env_id).precision(row["feature_key"]))


def pack_price(row: Row) -> dict[str, Any] | None:
    price = loads(row["price"])
    return None if price is None else {"amount": Decimal(price["amount"]), "currency": price["currency"]}
