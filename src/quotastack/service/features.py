"""Features as the services see them, and the credit pool a feature draws on."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from ..domain.errors import NotFound
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
