"""Random sequences of grants, usage, voids and retried requests against a simple model.

After every step, for every end user: the ledger adds up to balance + reserved, no balance is
negative, and the balance is what the model says. Retries with the same Idempotency-Key change
nothing; a reused key with another body is refused.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from .serving import OPERATOR_KEY, database_url, engines, serve

USERS = ("u0", "u1", "u2")
SIGN = {"grant": 1, "refund": 1, "rollover": 1, "release": 1, "use": -1, "expire": -1, "void": -1,
        "reserve": -1, "commit": 0}
cents = st.integers(min_value=1, max_value=5_000)


def ledger_total(client: httpx.Client, user: str, feature: str) -> Decimal:
    total, after = Decimal(0), None
    while True:
        params = {"end_user_id": user, "feature_key": feature, "limit": 500}
        if after:
            params["starting_after"] = after
        page = client.get("/v1/ledger", params=params).json()
        total += sum(SIGN[e["type"]] * Decimal(str(e["amount"])) for e in page["data"])
        if not page["has_more"]:
            return total
        after = page["next_cursor"]


@pytest.fixture(scope="module", params=engines())
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with serve(database_url(request.param, tmp_path_factory.mktemp("prop"))) as running:
        yield running


def test_ledger_state_machine(server: Any) -> None:
    base_url = server.base_url

    class LedgerMachine(RuleBasedStateMachine):
        blocks = Bundle("blocks")
        sent = Bundle("sent")

        @initialize()
        def tenant(self) -> None:
            created = httpx.post(f"{base_url}/v1/tenants", json={"name": "prop"},
                                 headers={"Authorization": f"Bearer {OPERATOR_KEY}"}).json()
            self.client = httpx.Client(base_url=base_url, headers={
                "Authorization": f"Bearer {created['api_keys'][0]['key']}"})
            assert self.client.post("/v1/features", json={"key": "credits", "precision": 2}).status_code == 201
            plan = self.client.post("/v1/plans", json={"key": "p"}).json()
            variant = self.client.post(f"/v1/plans/{plan['id']}/variants", json={
                "key": "v", "entitlements": [{"feature_key": "credits", "amount": "10.50"}]}).json()
            sub = self.client.post("/v1/subscriptions", json={"end_user_id": "u0", "plan_variant_id": variant["id"]})
            assert sub.status_code == 201
            self.balance = {u: Decimal(0) for u in USERS}
            self.balance["u0"] = Decimal("10.50")
            self.keys = 0

        def key(self) -> str:
            self.keys += 1
            return f"k{self.keys}"

        def post(self, path: str, body: dict[str, Any], key: str | None) -> httpx.Response:
            headers = {"Idempotency-Key": key} if key else {}
            return self.client.post(path, json=body, headers=headers)

        @rule(target=blocks, user=st.sampled_from(USERS), amount=cents, with_key=st.booleans())
        def grant(self, user: str, amount: int, with_key: bool) -> Any:
            value = Decimal(amount) / 100
            body = {"end_user_id": user, "feature_key": "credits", "amount": str(value)}
            response = self.post("/v1/grants", body, self.key() if with_key else None)
            assert response.status_code == 201, response.text
            self.balance[user] += value
            return response.json()["id"]

        @rule(target=sent, user=st.sampled_from(USERS), amount=cents)
        def use(self, user: str, amount: int) -> Any:
            value = Decimal(amount) / 100
            body = {"end_user_id": user, "feature_key": "credits", "units": str(value)}
            key = self.key()
            response = self.post("/v1/usage", body, key)
            if value <= self.balance[user]:
                assert response.status_code == 201, response.text
                assert Decimal(str(response.json()["balance"])) == self.balance[user] - value
                self.balance[user] -= value
            else:
                assert response.status_code == 402, response.text
                assert response.json()["error"]["code"] == "insufficient_balance"
            return ("/v1/usage", body, key, response.status_code, response.content)

        @rule(block=consumes(blocks))
        def void(self, block: str) -> None:
            before = self.client.get(f"/v1/grants/{block}").json()
            response = self.post(f"/v1/grants/{block}/void", {}, None)
            if before["status"] == "active":
                assert response.status_code == 200, response.text
                self.balance[before["end_user_id"]] -= Decimal(str(before["remaining"]))
            else:
                assert response.status_code == 409
            again = self.post(f"/v1/grants/{block}/void", {}, None)
            assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"

        @rule(request=sent)
        def retry(self, request: tuple[str, dict[str, Any], str, int, bytes]) -> None:
            path, body, key, status, content = request
            response = self.post(path, body, key)
            assert response.status_code == status
            assert response.content == content
            assert response.headers.get("Idempotent-Replayed") == "true"

        @rule(request=sent, units=cents)
        def reuse_key_with_another_body(self, request: tuple[str, dict[str, Any], str, int, bytes],
                                        units: int) -> None:
            path, body, key, _, _ = request
            changed = body | {"units": str(Decimal(units) / 100 + 1000)}
            response = self.post(path, changed, key)
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "idempotency_key_reused"

        @invariant()
        def conserved(self) -> None:
            if not hasattr(self, "client"):
                return
            for user in USERS:
                data = self.client.get(f"/v1/balances/{user}", params={"feature_key": "credits"}).json()["data"]
                balance = Decimal(str(data[0]["balance"])) if data else Decimal(0)
                reserved = Decimal(str(data[0]["reserved"])) if data else Decimal(0)
                assert balance >= 0
                assert balance == self.balance[user]
                assert ledger_total(self.client, user, "credits") == balance + reserved

        def teardown(self) -> None:
            if hasattr(self, "client"):
                self.client.close()

    LedgerMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=20, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])
    LedgerMachine.TestCase().runTest()
