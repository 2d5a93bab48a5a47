"""The ledger (every filter, pagination, single entries), events and the audit log."""

from __future__ import annotations

from typing import Any

from .conftest import (Api, Tenant, assert_conserved, assert_error, feature, grant, ledger, shifted, subscribe, use,
                       variant)

ENTRY_FIELDS = {"id", "object", "type", "end_user_id", "feature_key", "block_id", "amount", "balance_after",
                "reserved_after", "usage_id", "reservation_id", "subscription_id", "reason", "created_at", "metadata"}


def history(api: Api) -> dict[str, Any]:
    """Five entries across two end users, two features and three types; the last two a minute later."""
    feature(api, "credits")
    feature(api, "other")
    grant(api, "u1", "credits", 10)
    u2_block = grant(api, "u2", "credits", 5)
    grant(api, "u1", "other", 3)
    clock = api.ok("POST", "/v1/test_clock/advance", {"seconds": 60})
    usage = use(api, "u1", "credits", 4).body
    api.ok("POST", f"/v1/grants/{u2_block['id']}/void")
    return {"minute": clock["now"], "usage_id": usage["id"]}


def shape(entries: list[dict[str, Any]]) -> list[tuple[str, str, str, int]]:
    return [(e["type"], e["end_user_id"], e["feature_key"], e["amount"]) for e in entries]


def test_the_ledger_lists_every_entry_newest_first(api: Api) -> None:
    history(api)
    entries = ledger(api)
    assert shape(entries) == [("void", "u2", "credits", 5), ("use", "u1", "credits", 4),
                              ("grant", "u1", "other", 3), ("grant", "u2", "credits", 5),
                              ("grant", "u1", "credits", 10)]
    assert all(set(e) == ENTRY_FIELDS and e["id"].startswith("led_") for e in entries)
    for entry in entries:
        assert api.ok("GET", f"/v1/ledger/{entry['id']}") == entry
    assert_error(api.get("/v1/ledger/led_nothing"), 404, "not_found")
    for user, key in (("u1", "credits"), ("u2", "credits"), ("u1", "other")):
        assert_conserved(api, user, key)


def test_the_ledger_filters_by_end_user_feature_type_and_usage(api: Api) -> None:
    made = history(api)
    assert shape(ledger(api, end_user_id="u1")) == [("use", "u1", "credits", 4), ("grant", "u1", "other", 3),
                                                   ("grant", "u1", "credits", 10)]
    assert shape(ledger(api, feature_key="other")) == [("grant", "u1", "other", 3)]
    assert [e["type"] for e in ledger(api, type="grant")] == ["grant", "grant", "grant"]
    assert shape(ledger(api, type="void")) == [("void", "u2", "credits", 5)]
    assert shape(ledger(api, end_user_id="u1", feature_key="credits", type="use")) == [("use", "u1", "credits", 4)]
    [used] = ledger(api, usage_id=made["usage_id"])
    assert (used["type"], used["usage_id"]) == ("use", made["usage_id"])
    assert ledger(api, reservation_id="rsv_nothing") == []
    assert ledger(api, end_user_id="nobody") == []
    assert ledger(api, type="refund") == []
    assert_error(api.get("/v1/ledger", type="spend"), 400, "invalid_request", "type")


def test_the_ledger_filters_by_time_from_inclusive_to_exclusive(api: Api) -> None:
    made = history(api)
    minute = made["minute"]
    assert shape(ledger(api, **{"from": minute})) == [("void", "u2", "credits", 5), ("use", "u1", "credits", 4)]
    assert [e["type"] for e in ledger(api, to=minute)] == ["grant", "grant", "grant"]
    used = ledger(api, type="use")[0]["created_at"]
    assert shape(ledger(api, **{"from": used, "to": shifted(used, microseconds=1)})) == [("use", "u1", "credits", 4)]
    assert ledger(api, **{"from": used, "to": used}) == []
    in_paris = shifted(minute, hours=1).replace("Z", "+01:00")  # the same instant, another offset
    assert len(ledger(api, **{"from": in_paris})) == 2
    assert_error(api.get("/v1/ledger", to="tomorrow"), 400, "invalid_request", "to")


def test_the_ledger_paginates_with_a_cursor(api: Api) -> None:
    history(api)
    everything = ledger(api)
    pages, params = [], {"limit": 2}
    while True:
        page = api.ok("GET", "/v1/ledger", params=params)
        pages.append(page)
        if not page["has_more"]:
            break
        assert page["next_cursor"] == page["data"][-1]["id"]
        params["starting_after"] = page["next_cursor"]
    assert [len(p["data"]) for p in pages] == [2, 2, 1]
    assert pages[-1]["next_cursor"] is None
    assert [e for p in pages for e in p["data"]] == everything
    filtered = api.ok("GET", "/v1/ledger", params={"end_user_id": "u1", "limit": 1,
                                                   "starting_after": everything[1]["id"]})
    assert [e["id"] for e in filtered["data"]] == [everything[2]["id"]] and filtered["has_more"] is True
    assert api.ok("GET", "/v1/ledger", params={"limit": 5})["has_more"] is False
    assert_error(api.get("/v1/ledger", limit=0), 400, "invalid_request", "limit")
    assert_error(api.get("/v1/ledger", limit=501), 400, "invalid_request", "limit")
    assert_error(api.get("/v1/ledger", limit="ten"), 400, "invalid_request", "limit")


def test_the_default_page_is_fifty_entries(api: Api) -> None:
    feature(api, "credits")
    grant(api, "u1", "credits", 60)
    api.ok("POST", "/v1/usage/batch", {"events": [
        {"end_user_id": "u1", "feature_key": "credits", "units": 1} for _ in range(55)]})
    page = api.ok("GET", "/v1/ledger")
    assert (len(page["data"]), page["has_more"]) == (50, True)
    assert len(ledger(api)) == 56
    assert assert_conserved(api, "u1", "credits") == 5


# ---- events ---------------------------------------------------------------------------------------------

def test_events_record_subscriptions_and_grants(api: Api) -> None:
    feature(api, "credits")
    plan_variant = variant(api, [{"feature_key": "credits", "amount": 10}])
    sub = subscribe(api, "u1", plan_variant["id"])
    block = grant(api, "u1", "credits", 5)
    use(api, "u1", "credits", 15)
    events = api.ok("GET", "/v1/events")["data"]
    assert [e["type"] for e in events] == ["balance.depleted", "credits.granted", "subscription.created",
                                           "credits.granted"]
    assert all(e["id"].startswith("evt_") and e["object"] == "event" for e in events)
    depleted, granted, created, allowance = events
    assert depleted["data"] == {"end_user_id": "u1", "feature_key": "credits"}
    assert granted["data"]["block_id"] == block["id"]
    assert created["data"] == sub
    assert (allowance["data"]["source"], allowance["data"]["amount"]) == ("plan", 10)
    assert api.ok("GET", f"/v1/events/{created['id']}") == created
    only = api.ok("GET", "/v1/events", params={"type": "credits.granted", "limit": 1})
    assert [e["id"] for e in only["data"]] == [granted["id"]] and only["has_more"] is True
    rest = api.ok("GET", "/v1/events", params={"type": "credits.granted", "starting_after": only["next_cursor"]})
    assert [e["id"] for e in rest["data"]] == [allowance["id"]] and rest["has_more"] is False
    assert_error(api.get("/v1/events/evt_nothing"), 404, "not_found")


def test_a_refused_request_writes_no_event(api: Api) -> None:
    feature(api, "credits")
    grant(api, "u1", "credits", 1)
    before = api.ok("GET", "/v1/events")["data"]
    assert use(api, "u1", "credits", 2).status == 402
    assert api.post("/v1/grants", {"end_user_id": "u1", "feature_key": "credits", "amount": "0.5"}).status == 400
    assert api.ok("GET", "/v1/events")["data"] == before


# ---- audit log ------------------------------------------------------------------------------------------

def test_the_audit_log_records_every_successful_mutation(api: Api, tenant: Tenant) -> None:
    created = api.post("/v1/features", {"key": "credits"})
    granted = api.post("/v1/grants", {"end_user_id": "u1", "feature_key": "credits", "amount": 5}, key="g-1")
    api.post("/v1/grants", {"end_user_id": "u1", "feature_key": "credits", "amount": 5}, key="g-1")  # replay
    voided = api.post(f"/v1/grants/{granted.body['id']}/void")
    assert api.post("/v1/features", {"key": "credits"}).status == 400
    assert use(api, "u1", "credits", 1).status == 402
    records = api.ok("GET", "/v1/audit_log")["data"]
    admin_key = tenant.created["api_keys"][0]["id"]
    assert [(r["method"], r["path"], r["object_ids"], r["status"], r["key_id"], r["request_id"]) for r in records] == [
        ("POST", f"/v1/grants/{granted.body['id']}/void", [granted.body["id"]], 200, admin_key,
         voided.headers["Request-Id"]),
        ("POST", "/v1/grants", [granted.body["id"]], 201, admin_key, granted.headers["Request-Id"]),
        ("POST", "/v1/features", [created.body["id"]], 201, admin_key, created.headers["Request-Id"]),
    ]
    assert all(r["id"].startswith("aud_") and r["object"] == "audit_record" for r in records)
    page = api.ok("GET", "/v1/audit_log", params={"limit": 1, "starting_after": records[0]["id"]})
    assert [r["id"] for r in page["data"]] == [records[1]["id"]] and page["has_more"] is True
    assert tenant.live.ok("GET", "/v1/audit_log")["data"] == []
