"""A fresh tenant's sandbox over HTTP, for scenario tests driven by the sandbox clock."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx

from quotastack.domain.periods import parse_rfc3339

from .serving import OPERATOR_KEY

HOUR = 3600
DAY = 86_400
# API.md §8: grants + refunds + rollovers - uses - expiries - voids - commits = balance + reserved
SIGN = {"grant": 1, "refund": 1, "rollover": 1, "use": -1, "expire": -1, "void": -1, "commit": -1,
        "reserve": 0, "release": 0}


def seconds_between(a: str, b: str) -> int:
    return (parse_rfc3339(b, "b") - parse_rfc3339(a, "a")) // 1_000_000


class Sandbox:
    """A fresh tenant's sandbox, with helpers that fail loudly on unexpected statuses."""

    def __init__(self, base_url: str) -> None:
        created = httpx.post(f"{base_url}/v1/tenants", json={"name": "life"},
                             headers={"Authorization": f"Bearer {OPERATOR_KEY}"}).json()
        self.keys = created["api_keys"]
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {self.keys[0]['key']}"})
        self.users: set[str] = set()

    def post(self, path: str, body: dict[str, Any] | None = None, status: int = 200) -> Any:
        response = self.http.post(path, json=body or {})
        assert response.status_code == status, response.text
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def plan(self, key: str, entitlements: list[dict[str, Any]], *, default: bool = False,
             period: dict[str, Any] | None = None, trial: dict[str, Any] | None = None) -> str:
        plan = self.post("/v1/plans", {"key": key, "default": default}, 201)
        body: dict[str, Any] = {"key": f"{key}_v", "entitlements": entitlements,
                                "billing_period": period or {"every": 1, "unit": "month"}}
        if trial:
            body["trial_period"] = trial
        return str(self.post(f"/v1/plans/{plan['id']}/variants", body, 201)["id"])

    def subscribe(self, user: str, variant: str, **extra: Any) -> dict[str, Any]:
        self.users.add(user)
        return dict(self.post("/v1/subscriptions", {"end_user_id": user, "plan_variant_id": variant, **extra}, 201))

    def advance(self, seconds: int | None = None, to: str | None = None) -> str:
        body = {"seconds": seconds} if seconds is not None else {"to": to}
        return str(self.post("/v1/test_clock/advance", body)["now"])

    def now(self) -> str:
        return str(self.get("/v1/test_clock")["now"])

    def balance(self, user: str, feature: str) -> dict[str, Any]:
        self.users.add(user)
        data = self.get(f"/v1/balances/{user}", feature_key=feature)["data"]
        return dict(data[0]) if data else {"balance": 0, "reserved": 0, "blocks": []}

    def check(self, user: str, feature: str, units: int = 1) -> dict[str, Any]:
        self.users.add(user)
        return dict(self.get("/v1/entitlements/check", end_user_id=user, feature_key=feature, units=units))

    def use(self, user: str, feature: str, units: int, status: int = 201) -> Any:
        self.users.add(user)
        return self.post("/v1/usage", {"end_user_id": user, "feature_key": feature, "units": units}, status)

    def live(self, user: str) -> dict[str, Any]:
        subs = [s for s in self.get("/v1/subscriptions", end_user_id=user)["data"]
                if s["status"] in ("trialing", "active", "paused")]
        assert len(subs) == 1, subs
        return dict(subs[0])

    def assert_conserved(self) -> None:
        for user in self.users:
            entries = self.get("/v1/ledger", end_user_id=user, limit=500)
            assert not entries["has_more"]
            totals: dict[str, Decimal] = {}
            for e in entries["data"]:
                totals[e["feature_key"]] = totals.get(e["feature_key"], Decimal(0)) + SIGN[e["type"]] * Decimal(
                    str(e["amount"]))
            for row in self.get(f"/v1/balances/{user}")["data"]:
                expected = Decimal(str(row["balance"])) + Decimal(str(row["reserved"])) + Decimal(
                    str(row.get("frozen", 0)))
                assert totals.get(row["feature_key"], Decimal(0)) == expected, (user, row)
