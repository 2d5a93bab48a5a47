"""Service endpoints (no key), tenants, and the headers every response carries."""

from __future__ import annotations

import re

from .conftest import OPERATOR_KEY, REQUEST_ID, Api, Server, Tenant, assert_error, feature


def test_healthz_answers_ok_without_a_key(anonymous: Api) -> None:
    reply = anonymous.get("/healthz")
    assert (reply.status, reply.body) == (200, {"status": "ok"})


def test_readyz_reports_the_database_it_reached(anonymous: Api, server: Server) -> None:
    reply = anonymous.get("/readyz")
    assert (reply.status, reply.body) == (200, {"status": "ready", "database": server.db.kind})
    assert server.db.kind in ("sqlite", "postgresql")


def _counter(text: str, route: str, status: int) -> float:
    pattern = rf'^quotastack_requests_total\{{route="{re.escape(route)}",status="{status}"\}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_metrics_count_each_request_by_route_and_status(anonymous: Api, api: Api) -> None:
    before = anonymous.get("/metrics").text
    anonymous.get("/healthz")
    api.get("/v1/entitlements/check", end_user_id="u1", feature_key="nothing")
    api.get("/v1/features/nothing")
    after = anonymous.get("/metrics")
    assert after.status == 200
    assert after.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert _counter(after.text, "/healthz", 200) - _counter(before, "/healthz", 200) == 1
    check = "/v1/entitlements/check"
    assert _counter(after.text, check, 200) - _counter(before, check, 200) == 1
    one = "/v1/features/{key}"
    assert _counter(after.text, one, 404) - _counter(before, one, 404) == 1
    # The histogram adds up: its +Inf bucket and its count are every request of the route.
    route = re.escape(check)
    inf = re.search(rf'^quotastack_request_duration_seconds_bucket\{{le="\+Inf",route="{route}"\}} (\S+)$',
                    after.text, re.MULTILINE)
    count = re.search(rf'^quotastack_request_duration_seconds_count\{{route="{route}"\}} (\S+)$',
                      after.text, re.MULTILINE)
    assert inf and count and float(inf.group(1)) == float(count.group(1)) >= 1
    every_status = re.findall(rf'^quotastack_requests_total\{{route="{route}",status="\d+"\}} (\S+)$', after.text,
                              re.MULTILINE)
    assert float(count.group(1)) == sum(float(n) for n in every_status)


def test_openapi_json_documents_every_route(anonymous: Api) -> None:
    reply = anonymous.get("/openapi.json")
    assert reply.status == 200
    assert reply.body["info"]["title"] == "QuotaStack"
    expected = {
        "/healthz", "/readyz", "/metrics", "/v1/tenants", "/v1/api_keys", "/v1/api_keys/{key_id}",
        "/v1/features", "/v1/features/{key}", "/v1/plans", "/v1/plans/{plan_id}", "/v1/plans/{plan_id}/variants",
        "/v1/plans/{plan_id}/variants/{variant_id}", "/v1/plan_variants/{variant_id}", "/v1/packs",
        "/v1/packs/{key}", "/v1/packs/{key}/purchase", "/v1/subscriptions", "/v1/subscriptions/{subscription_id}",
        "/v1/grants", "/v1/grants/{block_id}", "/v1/grants/{block_id}/void", "/v1/balances/{end_user_id}",
        "/v1/entitlements/check", "/v1/entitlements", "/v1/usage", "/v1/usage/batch", "/v1/usage/summary",
        "/v1/usage/{usage_id}", "/v1/ledger", "/v1/ledger/{entry_id}", "/v1/events", "/v1/events/{event_id}",
        "/v1/audit_log", "/v1/test_clock", "/v1/test_clock/advance", "/v1/reservations",
        "/v1/reservations/{reservation_id}", "/v1/reservations/{reservation_id}/commit",
        "/v1/reservations/{reservation_id}/release", "/v1/reservations/{reservation_id}/extend", "/v1/refunds",
        "/v1/subscriptions/{subscription_id}/change", "/v1/subscriptions/{subscription_id}/pause",
        "/v1/subscriptions/{subscription_id}/resume", "/v1/subscriptions/{subscription_id}/cancel",
        "/v1/subscriptions/{subscription_id}/renew",
    }
    assert expected <= set(reply.body["paths"])
    usage = reply.body["paths"]["/v1/usage"]["post"]
    assert "application/json" in usage["requestBody"]["content"]


def test_docs_pages_are_markdown_and_unknown_pages_are_404(anonymous: Api) -> None:
    index = anonymous.get("/llms.txt")
    assert (index.status, index.headers["content-type"]) == (200, "text/markdown; charset=utf-8")
    assert_error(anonymous.get("/docs/no-such-page.md"), 404, "not_found")


def test_an_unknown_route_is_404_not_found_in_the_envelope(api: Api) -> None:
    error = assert_error(api.get("/v1/nothing_here"), 404, "not_found")
    assert error["type"] == "invalid_request_error"


def test_every_response_has_its_own_request_id(api: Api) -> None:
    ids = {api.get("/healthz").headers["Request-Id"] for _ in range(5)}
    ids.add(api.get("/v1/entitlements/check", end_user_id="u1", feature_key="x").headers["Request-Id"])
    ids.add(api.post("/v1/features", {}).headers["Request-Id"])
    assert len(ids) == 7 and all(REQUEST_ID.match(i) for i in ids)


def test_the_fast_path_check_carries_the_headers_on_errors_too(api: Api, anonymous: Api) -> None:
    # reply_of checks Request-Id and Server-Timing on every reply; these are the check's error paths.
    assert_error(anonymous.get("/v1/entitlements/check", end_user_id="u1", feature_key="x"), 401, "unauthenticated")
    assert_error(api.get("/v1/entitlements/check", feature_key="x"), 400, "invalid_request", "end_user_id")
    feature(api, "x")
    assert_error(api.get("/v1/entitlements/check", end_user_id="u1", feature_key="x", units="-1"),
                 400, "invalid_amount", "units")


# ---- tenants -------------------------------------------------------------------------------------------

def test_the_operator_creates_a_tenant_with_one_admin_key_per_environment(server: Server) -> None:
    operator = Api(server.base_url, OPERATOR_KEY)
    try:
        reply = operator.post("/v1/tenants", {"name": "globex"})
    finally:
        operator.close()
    assert reply.status == 201
    tenant = reply.body
    assert tenant["id"].startswith("ten_") and tenant["name"] == "globex" and tenant["object"] == "tenant"
    sandbox, live = tenant["api_keys"]
    assert (sandbox["environment"], live["environment"]) == ("sandbox", "live")
    assert sandbox["key"].startswith("qs_test_") and live["key"].startswith("qs_live_")
    assert sandbox["scopes"] == live["scopes"] == ["admin"]
    assert sandbox["id"].startswith("key_") and sandbox["revoked_at"] is None
    for key in (sandbox["key"], live["key"]):
        client = Api(server.base_url, key)
        try:
            assert client.get("/v1/features").body == {"object": "list", "data": [], "has_more": False,
                                                       "next_cursor": None}
        finally:
            client.close()


def test_creating_a_tenant_needs_the_operator_key(server: Server, tenant: Tenant, anonymous: Api) -> None:
    assert_error(anonymous.post("/v1/tenants", {"name": "x"}), 401, "unauthenticated")
    assert_error(tenant.sandbox.post("/v1/tenants", {"name": "x"}), 401, "unauthenticated")
    wrong = Api(server.base_url, OPERATOR_KEY + "-not")
    try:
        assert_error(wrong.post("/v1/tenants", {"name": "x"}), 401, "unauthenticated")
    finally:
        wrong.close()


def test_a_tenant_needs_a_name(server: Server) -> None:
    operator = Api(server.base_url, OPERATOR_KEY)
    try:
        assert_error(operator.post("/v1/tenants", {}), 400, "invalid_request", "name")
        assert_error(operator.post("/v1/tenants", {"name": ""}), 400, "invalid_request", "name")
    finally:
        operator.close()

