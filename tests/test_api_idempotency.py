"""Idempotency-Key: replays, what is stored and what is not, reuse, races, the body key on usage."""

from __future__ import annotations

import threading
from typing import Any

from .conftest import (Api, Reply, Server, Tenant, assert_conserved, assert_error, balance_of, feature, grant, ledger,
                       new_tenant, use, variant)

GRANT = {"end_user_id": "u1", "feature_key": "credits", "amount": 5}


def assert_replay(first: Reply, again: Reply) -> None:
    assert not first.replayed and "Idempotent-Replayed" not in first.headers
    assert again.replayed
    assert (again.status, again.text) == (first.status, first.text)
    assert again.headers["Request-Id"] != first.headers["Request-Id"]


def test_a_replayed_mutation_returns_the_first_response_and_changes_nothing(api: Api) -> None:
    feature(api, "credits")
    first = api.post("/v1/grants", GRANT, key="grant-1")
    entries, events, audit = ledger(api), api.ok("GET", "/v1/events")["data"], api.ok("GET", "/v1/audit_log")["data"]
    for _ in range(3):
        assert_replay(first, api.post("/v1/grants", GRANT, key="grant-1"))
    assert ledger(api) == entries
    assert api.ok("GET", "/v1/events")["data"] == events
    assert api.ok("GET", "/v1/audit_log")["data"] == audit
    assert assert_conserved(api, "u1", "credits") == 5


def test_every_kind_of_mutation_replays(api: Api) -> None:
    sent: list[tuple[str, str, Any, Reply]] = []

    def once(path: str, body: Any = None, method: str = "POST") -> Any:
        reply = api.call(method, path, body, key=f"k{len(sent)}")
        assert reply.status in (200, 201), reply.text
        sent.append((method, path, body, reply))
        return reply.body

    once("/v1/features", {"key": "credits"})
    once("/v1/features/credits", {"name": "Credits"})
    plan = once("/v1/plans", {"key": "pro"})
    plan_variant = once(f"/v1/plans/{plan['id']}/variants",
                        {"key": "pro_m", "entitlements": [{"feature_key": "credits", "amount": 3}]})
    once("/v1/packs", {"key": "boost", "feature_key": "credits", "amount": 10})
    block = once("/v1/packs/boost/purchase", {"end_user_id": "u1"})
    usage = once("/v1/usage", {"end_user_id": "u1", "feature_key": "credits", "units": 2})
    once("/v1/usage/batch", {"events": [{"end_user_id": "u1", "feature_key": "credits", "units": 1}]})
    once("/v1/refunds", {"usage_id": usage["id"]})
    rsv = once("/v1/reservations", {"end_user_id": "u1", "feature_key": "credits", "units": 3})
    once(f"/v1/reservations/{rsv['id']}/extend", {"ttl_seconds": 60})
    once(f"/v1/reservations/{rsv['id']}/commit", {"units": 1, "final": False})
    once(f"/v1/reservations/{rsv['id']}/release")
    key = once("/v1/api_keys", {"name": "backend", "scopes": ["read"]})
    once(f"/v1/api_keys/{key['id']}", method="DELETE")
    once("/v1/subscriptions", {"end_user_id": "u2", "plan_variant_id": plan_variant["id"]})
    once("/v1/grants", {"end_user_id": "u1", "feature_key": "credits", "amount": 4})
    once(f"/v1/grants/{block['id']}/void")
    once("/v1/test_clock/advance", {"seconds": 60})
    entries, clock = ledger(api), api.ok("GET", "/v1/test_clock")["advanced_seconds"]
    for i, (method, path, body, first) in enumerate(sent):
        assert_replay(first, api.call(method, path, body, key=f"k{i}"))
    assert ledger(api) == entries
    assert api.ok("GET", "/v1/test_clock")["advanced_seconds"] == clock == 60
    assert [f["key"] for f in api.ok("GET", "/v1/features")["data"]] == ["credits"]
    assert len(api.ok("GET", "/v1/subscriptions")["data"]) == 1
    # The pack's 10: 2 + 1 used, 2 refunded, 1 committed, the other 8 voided; then the grant of 4.
    assert balance_of(api, "u1", "credits") == (4, 0)
    assert assert_conserved(api, "u1", "credits") == 4
    assert assert_conserved(api, "u2", "credits") == 3


def test_a_402_is_stored_and_replayed_even_after_a_top_up(api: Api) -> None:
    feature(api, "credits")
    first = use(api, "u1", "credits", 3, key="use-1")
    assert_error(first, 402, "insufficient_balance", "units")
    grant(api, "u1", "credits", 10)
    again = use(api, "u1", "credits", 3, key="use-1")
    assert_replay(first, again)
    assert balance_of(api, "u1", "credits") == (10, 0)
    assert use(api, "u1", "credits", 3, key="use-2").status == 201


def test_a_409_invalid_state_is_stored_and_replayed(api: Api) -> None:
    feature(api, "credits")
    block = grant(api, "u1", "credits", 10)
    api.ok("POST", f"/v1/grants/{block['id']}/void")
    first = api.post(f"/v1/grants/{block['id']}/void", key="void-1")
    assert_error(first, 409, "invalid_state")
    assert_replay(first, api.post(f"/v1/grants/{block['id']}/void", key="void-1"))


def test_requests_rejected_before_any_work_are_not_stored(server: Server, tenant: Tenant) -> None:
    api = tenant.sandbox
    # 404: the feature does not exist yet; create it and send the very same request again.
    assert_error(api.post("/v1/grants", GRANT, key="g-404"), 404, "not_found", "feature_key")
    feature(api, "credits")
    fixed = api.post("/v1/grants", GRANT, key="g-404")
    assert (fixed.status, fixed.replayed) == (201, False)
    # 400: fix the body and retry with the same key.
    assert_error(api.post("/v1/grants", GRANT | {"amount": "0.5"}, key="g-400"), 400, "invalid_amount", "amount")
    assert_error(api.post("/v1/grants", GRANT | {"colour": 1}, key="g-400"), 400, "invalid_request", "colour")
    fixed = api.post("/v1/grants", GRANT, key="g-400")
    assert (fixed.status, fixed.replayed) == (201, False)
    # 401: a wrong key, then the right one.
    wrong = Api(server.base_url, api.key + "x")
    reader = Api(server.base_url, api.ok("POST", "/v1/api_keys", {"name": "r", "scopes": ["read"]}, 201)["key"])
    try:
        assert_error(wrong.post("/v1/grants", GRANT, key="g-401"), 401, "unauthenticated")
        assert_error(reader.post("/v1/grants", GRANT, key="g-403"), 403, "forbidden")
    finally:
        wrong.close()
        reader.close()
    for key in ("g-401", "g-403"):
        fixed = api.post("/v1/grants", GRANT, key=key)
        assert (fixed.status, fixed.replayed) == (201, False)
    assert assert_conserved(api, "u1", "credits") == 20


def test_a_key_reused_with_another_body_or_path_is_422_and_changes_nothing(api: Api) -> None:
    feature(api, "credits")
    feature(api, "other")
    first = api.post("/v1/grants", GRANT, key="g-1")
    assert first.status == 201
    entries = ledger(api)
    for path, body in (("/v1/grants", GRANT | {"amount": 6}), ("/v1/grants", GRANT | {"feature_key": "other"}),
                       ("/v1/grants", GRANT | {"metadata": {"a": 1}}),
                       ("/v1/usage", {"end_user_id": "u1", "feature_key": "credits", "units": 5}),
                       (f"/v1/grants/{first.body['id']}/void", None)):
        assert_error(api.post(path, body, key="g-1"), 422, "idempotency_key_reused", "Idempotency-Key")
    assert_error(api.delete("/v1/api_keys/key_x", key="g-1"), 422, "idempotency_key_reused", "Idempotency-Key")
    assert ledger(api) == entries
    assert api.ok("GET", f"/v1/grants/{first.body['id']}")["status"] == "active"
    # The same body with its fields in another order is the same request.
    reordered = {"amount": 5, "feature_key": "credits", "end_user_id": "u1"}
    assert_replay(first, api.post("/v1/grants", reordered, key="g-1"))


def test_keys_are_scoped_to_tenant_and_environment(server: Server, tenant: Tenant) -> None:
    other = new_tenant(server.base_url)
    try:
        for api in (tenant.sandbox, tenant.live, other.sandbox):
            feature(api, "credits")
            reply = api.post("/v1/grants", GRANT, key="shared-key")
            assert (reply.status, reply.replayed) == (201, False)
            assert assert_conserved(api, "u1", "credits") == 5
    finally:
        other.sandbox.close()
        other.live.close()


def test_the_same_key_from_16_threads_at_once_has_exactly_one_effect(server: Server, api: Api) -> None:
    feature(api, "credits")
    grant(api, "u1", "credits", 100)
    clients = [Api(server.base_url, api.key) for _ in range(16)]
    replies: list[Reply] = []
    lock = threading.Lock()
    start = threading.Barrier(len(clients))

    failures: list[BaseException] = []

    def send(client: Api) -> None:
        start.wait()
        try:
            reply = use(client, "u1", "credits", 7, key="race-1")
        except BaseException as exc:  # reported below, with the test's own failure
            with lock:
                failures.append(exc)
            return
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for client in clients:
            client.close()
    outcomes = [(r.status, r.replayed, r.text[:120]) for r in replies]
    assert not failures and len(replies) == 16, (failures, outcomes)
    done = [r for r in replies if r.status == 201 and not r.replayed]
    assert len(done) == 1, outcomes
    for reply in replies:
        if reply is done[0]:
            continue
        if reply.status == 409:  # still in flight when it arrived
            assert_error(reply, 409, "idempotency_key_in_use", "Idempotency-Key")
        else:
            assert (reply.status, reply.replayed, reply.text) == (201, True, done[0].text)
    assert len(ledger(api, type="use")) == 1
    summary = api.ok("GET", "/v1/usage/summary", params={"end_user_id": "u1", "feature_key": "credits"})
    assert (summary["events"], summary["units"]) == (1, 7)
    assert assert_conserved(api, "u1", "credits") == 93


def test_the_body_idempotency_key_of_a_usage_equals_the_header(api: Api) -> None:
    feature(api, "credits")
    grant(api, "u1", "credits", 10)
    body = {"end_user_id": "u1", "feature_key": "credits", "units": 2}
    first = api.post("/v1/usage", body | {"idempotency_key": "evt-1"})
    assert first.status == 201
    assert_replay(first, api.post("/v1/usage", body, key="evt-1"))
    assert_replay(first, api.post("/v1/usage", body | {"idempotency_key": "evt-1"}, key="evt-1"))
    assert_error(api.post("/v1/usage", body | {"idempotency_key": "evt-1"}, key="evt-2"),
                 400, "invalid_request", "idempotency_key")
    assert_error(api.post("/v1/usage", body | {"units": 3, "idempotency_key": "evt-1"}),
                 422, "idempotency_key_reused", "Idempotency-Key")
    assert len(ledger(api, type="use")) == 1
    assert assert_conserved(api, "u1", "credits") == 8


def test_a_replay_is_the_first_response_even_after_the_object_changed(api: Api) -> None:
    feature(api, "credits")
    plan_variant = variant(api, [{"feature_key": "credits", "amount": 10}])
    first = api.post("/v1/subscriptions", {"end_user_id": "u1", "plan_variant_id": plan_variant["id"]}, key="sub-1")
    assert first.status == 201
    block = api.post("/v1/grants", GRANT, key="grant-1")
    use(api, "u1", "credits", 15)
    again = api.post("/v1/grants", GRANT, key="grant-1")
    assert_replay(block, again)
    assert again.body["remaining"] == 5 and api.ok("GET", f"/v1/grants/{block.body['id']}")["remaining"] == 0
    assert_replay(first, api.post("/v1/subscriptions", {"end_user_id": "u1", "plan_variant_id": plan_variant["id"]},
                                  key="sub-1"))
    assert len(api.ok("GET", "/v1/subscriptions")["data"]) == 1
