"""Request bodies. Unknown fields are refused; amounts stay exact (validated per feature later)."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, WithJsonSchema

# Amounts are checked against their feature's precision by the service (400 invalid_amount),
# so the schema only documents them: a JSON number or a decimal string.
Amount = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string"}],
                                        "description": "exact decimal: a JSON number or a decimal string"})]
Key = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:\-]+$")]
EndUserId = Annotated[str, Field(min_length=1, max_length=255)]
Timestamp = Annotated[str, Field(description="RFC 3339 timestamp with an offset")]
Metadata = dict[str, Any]
Unit = Literal["minute", "hour", "day", "week", "month", "year"]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)
    # A partial body (an update) keeps only the fields the client sent.
    partial: ClassVar[bool] = False


class DurationIn(Body):
    every: StrictInt = Field(ge=1)
    unit: Unit


class PriceIn(Body):
    amount: Amount
    currency: Annotated[str, Field(min_length=3, max_length=3, pattern=r"^[A-Z]{3}$")]


class FeatureIn(Body):
    key: Key
    name: str | None = Field(default=None, max_length=255)
    type: Literal["metered", "boolean"] = "metered"
    unit: str | None = Field(default=None, max_length=64)
    precision: StrictInt | None = Field(default=None, ge=0, le=9)
    credit_pool: Key | None = None
    credits_per_unit: Amount = None
    metadata: Metadata | None = None


class FeatureUpdate(Body):
    partial = True
    name: str | None = Field(default=None, max_length=255)
    unit: str | None = Field(default=None, max_length=64)
    precision: StrictInt | None = Field(default=None, ge=0, le=9)
    credit_pool: Key | None = None
    credits_per_unit: Amount = None
    metadata: Metadata | None = None


class PlanIn(Body):
    key: Key
    name: str | None = Field(default=None, max_length=255)
    default: StrictBool = False
    metadata: Metadata | None = None


class TierIn(Body):
    up_to: Amount = None
    unit_price: Amount


class PricingIn(Body):
    mode: Literal["graduated", "volume"]
    currency: Annotated[str, Field(min_length=3, max_length=3, pattern=r"^[A-Z]{3}$")]
    tiers: list[TierIn] = Field(min_length=1, max_length=100)


class RolloverIn(Body):
    max_amount: Amount
    expires_after: DurationIn | None = None


class EntitlementIn(Body):
    feature_key: Key
    amount: Amount = None
    enabled: StrictBool | None = None
    unlimited: StrictBool | None = None
    priority: StrictInt | None = Field(default=None, ge=0, le=1_000_000)
    max_balance: Amount = None
    overage: Literal["block", "allow"] | None = None
    pricing: PricingIn | None = None
    reset: DurationIn | None = None
    rollover: RolloverIn | None = None


class VariantIn(Body):
    key: Key
    price: PriceIn | None = None
    billing_period: DurationIn | None = None
    trial_period: DurationIn | None = None
    entitlements: list[EntitlementIn] = Field(default_factory=list, max_length=200)
    metadata: Metadata | None = None


class PackIn(Body):
    key: Key
    feature_key: Key
    amount: Amount
    price: PriceIn | None = None
    expires_after: DurationIn | None = None
    priority: StrictInt | None = Field(default=None, ge=0, le=1_000_000)
    metadata: Metadata | None = None


class SubscriptionIn(Body):
    end_user_id: EndUserId
    plan_variant_id: str
    start_at: Timestamp | None = None
    timezone: str | None = Field(default=None, max_length=64)
    auto_renew: StrictBool = True
    trial: DurationIn | StrictBool | None = None
    metadata: Metadata | None = None


class ChangeIn(Body):
    plan_variant_id: str
    timing: Literal["immediate", "period_end"] = "immediate"


class CancelIn(Body):
    at: Literal["period_end", "immediately"] = "period_end"


class GrantIn(Body):
    end_user_id: EndUserId
    feature_key: Key
    amount: Amount
    priority: StrictInt | None = Field(default=None, ge=0, le=1_000_000)
    expires_at: Timestamp | None = None
    expires_after: DurationIn | None = None
    effective_at: Timestamp | None = None
    source: Literal["manual", "promo", "purchase"] | None = None
    metadata: Metadata | None = None


class PurchaseIn(Body):
    end_user_id: EndUserId
    pay_with: Literal["external", "wallet"] = "external"


class UsageIn(Body):
    end_user_id: EndUserId
    feature_key: Key
    units: Amount
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    timestamp: Timestamp | None = None
    metadata: Metadata | None = None


# ``Key``'s pattern, matched against the whole text (pydantic's ``$`` allows no trailing newline,
# which Python's ``$`` would).
_KEY_TEXT = re.compile(r"[A-Za-z0-9_.:\-]+")
_USAGE_FIELDS = frozenset(UsageIn.model_fields)


def plain_usage(data: Any) -> dict[str, Any] | None:
    """A batch event that ``UsageIn`` would pass unchanged and that has no idempotency key, as
    ``UsageIn`` would give it (without ``idempotency_key``); None for any other event.

    A batch validates up to a thousand events, and the model costs several microseconds each.
    This accepts only what ``UsageIn`` accepts as it is (the JSON types it asks for, within its
    lengths and pattern); everything else, valid or not, goes through ``UsageIn`` itself, so an
    error always reads as the model writes it (a test holds the two the same).
    """
    if type(data) is not dict or not _USAGE_FIELDS.issuperset(data):
        return None
    user, key = data.get("end_user_id"), data.get("feature_key")
    timestamp, metadata = data.get("timestamp"), data.get("metadata")
    if (type(user) is not str or not 0 < len(user) <= 255 or type(key) is not str or len(key) > 100
            or _KEY_TEXT.fullmatch(key) is None or "units" not in data or data.get("idempotency_key") is not None
            or (timestamp is not None and type(timestamp) is not str)
            or (metadata is not None and type(metadata) is not dict)):
        return None
    return {"end_user_id": user, "feature_key": key, "units": data["units"], "timestamp": timestamp,
            "metadata": None if metadata is None else dict(metadata)}


class UsageBatchIn(Body):
    events: list[dict[str, Any]] = Field(min_length=1, max_length=1000)


class ReservationIn(Body):
    end_user_id: EndUserId
    feature_key: Key
    units: Amount
    ttl_seconds: StrictInt | None = Field(default=None, ge=1, le=604_800)
    metadata: Metadata | None = None


class CommitIn(Body):
    units: Amount
    final: StrictBool = True


class ExtendIn(Body):
    ttl_seconds: StrictInt = Field(ge=1, le=604_800)


class RefundIn(Body):
    usage_id: str | None = None
    reservation_id: str | None = None
    amount: Amount = None


class TenantIn(Body):
    name: Annotated[str, Field(min_length=1, max_length=255)]


class ApiKeyIn(Body):
    name: Annotated[str, Field(min_length=1, max_length=255)]
    scopes: list[str] = Field(min_length=1, max_length=20)


class ClockAdvanceIn(Body):
    partial = True
    seconds: StrictInt | None = Field(default=None, ge=0)
    to: Timestamp | None = None
