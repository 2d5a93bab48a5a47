"""Isolation: another tenant's key, or the other environment's key, never sees or changes anything."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import (Api, Server, Tenant, assert_conserved, assert_error, balance_of, feature, grant, ledger,
                       new_tenant, subscribe, use, variant)

EMPTY = {"object": "list", "data": [], "has_more": False, "next_cursor": None}


def world(api: Api) -> dict[str, Any]:
    """One of everything, for end user u1, in ``api``'s tenant and environment."""
    feature(api, "credits")
    plan_variant = variant(api, [{"feature_key": "credits", "amount": 10}])
    api.ok("POST", "/v1/packs", {"key": "boost", "feature_key": "credits", "amount": 5}, 201)
    sub = subscribe(api, "u1", plan_variant["id"])
    block = grant(api, "u1", "credits", 20)
    usage = use(api, "u1", "credits", 3).body
    rsv = api.ok("POST", "/v1/reservations", {"end_user_id": "u1", "feature_key": "credits", "units": 2}, 201)
    key = api.ok("POST", "/v1/api_keys", {"name": "k", "scopes": ["read"]}, 201)
    return {"variant": plan_variant, "sub": sub, "block": block, "usage": usage, "rsv": rsv, "key": key,
            "entry": ledger(api)[0], "event": api.ok("GET", "/v1/events")["data"][0]}


def assert_invisible(other: Api, owner: Api, made: dict[str, Any]) -> None:
    before = ledger(owner)
    reads = [
        "/v1/features/credits", f"/v1/plans/{made['variant']['plan_id']}", "/v1/plans/pro",
        f"/v1/plans/{made['variant']['plan_id']}/variants", f"/v1/plan_variants/{made['variant']['id']}",
        "/v1/packs/boost", f"/v1/subscriptions/{made['sub']['id']}", f"/v1/grants/{made['block']['id']}",
        f"/v1/ledger/{made['entry']['id']}", f"/v1/usage/{made['usage']['id']}",
        f"/v1/reservations/{made['rsv']['id']}", f"/v1/events/{made['event']['id']}",
    ]
    for path in reads:
        assert_error(other.get(path), 404, "not_found")
    writes: list[tuple[str, Any, str | None]] = [
        (f"/v1/grants/{made['block']['id']}/void", None, None),
        (f"/v1/subscriptions/{made['sub']['id']}/pause", None, None),
        (f"/v1/subscriptions/{made['sub']['id']}/resume", None, None),
        (f"/v1/subscriptions/{made['sub']['id']}/cancel", {"at": "immediately"}, None),
        (f"/v1/subscriptions/{made['sub']['id']}/renew", None, None),
        (f"/v1/subscriptions/{made['sub']['id']}/change", {"plan_variant_id": made["variant"]["id"]}, None),
        (f"/v1/reservations/{made['rsv']['id']}/commit", {"units": 1}, None),
        (f"/v1/reservations/{made['rsv']['id']}/release", None, None),
        (f"/v1/reservations/{made['rsv']['id']}/extend", {"ttl_seconds": 60}, None),
        ("/v1/refunds", {"usage_id": made["usage"]["id"]}, "usage_id"),
        ("/v1/subscriptions", {"end_user_id": "u1", "plan_variant_id": made["variant"]["id"]}, "plan_variant_id"),
        ("/v1/packs/boost/purchase", {"end_user_id": "u1"}, None),
        ("/v1/features/credits", {"name": "mine now"}, None),
        (f"/v1/plans/{made['variant']['plan_id']}/variants", {"key": "x"}, None),
        ("/v1/grants", {"end_user_id": "u1", "feature_key": "credits", "amount": 1}, "feature_key"),
        ("/v1/usage", {"end_user_id": "u1", "feature_key": "credits", "units": 1}, "feature_key"),
    ]
    for path, body, param in writes:
        assert_error(other.post(path, body), 404, "not_found", param)
    assert_error(other.delete(f"/v1/api_keys/{made['key']['id']}"), 404, "not_found")
    for path in ("/v1/features", "/v1/plans", "/v1/packs", "/v1/subscriptions", "/v1/ledger", "/v1/events",
                 "/v1/reservations", "/v1/audit_log"):
        assert other.ok("GET", path) == EMPTY, path
    assert other.ok("GET", "/v1/ledger", params={"end_user_id": "u1"}) == EMPTY
    # Another tenant's id as a cursor is as unknown as a made-up one: nothing is revealed.
    assert_error(other.call("GET", "/v1/ledger", params={"starting_after": made["entry"]["id"]}), 400,
                 "invalid_request", "starting_after")
    assert other.ok("GET", "/v1/subscriptions", params={"end_user_id": "u1"}) == EMPTY
    assert other.ok("GET", "/v1/balances/u1")["data"] == []
    check = other.ok("GET", "/v1/entitlements/check", params={"end_user_id": "u1", "feature_key": "credits"})
    assert (check["allowed"], check["reason"]) == (False, "unknown_feature")
    # The owner's world is untouched, and the other side may reuse every name.
    assert ledger(owner) == before
    assert owner.ok("GET", f"/v1/subscriptions/{made['sub']['id']}")["status"] == "active"
    assert balance_of(owner, "u1", "credits") == (25, 2)
    assert assert_conserved(owner, "u1", "credits") == 25
    feature(other, "credits")
    grant(other, "u1", "credits", 1)
    assert balance_of(other, "u1", "credits") == (1, 0)
    assert balance_of(owner, "u1", "credits") == (25, 2)


@pytest.fixture
def other_tenant(server: Server) -> Iterator[Tenant]:
    t = new_tenant(server.base_url, "other")
    yield t
    t.sandbox.close()
    t.live.close()


def test_another_tenants_key_sees_and_changes_nothing(tenant: Tenant, other_tenant: Tenant) -> None:
    made = world(tenant.sandbox)
    assert_invisible(other_tenant.sandbox, tenant.sandbox, made)


def test_the_live_key_sees_nothing_of_the_sandbox(tenant: Tenant) -> None:
    made = world(tenant.sandbox)
    assert_invisible(tenant.live, tenant.sandbox, made)


def test_the_sandbox_key_sees_nothing_of_live(tenant: Tenant) -> None:
    made = world(tenant.live)
    assert_invisible(tenant.sandbox, tenant.live, made)
