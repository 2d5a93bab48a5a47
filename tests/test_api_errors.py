"""Every error code of API.md §1, in the one envelope, with Request-Id and Server-Timing on each.

Also the failures that need the server's insides: a request still in flight (409
idempotency_key_in_use), a rate-limited server (429), and a bug half-way through a mutation (500,
with nothing persisted).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quotastack.api.app import Settings
from quotastack.service import credits as credits_service
from quotastack.service import entitlements as entitlements_service
from quotastack.service import tenants as tenants_service
from quotastack.service import usage as usage_service
from quotastack.service.context import Ctx

from .serving import database_url, serve
from .conftest import (OPERATOR_KEY, Api, Server, Tenant, assert_conserved, assert_error, balance_of, feature, grant,
                       instant, ledger, new_tenant, rfc3339, subscribe, use, variant)

# ---- 400 invalid_request ----------------------------------------------------------------------------------


def test_malformed_json_is_invalid_request(api: Api) -> None:
    for raw in (b'{"key": ', b"{'key': 'x'}", b'{"key": "x",}', b"\xff\xfe", b'{"amount": NaN}', b"[1, 2"):
        error = assert_error(api.call("POST", "/v1/features", content=raw), 400, "invalid_request")
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith("malformed JSON body")


def test_a_body_that_is_not_an_object_is_invalid_request(api: Api) -> None:
    for body in ([{"key": "x"}], "x", 3):
        assert_error(api.post("/v1/features", body), 400, "invalid_request")


def test_unknown_missing_and_wrongly_typed_fields_are_invalid_request(api: Api) -> None:
    error = assert_error(api.post("/v1/features", {"key": "x", "colour": "red"}), 400, "invalid_request", "colour")
    assert error["message"] == "colour: unknown field"
    error = assert_error(api.post("/v1/features", {"name": "x"}), 400, "invalid_request", "key")
    assert error["message"] == "key: missing field"
    assert_error(api.post("/v1/features", {"key": 5}), 400, "invalid_request", "key")
    assert_error(api.post("/v1/features", {"key": "x", "precision": "2"}), 400, "invalid_request", "precision")
    assert_error(api.post("/v1/features", {"key": "x", "precision": 2.5}), 400, "invalid_request", "precision")
    assert_error(api.post("/v1/features", {"key": "x", "precision": True}), 400, "invalid_request", "precision")
    assert_error(api.post("/v1/features", {"key": "x", "metadata": []}), 400, "invalid_request", "metadata")
    assert_error(api.post("/v1/usage", {"end_user_id": 7, "feature_key": "x", "units": 1}),
                 400, "invalid_request", "end_user_id")
    assert_error(api.post("/v1/plans/p/variants", {"key": "v", "entitlements": [{"feature_key": "f", "x": 1}]}),
                 400, "invalid_request", "entitlements[0].x")
    assert api.ok("GET", "/v1/features")["data"] == []


def test_bad_query_parameters_are_invalid_request(api: Api) -> None:
    assert_error(api.get("/v1/features", limit="many"), 400, "invalid_request", "limit")
    assert_error(api.get("/v1/ledger", **{"from": "2026-13-01T00:00:00Z"}), 400, "invalid_request", "from")
    assert_error(api.get("/v1/usage/summary", feature_key="x"), 400, "invalid_request", "end_user_id")


def test_an_idempotency_key_must_be_1_to_255_characters(api: Api) -> None:
    body = {"key": "x"}
    assert_error(api.post("/v1/features", body, key="k" * 256), 400, "invalid_request", "Idempotency-Key")
    assert_error(api.post("/v1/features", body, key=""), 400, "invalid_request", "Idempotency-Key")
    assert api.post("/v1/features", body, key="k" * 255).status == 201


# ---- 400 invalid_amount -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("amount", "message"), [
    (-1, "amount must be positive"),
    ("-0.01", "amount must be positive"),
    (0, "amount must be positive"),
    ("0.00", "amount must be positive"),
    ("1.001", "amount has more than 2 decimal places"),
    ("17.9699999", "amount has more than 2 decimal places"),
    ("10000000000000.01", "amount is out of range"),  # 10**15 minor units is the largest amount
    ("NaN", "amount must be a decimal number"),
    ("Infinity", "amount must be a decimal number"),
    ("ten", "amount must be a decimal number"),
    (True, "amount must be a number"),
    (None, "amount must be a decimal number"),
    ([1], "amount must be a decimal number"),
    # Regressions: Decimal arithmetic once rounded these to 28 digits, to zero, or overflowed (500).
    ("1.00000000000000000000000000001", "amount has more than 2 decimal places"),
    ("1e-999999999", "amount has more than 2 decimal places"),
    ("1e999999999", "amount is out of range"),
])
def test_invalid_amounts_are_invalid_amount(api: Api, amount: Any, message: str) -> None:
    feature(api, "credits", precision=2)
    body = {"end_user_id": "u1", "feature_key": "credits", "amount": amount}
    error = assert_error(api.post("/v1/grants", body), 400, "invalid_amount", "amount")
    assert (error["type"], error["message"]) == ("invalid_request_error", message)
    assert ledger(api) == []


def test_the_largest_amount_is_accepted_and_one_more_minor_unit_is_not(api: Api) -> None:
    feature(api, "credits", precision=2)
    assert grant(api, "u1", "credits", "10000000000000.00")["original_amount"] == 10**13
    assert_error(api.post("/v1/grants", {"end_user_id": "u2", "feature_key": "credits",
                                         "amount": "10000000000000.01"}), 400, "invalid_amount", "amount")


def test_json_numbers_are_read_exactly_and_never_as_floats(api: Api) -> None:
    feature(api, "credits", precision=2)
    raw = b'{"end_user_id": "u1", "feature_key": "credits", "amount": 1.00000000000000000000000000001}'
    assert_error(api.call("POST", "/v1/grants", content=raw), 400, "invalid_amount", "amount")
    huge = b'{"end_user_id": "u1", "feature_key": "credits", "amount": 1e400}'
    assert_error(api.call("POST", "/v1/grants", content=huge), 400, "invalid_amount", "amount")
    exact = b'{"end_user_id": "u1", "feature_key": "credits", "amount": 2.50}'
    assert api.call("POST", "/v1/grants", content=exact).body["original_amount"] == Decimal("2.5")


# ---- 401, 403, 404, 402, 409, 422 -------------------------------------------------------------------------

def test_no_key_is_401_unauthenticated(anonymous: Api) -> None:
    error = assert_error(anonymous.get("/v1/features"), 401, "unauthenticated")
    assert error["type"] == "authentication_error"


def test_a_key_without_the_scope_is_403_forbidden(server: Server, api: Api) -> None:
    reader = Api(server.base_url, api.ok("POST", "/v1/api_keys", {"name": "r", "scopes": ["read"]}, 201)["key"])
    try:
        error = assert_error(reader.post("/v1/features", {"key": "x"}), 403, "forbidden")
        assert error["type"] == "permission_error"
    finally:
        reader.close()


def test_a_missing_object_is_404_not_found(api: Api) -> None:
    for path in ("/v1/features/x", "/v1/plans/x", "/v1/plan_variants/var_x", "/v1/packs/x", "/v1/subscriptions/sub_x",
                 "/v1/grants/blk_x", "/v1/ledger/led_x", "/v1/events/evt_x", "/v1/usage/use_x",
                 "/v1/reservations/rsv_x"):
        error = assert_error(api.get(path), 404, "not_found")
        assert error["type"] == "invalid_request_error"


def test_not_enough_balance_is_402_insufficient_balance(api: Api) -> None:
    feature(api, "credits")
    error = assert_error(use(api, "u1", "credits", 1), 402, "insufficient_balance", "units")
    assert error["type"] == "balance_error"


def test_voiding_a_voided_block_is_409_invalid_state(api: Api) -> None:
    feature(api, "credits")
    block = grant(api, "u1", "credits", 5)
    api.ok("POST", f"/v1/grants/{block['id']}/void")
    error = assert_error(api.post(f"/v1/grants/{block['id']}/void"), 409, "invalid_state")
    assert error["message"] == f"credit block {block['id']} is voided"


def test_resuming_an_active_subscription_is_409_invalid_state(api: Api) -> None:
    sub = subscribe(api, "u1", variant(api, [])["id"])
    error = assert_error(api.post(f"/v1/subscriptions/{sub['id']}/resume"), 409, "invalid_state")
    assert error["type"] == "state_error"
    assert api.ok("GET", f"/v1/subscriptions/{sub['id']}") == sub


def test_a_second_subscription_is_409_subscription_exists(api: Api) -> None:
    feature(api, "credits")
    plan_variant = variant(api, [])
    subscribe(api, "u1", plan_variant["id"])
    error = assert_error(api.post("/v1/subscriptions", {"end_user_id": "u1", "plan_variant_id": plan_variant["id"]}),
                         409, "subscription_exists", "end_user_id")
    assert error["type"] == "state_error"


def test_a_reused_idempotency_key_is_422_idempotency_key_reused(api: Api) -> None:
    api.ok("POST", "/v1/features", {"key": "a"}, 201, key="k1")
    error = assert_error(api.post("/v1/features", {"key": "b"}, key="k1"), 422, "idempotency_key_reused",
                         "Idempotency-Key")
    assert error["type"] == "idempotency_error"


# ---- 403 forbidden_in_live: the sandbox clock ----------------------------------------------------------

def test_the_test_clock_is_sandbox_only(tenant: Tenant) -> None:
    clock = tenant.sandbox.ok("GET", "/v1/test_clock")
    assert (clock["object"], clock["advanced_seconds"]) == ("test_clock", 0)
    error = assert_error(tenant.live.get("/v1/test_clock"), 403, "forbidden_in_live")
    assert error["type"] == "permission_error"
    assert_error(tenant.live.post("/v1/test_clock/advance", {"seconds": 60}), 403, "forbidden_in_live")
    assert tenant.sandbox.ok("GET", "/v1/test_clock")["advanced_seconds"] == 0


def test_concurrent_clock_advances_add_up_and_never_move_the_clock_back(server: Server, tenant: Tenant) -> None:
    """Found by trying to break it (two processes on PostgreSQL): each advance read the clock and
    wrote its own result, so concurrent ones were lost (four advances of 1,000 s moved it 2,000 to
    3,000 s) and a ``to`` behind another could land after it. The environment is locked now."""
    key = tenant.created["api_keys"][0]["key"]

    def post(body: dict[str, Any]) -> int:
        own = Api(server.base_url, key)
        try:
            return own.post("/v1/test_clock/advance", body).status
        finally:
            own.close()

    with ThreadPoolExecutor(4) as pool:
        for round_ in range(3):
            assert list(pool.map(post, [{"seconds": 1000}] * 4)) == [200] * 4
            assert tenant.sandbox.ok("GET", "/v1/test_clock")["advanced_seconds"] == 4000 * (round_ + 1)
        for _ in range(3):
            start = instant(tenant.sandbox.ok("GET", "/v1/test_clock")["now"])
            ahead, behind = start + timedelta(hours=10), start + timedelta(hours=5)
            statuses = list(pool.map(post, [{"to": rfc3339(ahead)}, {"to": rfc3339(behind)}]))
            assert statuses[0] == 200 and statuses[1] in (200, 400)
            now = instant(tenant.sandbox.ok("GET", "/v1/test_clock")["now"])
            assert ahead <= now < ahead + timedelta(minutes=1)


def test_the_test_clock_moves_forward_only(api: Api) -> None:
    moved = api.ok("POST", "/v1/test_clock/advance", {"seconds": 3600})
    assert moved["advanced_seconds"] == 3600
    later = api.ok("POST", "/v1/test_clock/advance", {"to": "2999-01-01T00:00:00Z"})
    assert later["now"] == "2999-01-01T00:00:00Z"
    assert_error(api.post("/v1/test_clock/advance", {"to": "2998-12-31T23:59:59Z"}), 400, "invalid_request", "to")
    assert_error(api.post("/v1/test_clock/advance", {"seconds": -1}), 400, "invalid_request", "seconds")
    assert_error(api.post("/v1/test_clock/advance", {}), 400, "invalid_request", "seconds")
    assert_error(api.post("/v1/test_clock/advance", {"seconds": 1, "to": "2999-01-02T00:00:00Z"}),
                 400, "invalid_request", "seconds")


# ---- 409 idempotency_key_in_use ------------------------------------------------------------------------

def ctx_of(server: Server, key: str) -> Ctx:
    """The context a request with ``key`` runs in (tenant, environment), read from the store."""
    with server.db.reader() as tx:
        principal = tenants_service.authenticate(tx, key)
    return Ctx(principal["tenant_id"], principal["env_id"], principal["kind"], principal["key_id"], frozenset(), 0,
               "req_test")


def test_a_key_still_in_flight_is_409_idempotency_key_in_use(server: Server, tenant: Tenant) -> None:
    api = tenant.sandbox
    feature(api, "credits")
    body = {"end_user_id": "u1", "feature_key": "credits", "amount": 5}
    mutations = server.app.app.state.mutations
    with mutations.claim(ctx_of(server, api.key), "pay-1"):  # a request with this key is still running
        error = assert_error(api.post("/v1/grants", body, key="pay-1"), 409, "idempotency_key_in_use",
                             "Idempotency-Key")
        assert error["type"] == "idempotency_error"
        assert_error(use(api, "u1", "credits", 1, key="pay-1"), 409, "idempotency_key_in_use", "Idempotency-Key")
        in_batch = api.ok("POST", "/v1/usage/batch", {"events": [
            {"end_user_id": "u1", "feature_key": "credits", "units": 1, "idempotency_key": "pay-1"}]})
        assert [(r["status"], r["error"]["code"]) for r in in_batch["results"]] == [(409, "idempotency_key_in_use")]
        assert api.post("/v1/grants", body, key="pay-2").status == 201  # other keys are free
        feature(tenant.live, "credits")
        assert tenant.live.post("/v1/grants", body, key="pay-1").status == 201  # keys are per environment
        assert balance_of(api, "u1", "credits") == (5, 0)
    # The 409 was not stored: once the first request is over, the key works.
    done = api.post("/v1/grants", body, key="pay-1")
    assert (done.status, done.replayed) == (201, False)
    assert assert_conserved(api, "u1", "credits") == 10


# ---- 429 rate_limited ----------------------------------------------------------------------------------

@pytest.fixture
def limited_server(tmp_path: Path) -> Iterator[Server]:
    # Half a request a second, bursts of one: a second request within a second is refused.
    # Rate limits live in the process, whatever the database: SQLite is enough here.
    with serve(database_url("sqlite", tmp_path), Settings(operator_key=OPERATOR_KEY,
                                                          rate_limit_per_second=0.5)) as running:
        yield running


def test_too_many_requests_are_429_with_retry_after(limited_server: Server) -> None:
    tenant = new_tenant(limited_server.base_url)
    api = tenant.sandbox
    second = Api(limited_server.base_url, api.ok("POST", "/v1/api_keys", {"name": "k", "scopes": ["read"]}, 201)["key"])
    operator = Api(limited_server.base_url, OPERATOR_KEY)
    try:
        for reply in (api.post("/v1/features", {"key": "credits"}, key="f-1"),
                      api.get("/v1/entitlements/check", end_user_id="u1", feature_key="credits"),
                      api.get("/v1/features")):
            error = assert_error(reply, 429, "rate_limited")
            assert error["type"] == "rate_limit_error"
            assert reply.headers["Retry-After"] == "2"
        # Each key has its own bucket; the refused POST created nothing.
        assert_error(second.get("/v1/features/credits"), 404, "not_found")
        assert tenant.live.get("/v1/features").status == 200
        assert operator.post("/v1/tenants", {"name": "other"}).status == 201  # the operator is not limited
    finally:
        for client in (api, tenant.live, second, operator):
            client.close()


# ---- 500 internal_error --------------------------------------------------------------------------------

def test_a_bug_after_writes_is_500_and_nothing_is_persisted(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    feature(api, "credits", precision=2)
    grant(api, "u1", "credits", 10)
    entries, events = ledger(api), api.ok("GET", "/v1/events")["data"]
    audit = api.ok("GET", "/v1/audit_log")["data"]
    written: list[dict[str, Any]] = []
    real = usage_service.record_usage

    def record_then_fail(tx: Any, ctx: Any, data: dict[str, Any]) -> Any:
        written.append(real(tx, ctx, data))  # ledger entries, a usage event, a balance change…
        raise RuntimeError("a bug after the writes")

    monkeypatch.setattr(usage_service, "record_usage", record_then_fail)
    reply = use(api, "u1", "credits", "2.5", key="use-1")
    error = assert_error(reply, 500, "internal_error")
    assert (error["type"], error["message"]) == ("api_error", "internal error: nothing was changed")
    assert len(written) == 1 and written[0]["entries"]
    # The same connection keeps working after a 500, and nothing of the failed request is left.
    assert ledger(api) == entries
    assert balance_of(api, "u1", "credits") == (10, 0)
    assert api.ok("GET", "/v1/events")["data"] == events
    assert api.ok("GET", "/v1/audit_log")["data"] == audit
    assert_error(api.get(f"/v1/usage/{written[0]['id']}"), 404, "not_found")
    monkeypatch.setattr(usage_service, "record_usage", real)
    retried = use(api, "u1", "credits", "2.5", key="use-1")  # the key was not stored either
    assert (retried.status, retried.replayed) == (201, False)
    assert assert_conserved(api, "u1", "credits") == Decimal("7.5")


def test_a_500_keeps_the_connection_for_the_next_request(server: Server, api: Api,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Two pipelined requests on one connection: the server must answer both. (The framework
    # re-raises a handled bug to the server, which then dropped the connection under the second.)
    feature(api, "credits")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(usage_service, "record_usage", broken)
    host, port = server.base_url.removeprefix("http://").split(":")
    body = b'{"end_user_id": "u1", "feature_key": "credits", "units": 1}'
    first = (b"POST /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + api.key.encode() +
             b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(first + second)
        received = b""
        while b'{"status":"ok"}' not in received:
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 500 ")
    assert b'"code":"internal_error"' in received
    assert b'"}}HTTP/1.1 200 OK\r\n' in received  # the 500's body, then the second response
    assert received.endswith(b'{"status":"ok"}')


def test_a_bug_in_a_grant_leaves_no_block(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    feature(api, "credits")
    made: list[str] = []
    real = credits_service.grant

    def grant_then_fail(tx: Any, ctx: Any, data: dict[str, Any]) -> Any:
        made.append(real(tx, ctx, data)["id"])
        raise RuntimeError("a bug after the writes")

    monkeypatch.setattr(credits_service, "grant", grant_then_fail)
    assert_error(api.post("/v1/grants", {"end_user_id": "u1", "feature_key": "credits", "amount": 5}),
                 500, "internal_error")
    assert_error(api.get(f"/v1/grants/{made[0]}"), 404, "not_found")
    assert ledger(api) == []
    assert api.ok("GET", "/v1/subscriptions", params={"end_user_id": "u1"})["data"] == []


def test_a_bug_in_the_fast_path_check_is_500_in_the_envelope(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    feature(api, "credits")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the check")

    # The core that every way of answering a check goes through (kept answers or not).
    monkeypatch.setattr(entitlements_service, "_answer", broken)
    reply = api.get("/v1/entitlements/check", end_user_id="u1", feature_key="credits")
    assert reply.headers["content-type"] == "application/json"
    assert_error(reply, 500, "internal_error")
    monkeypatch.undo()
    assert api.get("/v1/entitlements/check", end_user_id="u1", feature_key="credits").status == 200
