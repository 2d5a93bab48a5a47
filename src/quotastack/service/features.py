"""Features as the services see them, and the credit pool a feature draws on."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from ..domain.amounts import MAX_MINOR, scale_round
from ..domain.errors import InsufficientBalance, InvalidAmount, InvalidRequest, NotFound
from .ports import Row, Tx


@dataclass(frozen=True, slots=True)
class Feature:
    key: str
    type: str
    precision: int
    unit: str | None
    credit_pool: str | None
    credits_per_unit: Decimal | None

    @classmethod
    def from_row(cls, row: Row) -> "Feature":
        rate = row["credits_per_unit"]
        return cls(row["key"], row["type"], int(row["precision"]), row["unit"], row["credit_pool"],
                   Decimal(rate) if rate is not None else None)


class Features:
    """Feature lookups within one unit of work, each key read at most once."""

    def __init__(self, tx: Tx, env_id: int) -> None:
        self._tx = tx
        self._env_id = env_id
        self._cache: dict[str, Feature | None] = {}

    def known(self, key: str, feature: Feature | None) -> None:
        """Take ``key``'s feature (None: it does not exist) as read elsewhere in this unit of work."""
        self._cache[key] = feature

    def find(self, key: str) -> Feature | None:
        if key not in self._cache:
            row = self._tx.get("features", env_id=self._env_id, key=key)
            self._cache[key] = Feature.from_row(row) if row else None
        return self._cache[key]

    def require(self, key: str, param: str = "feature_key") -> Feature:
        feature = self.find(key)
        if feature is None:
            raise NotFound(f"no feature {key!r}", param)
        return feature

    def charged(self, feature: Feature) -> Feature:
        """The feature whose balance ``feature`` moves: its credit pool, or itself."""
        if feature.credit_pool is None:
            return feature
        pool = self.find(feature.credit_pool)
        assert pool is not None, "a credit pool cannot be deleted"
        return pool

    def precision(self, key: str) -> int:
        feature = self.find(key)
        return feature.precision if feature else 0


def feature_in(row: Row, prefix: str) -> Feature | None:
    """The feature in ``row``'s columns named ``prefix`` + column (``Tx.usage_state``); None if NULL."""
    if row[prefix + "key"] is None:
        return None
    return Feature.from_row({c: row[prefix + c] for c in ("key", "type", "precision", "unit", "credit_pool",
                                                           "credits_per_unit")})


def terms_in(row: Row, variant_id: str | None, feature: Feature) -> Terms:
    """``plan_terms`` from ``row``'s ``eo_*`` and ``ep_*`` columns (``Tx.usage_state``)."""
    if variant_id is None:
        return Terms(None, None)
    own, pool = (_entitlement_in(row, "eo_"), _entitlement_in(row, "ep_") if feature.credit_pool else None)
    return Terms(own, pool)


def _entitlement_in(row: Row, prefix: str) -> Row | None:
    if row[prefix + "variant_id"] is None:
        return None
    n = len(prefix)
    return {c[n:]: v for c, v in row.items() if c.startswith(prefix)}


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


@dataclass(frozen=True, slots=True)
class Terms:
    """What the end user's plan says of a feature: its own entitlement and its pool's."""

    own: Row | None
    pool: Row | None

    @property
    def unlimited(self) -> bool:
        return bool((self.own and self.own["unlimited"]) or (self.pool and self.pool["unlimited"]))

    @property
    def governing(self) -> Row | None:
        """The terms of the balance: the feature's own allowance, else its pool's."""
        if self.own is not None and self.own["amount"] is not None:
            return self.own
        return self.pool or self.own

    @property
    def allow_overage(self) -> bool:
        return self.governing is not None and self.governing["overage"] == "allow"

    @property
    def priced(self) -> Row | None:
        return self.own if self.own is not None and self.own["pricing"] else self.pool

    def require_enabled(self, feature: Feature) -> None:
        if self.own is not None and not self.own["enabled"]:
            raise InsufficientBalance(f"{feature.key} is disabled on the end user's plan", "feature_key")


def plan_terms(tx: Tx, variant_id: str | None, feature: Feature) -> Terms:
    if variant_id is None:
        return Terms(None, None)
    own = tx.entitlement(variant_id, feature.key)
    pool = tx.entitlement(variant_id, feature.credit_pool) if feature.credit_pool else None
    return Terms(own, pool)


def metered(features: Features, key: str) -> Feature:
    feature = features.require(key)
    if feature.type != "metered":
        raise InvalidRequest(f"{feature.key} is a boolean feature: usage is recorded for metered ones",
                             "feature_key")
    return feature
