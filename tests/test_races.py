"""Many clients at once against several server processes: exactly the right number succeed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier
from typing import Any

import httpx
import pytest

from .processes import ServerProcess, new_tenant, server_process
from .serving import database_url, engines


@pytest.fixture(scope="module", params=engines())
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with server_process(database_url(request.param, Path(tmp_path_factory.mktemp("races"))), workers=2) as running:
        yield running


def at_once(api: httpx.Client, count: int, call: Callable[[httpx.Client, int], httpx.Response]) -> list[httpx.Response]:
    """Run ``call`` from ``count`` threads, each with its own connection, released together."""
    barrier = Barrier(count)

    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=api.base_url, timeout=60, headers=api.headers) as client:
            barrier.wait()
            return call(client, i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def setup(server: ServerProcess, grant: int) -> httpx.Client:
    api = new_tenant(server.base_url)
    assert api.post("/v1/features", json={"key": "credits"}).status_code == 201
    assert api.post("/v1/grants", json={"end_user_id": "u", "feature_key": "credits", "amount": grant}).status_code == 201
    return api


def balance(api: httpx.Client) -> dict[str, Any]:
    return api.get("/v1/balances/u", params={"feature_key": "credits"}).json()["data"][0]


def test_fifty_uses_of_30_against_1000_credits_exactly_33_succeed(server: ServerProcess) -> None:
    api = setup(server, 1000)
    replies = at_once(api, 50, lambda c, i: c.post("/v1/usage", json={"end_user_id": "u", "feature_key": "credits",
                                                                 "units": 30}))
    assert Counter(r.status_code for r in replies) == {201: 33, 402: 17}
    assert balance(api)["balance"] == 10
    uses = api.get("/v1/ledger", params={"end_user_id": "u", "type": "use", "limit": 100}).json()["data"]
    assert len(uses) == 33 and sum(e["amount"] for e in uses) == 990


def test_twenty_reservations_of_75_against_500_exactly_6_are_held(server: ServerProcess) -> None:
    api = setup(server, 500)
    replies = at_once(api, 20, lambda c, i: c.post("/v1/reservations", json={
        "end_user_id": "u", "feature_key": "credits", "units": 75}))
    assert Counter(r.status_code for r in replies) == {201: 6, 402: 14}
    assert (balance(api)["balance"], balance(api)["reserved"]) == (50, 450)


def test_one_idempotency_key_from_16_clients_has_exactly_one_effect(server: ServerProcess) -> None:
    api = setup(server, 1000)
    replies = at_once(api, 16, lambda c, i: c.post("/v1/usage", json={"end_user_id": "u", "feature_key": "credits",
                                                                 "units": 7}, headers={"Idempotency-Key": "same"}))
    statuses = Counter(r.status_code for r in replies)
    assert set(statuses) <= {201, 409} and statuses[201] >= 1
    assert {r.json()["error"]["code"] for r in replies if r.status_code == 409} <= {"idempotency_key_in_use"}
    assert len({r.json()["id"] for r in replies if r.status_code == 201}) == 1
    assert balance(api)["balance"] == 993
    uses = api.get("/v1/ledger", params={"end_user_id": "u", "type": "use"}).json()["data"]
    assert len(uses) == 1


def test_concurrent_batches_over_the_same_end_users_never_deadlock(server: ServerProcess) -> None:
    # Found by the write benchmark: batches locked end users in the order sent, and two batches
    # with the same end users in other orders deadlocked on PostgreSQL.
    api = new_tenant(server.base_url)
    assert api.post("/v1/features", json={"key": "credits"}).status_code == 201
    users = [f"b{i}" for i in range(20)]
    for user in users:
        assert api.post("/v1/grants", json={"end_user_id": user, "feature_key": "credits", "amount": 1000}
                        ).status_code == 201

    def batch(client: httpx.Client, i: int) -> httpx.Response:
        order = users if i % 2 else list(reversed(users))
        return client.post("/v1/usage/batch", json={"events": [
            {"end_user_id": u, "feature_key": "credits", "units": 1} for u in order * 3]})

    replies = at_once(api, 8, batch)
    assert [r.status_code for r in replies] == [200] * 8
    assert all(e["status"] == 201 for r in replies for e in r.json()["results"])
    for user in users:
        data = api.get(f"/v1/balances/{user}", params={"feature_key": "credits"}).json()["data"][0]
        assert data["balance"] == 1000 - 8 * 3
