"""PostgreSQL: a process keeps API keys' principals for mutations, and they never lag.

Each API process keeps the principal of every key it has authenticated a mutation with, and the
mutation's unit of work reads it again in its first round trip (``auth.Unconfirmed``). Two
servers on one database stand for two processes: a change made through one is seen by the very
next request to the other, as if each request looked its key up on its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from quotastack.api.app import Settings

from .conftest import Api, Tenant, new_tenant
from .serving import OPERATOR_KEY, Running, database_url, engines, serve

pytestmark = pytest.mark.skipif("postgresql" not in engines(), reason="PostgreSQL is not among the engines")


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[Running, Running]]:
    url = database_url("postgresql", None)  # type: ignore[arg-type]
    with serve(url) as first, serve(url) as second:
        yield first, second


def usage(api: Api, units: int = 1) -> tuple[int, dict[str, object]]:
    reply = api.post("/v1/usage", {"end_user_id": "u1", "feature_key": "tokens", "units": units})
    return reply.status, reply.body


def with_writer(first: Running, second: Running, scopes: tuple[str, ...] = ("usage:write",),
                ) -> tuple[Tenant, Api, dict[str, Any], Api]:
    """A new tenant whose sandbox has ``tokens`` and 10 of them for u1; a client of its admin key
    on the second process; a key minted with ``scopes``, and a client of the first process with it."""
    tenant = new_tenant(first.base_url)
    admin_there = Api(second.base_url, tenant.created["api_keys"][0]["key"])
    tenant.sandbox.ok("POST", "/v1/features", {"key": "tokens"}, 201)
    tenant.sandbox.ok("POST", "/v1/grants", {"end_user_id": "u1", "feature_key": "tokens", "amount": 10}, 201)
    minted = tenant.sandbox.ok("POST", "/v1/api_keys", {"name": "writer", "scopes": list(scopes)}, 201)
    return tenant, admin_there, minted, Api(first.base_url, minted["key"])


def test_a_key_revoked_in_another_process_is_refused_by_the_next_mutation(two: tuple[Running, Running]) -> None:
    first, second = two
    tenant, admin_there, minted, writer = with_writer(first, second)
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
    tenant, admin_there, minted, reader = with_writer(first, second, scopes=("read",))
    assert usage(reader)[0] == 403  # the principal is kept, the scope missing
    admin_there.ok("DELETE", f"/v1/api_keys/{minted['id']}")
    status, body = usage(reader)
    assert status == 401, body  # revoked: the key is read afresh before refusing it for its scope
    for api in (reader, admin_there, tenant.sandbox, tenant.live):
        api.close()


def test_the_sandbox_clock_moved_in_another_process_dates_the_next_mutation(two: tuple[Running, Running]) -> None:
    first, second = two
    tenant, admin_there, _minted, writer = with_writer(first, second)
    writer.close()
    assert usage(tenant.sandbox)[0] == 201  # the first process keeps the admin key's principal
    moved = admin_there.ok("POST", "/v1/test_clock/advance", {"seconds": 30 * 86400})["now"]
    status, body = usage(tenant.sandbox)
    assert status == 201
    created, now = (datetime.fromisoformat(str(t).replace("Z", "+00:00")) for t in (body["created_at"], moved))
    assert 0 <= (created - now).total_seconds() < 60
    for api in (admin_there, tenant.sandbox, tenant.live):
        api.close()


def test_a_revoked_key_is_refused_for_the_key_before_its_request_is_refused(two: tuple[Running, Running]) -> None:
    """Found by trying to break it: a malformed body or Idempotency-Key was refused with 400 from
    the kept principal of a key another process had revoked (a process that never saw the key
    answered 401). The key is read afresh before any refusal made ahead of the unit of work."""
    first, second = two
    tenant, admin_there, minted, writer = with_writer(first, second)
    assert usage(writer)[0] == 201
    admin_there.ok("DELETE", f"/v1/api_keys/{minted['id']}")
    assert writer.call("POST", "/v1/usage", content=b"{x").status == 401
    body = {"end_user_id": "u1", "feature_key": "tokens", "units": 1}
    assert writer.post("/v1/usage", {**body, "bogus": 1}).status == 401
    assert writer.post("/v1/usage", body, headers={"Idempotency-Key": "k" * 300}).status == 401
    for api in (writer, admin_there, tenant.sandbox, tenant.live):
        api.close()


def test_a_request_takes_one_token_of_its_rate_limit_however_its_key_is_confirmed() -> None:
    """Found by trying to break it: a mutation rerun after another process moved the sandbox clock,
    and a 403 from a kept principal, each took two tokens of the key's rate limit."""
    url = database_url("postgresql", None)  # type: ignore[arg-type]
    limited = Settings(operator_key=OPERATOR_KEY, rate_limit_per_second=5)  # bursts of 10
    with serve(url, limited) as first, serve(url, limited) as second:
        tenant, admin_there, _minted, writer = with_writer(first, second)
        tenant.sandbox.ok("POST", "/v1/grants", {"end_user_id": "u1", "feature_key": "tokens", "amount": 90}, 201)
        assert usage(writer)[0] == 201  # kept by the first process from now on
        time.sleep(2.2)  # a full bucket again
        statuses = []
        for _ in range(9):  # each usage reruns: the clock moved since the principal was kept
            admin_there.ok("POST", "/v1/test_clock/advance", {"seconds": 60})
            statuses.append(usage(writer)[0])
        assert statuses == [201] * 9
        time.sleep(2.2)
        grants = [writer.post("/v1/grants", {"end_user_id": "u1", "feature_key": "tokens", "amount": 1}).status
                  for _ in range(4)]
        assert grants == [403] * 4
        assert [usage(writer)[0] for _ in range(5)] == [201] * 5
        for api in (writer, admin_there, tenant.sandbox, tenant.live):
            api.close()
