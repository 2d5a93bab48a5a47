"""Random sequences of grants, usage, voids, reservations, commits, releases, refunds, clock
advances (which reset the plan's daily allowance and expire reservations) and retried requests,
against a block-level model.

After every step, for every end user: the ledger adds up to balance + reserved (API.md §8),
nothing is negative, and balance and reserved are what the model says. Retries with the same
Idempotency-Key change nothing; a reused key with another body is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from .serving import OPERATOR_KEY

USERS = ("u0", "u1", "u2")
# API.md §8: grants + refunds + rollovers - uses - expiries - voids - commits = balance + reserved
# (reserve and release move credits between balance and reserved).
SIGN = {"grant": 1, "refund": 1, "rollover": 1, "use": -1, "expire": -1, "void": -1, "commit": -1,
        "reserve": 0, "release": 0}
cents = st.integers(min_value=1, max_value=5_000)
PLAN_ALLOWANCE = Decimal("10.50")


def ledger_total(client: httpx.Client, user: str, feature: str) -> Decimal:
    total, after = Decimal(0), None
    while True:
        params: dict[str, Any] = {"end_user_id": user, "feature_key": feature, "limit": 500}
        if after:
            params["starting_after"] = after
        page = client.get("/v1/ledger", params=params).json()
        total += sum(SIGN[e["type"]] * Decimal(str(e["amount"])) for e in page["data"])
        if not page["has_more"]:
            return total
        after = page["next_cursor"]


@dataclass
class ModelBlock:
    user: str
    remaining: Decimal
    order: tuple[int, int]  # burn-down: (0 for the plan block that expires first, else 1, creation)
    alive: bool = True


@dataclass
class Model:
    """What the ledger should say, block by block: burn-down, holds, voids and refunds."""

    blocks: dict[str, ModelBlock] = field(default_factory=dict)
    holds: dict[str, list[list[Any]]] = field(default_factory=dict)  # reservation -> [[block, amount]]
    charges: dict[str, list[list[Any]]] = field(default_factory=dict)  # usage/reservation -> [[block, net]]
    status: dict[str, str] = field(default_factory=dict)
    expiry: dict[str, int] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)

    def balance(self, user: str) -> Decimal:
        return sum((b.remaining for b in self.blocks.values() if b.user == user and b.alive), Decimal(0))

    def reserved(self, user: str) -> Decimal:
        return sum((a for r, hs in self.holds.items() if self.owner[r] == user for _, a in hs), Decimal(0))

    def draw(self, user: str, amount: Decimal) -> list[list[Any]] | None:
        if amount > self.balance(user):
            return None
        taken, left = [], amount
        for bid, block in sorted(self.blocks.items(), key=lambda kv: kv[1].order):
            if left == 0:
                break
            if block.user != user or not block.alive or block.remaining == 0:
                continue
            take = min(left, block.remaining)
            block.remaining -= take
            left -= take
            taken.append([bid, take])
        return taken

    def release(self, rsv: str) -> None:
        for bid, amount in self.holds.pop(rsv, []):
            if self.blocks[bid].alive:
                self.blocks[bid].remaining += amount


def test_ledger_state_machine(server: Any) -> None:
    base_url = server.base_url

    class LedgerMachine(RuleBasedStateMachine):
        blocks = Bundle("blocks")
        sent = Bundle("sent")
        reservations = Bundle("reservations")
        charged = Bundle("charged")

        @initialize()
        def tenant(self) -> None:
            created = httpx.post(f"{base_url}/v1/tenants", json={"name": "prop"},
                                 headers={"Authorization": f"Bearer {OPERATOR_KEY}"}).json()
            self.client = httpx.Client(base_url=base_url, headers={
                "Authorization": f"Bearer {created['api_keys'][0]['key']}"})
            assert self.client.post("/v1/features", json={"key": "credits", "precision": 2}).status_code == 201
            plan = self.client.post("/v1/plans", json={"key": "p"}).json()
            variant = self.client.post(f"/v1/plans/{plan['id']}/variants", json={
                "key": "v", "entitlements": [{"feature_key": "credits", "amount": str(PLAN_ALLOWANCE),
                                              "reset": {"every": 1, "unit": "day"}}]}).json()
            sub = self.client.post("/v1/subscriptions", json={"end_user_id": "u0", "plan_variant_id": variant["id"]})
            assert sub.status_code == 201
            self.model = Model()
            self.plan_block = self.client.get("/v1/balances/u0").json()["data"][0]["blocks"][0]["id"]
            self.model.blocks[self.plan_block] = ModelBlock("u0", PLAN_ALLOWANCE, (0, 0))
            self.clock = 0
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
            self.model.blocks[response.json()["id"]] = ModelBlock(user, value, (1, len(self.model.blocks)))
            return response.json()["id"]

        @rule(target=sent, user=st.sampled_from(USERS), amount=cents)
        def use(self, user: str, amount: int) -> Any:
            value = Decimal(amount) / 100
            body = {"end_user_id": user, "feature_key": "credits", "units": str(value)}
            key = self.key()
            response = self.post("/v1/usage", body, key)
            taken = self.model.draw(user, value)
            if taken is None:
                assert response.status_code == 402, response.text
                assert response.json()["error"]["code"] == "insufficient_balance"
            else:
                assert response.status_code == 201, response.text
                assert Decimal(str(response.json()["balance"])) == self.model.balance(user)
                assert [[e["block_id"], Decimal(str(e["amount"]))] for e in response.json()["entries"]] == taken
                self.model.charges[response.json()["id"]] = taken
                self.model.owner[response.json()["id"]] = user
            return ("/v1/usage", body, key, response.status_code, response.content)

        @rule(block=consumes(blocks))
        def void(self, block: str) -> None:
            response = self.post(f"/v1/grants/{block}/void", {}, None)
            assert response.status_code == 200, response.text
            self.model.blocks[block].alive = False
            again = self.post(f"/v1/grants/{block}/void", {}, None)
            assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"

        @rule(target=reservations, user=st.sampled_from(USERS), amount=cents, ttl=st.sampled_from([60, 3600]))
        def reserve(self, user: str, amount: int, ttl: int) -> Any:
            value = Decimal(amount) / 100
            response = self.post("/v1/reservations", {"end_user_id": user, "feature_key": "credits",
                                                      "units": str(value), "ttl_seconds": ttl}, self.key())
            taken = self.model.draw(user, value)
            if taken is None:
                assert response.status_code == 402, response.text
                return None
            assert response.status_code == 201, response.text
            rsv = response.json()["id"]
            self.model.holds[rsv] = taken
            self.model.owner[rsv] = user
            self.model.status[rsv] = "held"
            self.model.expiry[rsv] = self.clock + ttl
            return rsv

        @rule(target=charged, rsv=reservations, amount=st.integers(min_value=0, max_value=6_000),
              final=st.booleans())
        def commit(self, rsv: str | None, amount: int, final: bool) -> Any:
            if rsv is None:
                return None
            value = Decimal(amount) / 100
            response = self.post(f"/v1/reservations/{rsv}/commit", {"units": str(value), "final": final}, None)
            if self.model.status[rsv] != "held":
                assert response.status_code == 409, response.text
                return None
            user, holds = self.model.owner[rsv], self.model.holds[rsv]
            held = sum((a for _, a in holds), Decimal(0))
            excess = self.model.draw(user, max(Decimal(0), value - held))
            if excess is None:
                assert response.status_code == 402, response.text
                return None
            assert response.status_code == 200, response.text
            left, spent = min(value, held), []
            for hold in holds:
                take = min(left, hold[1])
                if take:
                    hold[1] -= take
                    left -= take
                    spent.append([hold[0], take])
            self.model.charges.setdefault(rsv, []).extend(excess + spent)
            if final:
                self.model.release(rsv)
                self.model.status[rsv] = "committed"
            return rsv

        @rule(rsv=reservations)
        def release(self, rsv: str | None) -> None:
            if rsv is None:
                return
            response = self.post(f"/v1/reservations/{rsv}/release", {}, None)
            if self.model.status[rsv] != "held":
                assert response.status_code == 409 and response.json()["error"]["code"] == "invalid_state"
                return
            assert response.status_code == 200, response.text
            self.model.release(rsv)
            self.model.status[rsv] = "released"

        @rule(charge=st.one_of(charged, sent), percent=st.integers(min_value=1, max_value=100))
        def refund(self, charge: Any, percent: int) -> None:
            ref = json.loads(charge[4]).get("id") if isinstance(charge, tuple) else charge
            if ref not in self.model.charges:
                return
            entries = self.model.charges[ref]
            owed = sum((a for _, a in entries), Decimal(0))
            amount = (owed * percent / 100).quantize(Decimal("0.01"))
            field_name = "reservation_id" if ref.startswith("rsv_") else "usage_id"
            response = self.post("/v1/refunds", {field_name: ref, "amount": str(amount)}, self.key())
            if amount <= 0:
                assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_amount"
                return
            assert response.status_code == 201, response.text
            left, given = amount, Decimal(0)
            for entry in entries:
                take = min(left, entry[1])
                left -= take
                entry[1] -= take
                if take and self.model.blocks[entry[0]].alive:
                    self.model.blocks[entry[0]].remaining += take
                    given += take
            assert Decimal(str(response.json()["amount"])) == given
            rest = sum((a for _, a in entries), Decimal(0))
            too_much = self.post("/v1/refunds", {field_name: ref, "amount": str(rest + 1)}, None)
            assert too_much.status_code == 400 and too_much.json()["error"]["code"] == "invalid_amount"

        @rule(seconds=st.sampled_from([30, 61, 900, 86_400]))
        def advance_clock(self, seconds: int) -> None:
            # Only whole days cross the plan's daily boundary: the short steps add up to far less
            # than a day, so the real time that also passes can never cross one by itself.
            response = self.post("/v1/test_clock/advance", {"seconds": seconds}, None)
            assert response.status_code == 200, response.text
            self.clock += seconds
            if seconds == 86_400:
                # The day's allowance expires (what reservations hold from it is lost on release)
                # and the next day's is granted: a new block, first in burn-down order.
                self.model.blocks[self.plan_block].alive = False
                grants = self.client.get("/v1/ledger", params={"end_user_id": "u0", "type": "grant"}).json()
                self.plan_block = grants["data"][0]["block_id"]
                days = len([b for b in self.model.blocks.values() if b.order[0] == 0])
                self.model.blocks[self.plan_block] = ModelBlock("u0", PLAN_ALLOWANCE, (0, days))
            for rsv, status in self.model.status.items():
                if status == "held" and self.model.expiry[rsv] <= self.clock:
                    self.model.release(rsv)
                    self.model.status[rsv] = "expired"

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
                assert balance >= 0 and reserved >= 0
                assert balance == self.model.balance(user)
                assert reserved == self.model.reserved(user)
                assert ledger_total(self.client, user, "credits") == balance + reserved
                # The check says the same, read from the ledger or from the answers the server
                # keeps between checks (twice: the second is the kept one on SQLite).
                for _ in range(2):
                    checked = self.client.get("/v1/entitlements/check",
                                              params={"end_user_id": user, "feature_key": "credits"}).json()
                    assert Decimal(str(checked["balance"])) == balance, checked

        def teardown(self) -> None:
            if hasattr(self, "client"):
                self.client.close()

    LedgerMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])
    LedgerMachine.TestCase().runTest()
