"""PostgreSQL: a process keeps API keys' principals for mutations, and they never lag.

Each API process keeps the principal of every key it has authenticated a mutation with, and the
mutation's unit of work reads it again in its first round trip (``auth.Unconfirmed``). Two
servers on one database stand for two processes: a change made through one is seen by the very
next request to the other, as if each request looked its key up on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest

from .conftest import Api, new_tenant
from .serving import Running, database_url, engines, serve

pytestmark = pytest.mark.skipif("postgresql" not in engines(), reason="PostgreSQL is not among the engines")


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[Running, Running]]:
    url = database_url("postgresql", None)  # type: ignore[arg-type]
    with serve(url) as first, serve(url) as second:
        yield first, second


def usage(api: Api, units: int = 1) -> tuple[int, dict[str, object]]:
    reply = api.post("/v1/usage", {"end_user_id": "u1", "feature_key": "tokens", "units": units})
    return reply.status, reply.body


def test_a_key_revoked_in_another_process_is_refused_by_the_next_mutation(two: tuple[Running, Running]) -> None:
    first, second = two
    tenant = new_tenant(first.base_url)
    admin_there = Api(second.base_url, tenant.created["api_keys"][0]["key"])
    tenant.sandbox.ok("POST", "/v1/features", {"key": "tokens"}, 201)
    tenant.sandbox.ok("POST", "/v1/grants", {"end_user_id": "u1", "feature_key": "tokens", "amount": 10}, 201)
    minted = tenant.sandbox.ok("POST", "/v1/api_keys", {"name": "writer", "scopes": ["usage:write"]}, 201)
    writer = Api(first.base_url, minted["key"])
    assert usage(writer)[0] == 201
    assert usage(writer)[0] == 201  # the first process now answers from its kept principal
    admin_there.ok("DELETE", f"/v1/api_keys/{minted['id']}")
    status, body = usage(writer)
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    # A usage that would be refused for its balance is refused for the key first, as before.
    status, body = usage(writer, units=1000)
    assert status == 401
    summary = tenant.sandbox.get("/v1/usage/summary", end_user_id="u1", feature_key="tokens").body
    assert summary["events"] == 2  # the refused requests wrote nothing
    for api in (writer, admin_there, tenant.sandbox, tenant.live):
        api.close()


def test_a_refusal_is_never_answered_from_a_kept_principal(two: tuple[Running, Running]) -> None:
    first, second = two
    tenant = new_tenant(first.base_url)
    admin_there = Api(second.base_url, tenant.created["api_keys"][0]["key"])
    minted = tenant.sandbox.ok("POST", "/v1/api_keys", {"name": "reader", "scopes": ["read"]}, 201)
    reader = Api(first.base_url, minted["key"])
    assert usage(reader)[0] == 403  # the principal is kept, the scope missing
    admin_there.ok("DELETE", f"/v1/api_keys/{minted['id']}")
    status, body = usage(reader)
    assert status == 401, body  # revoked: the key is read afresh before refusing it for its scope
    for api in (reader, admin_there, tenant.sandbox, tenant.live):
        api.close()


def test_the_sandbox_clock_moved_in_another_process_dates_the_next_mutation(two: tuple[Running, Running]) -> None:
    first, second = two
    tenant = new_tenant(first.base_url)
    admin_there = Api(second.base_url, tenant.created["api_keys"][0]["key"])
    tenant.sandbox.ok("POST", "/v1/features", {"key": "tokens"}, 201)
    tenant.sandbox.ok("POST", "/v1/grants", {"end_user_id": "u1", "feature_key": "tokens", "amount": 10}, 201)
    assert usage(tenant.sandbox)[0] == 201  # the first process keeps the admin key's principal
    moved = admin_there.ok("POST", "/v1/test_clock/advance", {"seconds": 30 * 86400})["now"]
    status, body = usage(tenant.sandbox)
    assert status == 201
    created, now = (datetime.fromisoformat(str(t).replace("Z", "+00:00")) for t in (body["created_at"], moved))
    assert 0 <= (created - now).total_seconds() < 60
    for api in (admin_there, tenant.sandbox, tenant.live):
        api.close()
