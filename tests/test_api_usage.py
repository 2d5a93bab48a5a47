"""Usage: single events, batches, overage, and the priced usage summary."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .conftest import (Api, assert_conserved, assert_error, balance_of, feature, grant, ledger, new_tenant, subscribe, use,
                       variant)


def test_usage_burns_blocks_down_in_order_with_one_entry_per_block(api: Api) -> None:
    feature(api, "credits")
    never = grant(api, "u1", "credits", 10)  # priority 100, never expires: burns last
    later = grant(api, "u1", "credits", 10, expires_at="2999-06-01T00:00:00Z")
    sooner = grant(api, "u1", "credits", 10, expires_at="2999-01-01T00:00:00Z")
    first = grant(api, "u1", "credits", 3, priority=50)
    reply = use(api, "u1", "credits", 25, key=None)
    assert reply.status == 201
    usage = reply.body
    assert usage["id"].startswith("use_")
    assert {k: usage[k] for k in ("object", "end_user_id", "feature_key", "units", "amount", "balance", "overage",
                                  "charged_feature_key", "unlimited", "metadata")} == {
        "object": "usage", "end_user_id": "u1", "feature_key": "credits", "units": 25, "amount": 25,
        "balance": 8, "overage": 0, "charged_feature_key": "credits", "unlimited": False, "metadata": {}}
    assert [(e["type"], e["block_id"], e["amount"], e["balance_after"], e["usage_id"]) for e in usage["entries"]] == [
        ("use", first["id"], 3, 30, usage["id"]), ("use", sooner["id"], 10, 20, usage["id"]),
        ("use", later["id"], 10, 10, usage["id"]), ("use", never["id"], 2, 8, usage["id"])]
    assert [e["id"] for e in ledger(api, usage_id=usage["id"])] == [e["id"] for e in reversed(usage["entries"])]
    assert api.ok("GET", f"/v1/usage/{usage['id']}") == {
        k: usage[k] for k in ("id", "object", "end_user_id", "feature_key", "units", "amount", "charged_feature_key",
                              "overage", "timestamp", "created_at")}
    assert assert_conserved(api, "u1", "credits") == 8


def test_usage_beyond_the_balance_is_402_and_records_nothing(api: Api) -> None:
    feature(api, "credits", precision=2)
    grant(api, "u1", "credits", "4.5")
    entries = ledger(api)
    error = assert_error(use(api, "u1", "credits", "4.51"), 402, "insufficient_balance", "units")
    assert error["message"] == "u1 has 4.5 credits, this usage needs 4.51"
    assert ledger(api) == entries
    assert balance_of(api, "u1", "credits") == (Decimal("4.5"), 0)
    summary = api.ok("GET", "/v1/usage/summary", params={"end_user_id": "u1", "feature_key": "credits"})
    assert (summary["events"], summary["units"]) == (0, 0)
    assert use(api, "u1", "credits", "4.5").status == 201
    assert assert_conserved(api, "u1", "credits") == 0


def test_overage_allowed_usage_records_the_overage(api: Api) -> None:
    feature(api, "tokens")
    plan_variant = variant(api, [{"feature_key": "tokens", "amount": 10, "overage": "allow"}])
    subscribe(api, "u1", plan_variant["id"])
    usage = use(api, "u1", "tokens", 15).body
    assert (usage["units"], usage["amount"], usage["overage"], usage["balance"]) == (15, 15, 5, 0)
    assert [e["amount"] for e in usage["entries"]] == [10]
    again = use(api, "u1", "tokens", 7).body
    assert (again["overage"], again["entries"]) == (7, [])
    summary = api.ok("GET", "/v1/usage/summary", params={"end_user_id": "u1", "feature_key": "tokens"})
    assert (summary["events"], summary["units"], summary["included_units"], summary["overage_units"]) == (2, 22, 10, 12)
    assert summary["pricing"] is None
    assert assert_conserved(api, "u1", "tokens") == 0


def test_unlimited_usage_is_recorded_without_ledger_entries(api: Api) -> None:
    feature(api, "tickets")
    subscribe(api, "u1", variant(api, [{"feature_key": "tickets", "unlimited": True}])["id"])
    usage = use(api, "u1", "tickets", 1000).body
    assert (usage["unlimited"], usage["balance"], usage["amount"], usage["overage"], usage["entries"]) == (
        True, None, 1000, 0, [])
    assert ledger(api) == []


def test_credit_pool_usage_moves_the_pool(api: Api) -> None:
    feature(api, "ai_credits", precision=2)
    feature(api, "image_generation", credit_pool="ai_credits", credits_per_unit="2.5")
    grant(api, "u1", "ai_credits", 10)
    usage = use(api, "u1", "image_generation", 3).body
    assert (usage["units"], usage["amount"], usage["charged_feature_key"], usage["balance"]) == (
        3, Decimal("7.5"), "ai_credits", Decimal("2.5"))
    [entry] = ledger(api, usage_id=usage["id"])
    assert (entry["feature_key"], entry["amount"]) == ("ai_credits", Decimal("7.5"))
    assert_error(use(api, "u1", "image_generation", 2), 402, "insufficient_balance", "units")
    assert assert_conserved(api, "u1", "ai_credits") == Decimal("2.5")


def test_invalid_usage_is_refused(api: Api) -> None:
    feature(api, "credits")
    feature(api, "sso", type="boolean")
    grant(api, "u1", "credits", 10)
    assert_error(use(api, "u1", "sso", 1), 400, "invalid_request", "feature_key")
    assert_error(use(api, "u1", "nothing", 1), 404, "not_found", "feature_key")
    assert_error(use(api, "u1", "credits", "1.5"), 400, "invalid_amount", "units")
    assert_error(use(api, "u1", "credits", 0), 400, "invalid_amount", "units")
    body = {"end_user_id": "u1", "feature_key": "credits", "units": 1}
    assert_error(api.post("/v1/usage", body | {"timestamp": "noon"}), 400, "invalid_request", "timestamp")
    assert_error(api.post("/v1/usage", body | {"idempotency_key": ""}), 400, "invalid_request", "idempotency_key")
    assert assert_conserved(api, "u1", "credits") == 10


def test_usage_timestamps_place_events_in_summary_windows(api: Api) -> None:
    feature(api, "credits")
    grant(api, "u1", "credits", 100)
    for day, units in (("2026-01-01", 1), ("2026-01-15", 2), ("2026-02-01", 4)):
        reply = api.post("/v1/usage", {"end_user_id": "u1", "feature_key": "credits", "units": units,
                                       "timestamp": f"{day}T12:00:00+02:00"})
        assert reply.status == 201 and reply.body["timestamp"] == f"{day}T10:00:00Z"
    january = api.ok("GET", "/v1/usage/summary", params={
        "end_user_id": "u1", "feature_key": "credits", "from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z"})
    assert (january["from"], january["to"], january["events"], january["units"]) == (
        "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", 2, 3)
    assert_error(api.get("/v1/usage/summary", end_user_id="u1", feature_key="nothing"), 404, "not_found",
                 "feature_key")
    assert_error(api.get("/v1/usage/summary", end_user_id="u1"), 400, "invalid_request", "feature_key")
    assert_error(api.get("/v1/usage/use_nothing"), 404, "not_found")


# ---- batches --------------------------------------------------------------------------------------------

def event(feature_key: str, units: Any, **fields: Any) -> dict[str, Any]:
    return {"end_user_id": "u1", "feature_key": feature_key, "units": units, **fields}


def test_a_batch_records_each_event_on_its_own(api: Api) -> None:
    feature(api, "credits")
    grant(api, "u1", "credits", 10)
    reply = api.post("/v1/usage/batch", {"events": [
        event("credits", 4), event("credits", 7), {"end_user_id": "u1", "units": 1}, event("nothing", 1),
        event("credits", "0.5"), event("credits", 6)]})
    assert reply.status == 200
    results = reply.body["results"]
    assert [r["status"] for r in results] == [201, 402, 400, 404, 400, 201]
    assert [(r["error"]["code"], r["error"]["param"]) for r in results if "error" in r] == [
        ("insufficient_balance", "events[1].units"), ("invalid_request", "events[2].feature_key"),
        ("not_found", "events[3].feature_key"), ("invalid_amount", "events[4].units")]
    assert all(r["error"]["request_id"] == reply.headers["Request-Id"] for r in results if "error" in r)
    assert [(r["usage"]["units"], r["usage"]["balance"]) for r in results if "usage" in r] == [(4, 6), (6, 0)]
    assert [e["usage_id"] for e in ledger(api, type="use")] == [results[5]["usage"]["id"], results[0]["usage"]["id"]]
    assert assert_conserved(api, "u1", "credits") == 0


def test_each_events_idempotency_key_deduplicates_it(api: Api) -> None:
    feature(api, "credits")
    grant(api, "u1", "credits", 10)
    first = api.ok("POST", "/v1/usage/batch", {"events": [
        event("credits", 3, idempotency_key="evt-1"), event("credits", 30, idempotency_key="evt-2")]})["results"]
    assert [r["status"] for r in first] == [201, 402]
    assert first[1]["error"]["param"] == "events[1].units"
    entries = ledger(api)
    again = api.ok("POST", "/v1/usage/batch", {"events": [
        event("credits", 30, idempotency_key="evt-2"), event("credits", 3, idempotency_key="evt-1"),
        event("credits", 2, idempotency_key="evt-3")]})["results"]
    assert [(r["status"], r.get("replayed", False)) for r in again] == [(402, True), (201, True), (201, False)]
    assert again[0]["error"]["param"] == "events[0].units"
    assert again[1]["usage"] == first[0]["usage"]
    assert len(ledger(api)) == len(entries) + 1
    # The same key through POST /v1/usage is the same logical event.
    single = api.post("/v1/usage", event("credits", 2, idempotency_key="evt-3"))
    assert (single.status, single.replayed, single.body) == (201, True, again[2]["usage"])
    reused = api.ok("POST", "/v1/usage/batch", {"events": [event("credits", 1, idempotency_key="evt-1")]})
    assert reused["results"][0]["error"]["code"] == "idempotency_key_reused"
    assert reused["results"][0]["status"] == 422
    assert assert_conserved(api, "u1", "credits") == 5


def test_a_batch_must_hold_one_to_a_thousand_events(api: Api) -> None:
    assert_error(api.post("/v1/usage/batch", {"events": []}), 400, "invalid_request", "events")
    assert_error(api.post("/v1/usage/batch", {"events": [event("x", 1)] * 1001}), 400, "invalid_request", "events")
    assert_error(api.post("/v1/usage/batch", {"events": "all"}), 400, "invalid_request", "events")
    assert_error(api.post("/v1/usage/batch", {}), 400, "invalid_request", "events")


# ---- the priced summary ---------------------------------------------------------------------------------

def priced(api: Api, mode: str, tiers: list[dict[str, Any]]) -> dict[str, Any]:
    feature(api, "tokens")
    plan_variant = variant(api, [{"feature_key": "tokens", "amount": 100, "overage": "allow",
                                  "pricing": {"mode": mode, "currency": "USD", "tiers": tiers}}])
    return subscribe(api, "u1", plan_variant["id"])


def summary(api: Api) -> Any:
    return api.call("GET", "/v1/usage/summary", params={"end_user_id": "u1", "feature_key": "tokens"})


def test_graduated_pricing_prices_each_unit_by_its_tier(api: Api) -> None:
    sub = priced(api, "graduated", [{"up_to": 1000, "unit_price": "0.002"}, {"up_to": None, "unit_price": "0.001"}])
    assert use(api, "u1", "tokens", 600).body["overage"] == 500
    assert use(api, "u1", "tokens", 900).body["overage"] == 900
    reply = summary(api)
    assert reply.body == {
        "object": "usage_summary", "end_user_id": "u1", "feature_key": "tokens",
        "from": sub["current_period_start"], "to": sub["current_period_end"], "events": 2,
        "units": 1500, "included_units": 100, "overage_units": 1400,
        "charged_feature_key": "tokens", "amount": 1500, "overage_amount": 1400,
        "pricing": {"mode": "graduated", "currency": "USD", "amount": Decimal("2.4"), "tiers": [
            {"up_to": 1000, "units": 1000, "unit_price": Decimal("0.002"), "amount": 2},
            {"up_to": None, "units": 400, "unit_price": Decimal("0.001"), "amount": Decimal("0.4")}]}}
    assert '"amount":2.4,' in reply.text


def test_graduated_pricing_within_the_first_tier(api: Api) -> None:
    priced(api, "graduated", [{"up_to": 1000, "unit_price": "0.002"}, {"up_to": None, "unit_price": "0.001"}])
    use(api, "u1", "tokens", 350)
    pricing = summary(api).body["pricing"]
    assert pricing["amount"] == Decimal("0.5")
    assert pricing["tiers"] == [{"up_to": 1000, "units": 250, "unit_price": Decimal("0.002"),
                                 "amount": Decimal("0.5")}]


def test_volume_pricing_prices_every_unit_by_the_tier_of_the_total(api: Api) -> None:
    priced(api, "volume", [{"up_to": 1000, "unit_price": "0.002"}, {"up_to": None, "unit_price": "0.0015"}])
    use(api, "u1", "tokens", 600)
    first = summary(api).body["pricing"]
    assert (first["amount"], first["tiers"]) == (1, [
        {"up_to": 1000, "units": 500, "unit_price": Decimal("0.002"), "amount": 1}])
    use(api, "u1", "tokens", 900)
    reply = summary(api)
    assert reply.body["pricing"] == {"mode": "volume", "currency": "USD", "amount": Decimal("2.1"), "tiers": [
        {"up_to": None, "units": 1400, "unit_price": Decimal("0.0015"), "amount": Decimal("2.1")}]}
    assert '"amount":2.1' in reply.text and "2.1000" not in reply.text


def test_the_summary_of_a_credit_pool_prices_its_overage_in_credits(api: Api) -> None:
    # Was: overage credits divided back into units (1.6666…) and priced per credit.
    feature(api, "pool")
    feature(api, "img", credit_pool="pool", credits_per_unit=3)
    var = variant(api, [{"feature_key": "pool", "amount": 10, "overage": "allow", "pricing": {
        "mode": "graduated", "currency": "USD", "tiers": [{"up_to": None, "unit_price": "0.1"}]}}])
    subscribe(api, "u1", var["id"])
    assert use(api, "u1", "img", 5).status == 201  # 15 credits: 10 from the allowance, 5 over
    pool = api.ok("GET", "/v1/usage/summary", params={"end_user_id": "u1", "feature_key": "pool"})
    assert (pool["events"], pool["units"], pool["included_units"], pool["overage_units"]) == (1, 15, 10, 5)
    assert pool["pricing"]["amount"] == Decimal("0.5")
    img = api.ok("GET", "/v1/usage/summary", params={"end_user_id": "u1", "feature_key": "img"})
    assert (img["units"], img["amount"], img["overage_amount"], img["overage_units"]) == (5, 15, 5, None)
    assert img["pricing"]["amount"] == Decimal("0.5")


def _batch_scenario(api: Api) -> None:
    """End users in every state a batch meets, the same in each tenant it is built in."""
    feature(api, "credits")
    feature(api, "ai")
    feature(api, "images", credit_pool="ai", credits_per_unit=10)
    feature(api, "gb", precision=2)
    plan_variant = variant(api, [{"feature_key": "credits", "amount": 10, "overage": "allow"}])
    grant(api, "a", "credits", 5, priority=1)
    grant(api, "a", "credits", 100, priority=2)
    grant(api, "b", "credits", 5)
    subscribe(api, "c", plan_variant["id"])
    grant(api, "d", "credits", 50, expires_after={"every": 1, "unit": "minute"})
    grant(api, "d", "credits", 7)
    grant(api, "f", "ai", 1000)
    grant(api, "g", "credits", 20)
    grant(api, "h", "gb", "10.5")
    api.ok("POST", "/v1/reservations", {"end_user_id": "h", "feature_key": "gb", "units": "2.25"}, 201)
    api.ok("POST", "/v1/test_clock/advance", {"seconds": 120})  # d's first block is due to expire


BATCH_EVENTS: list[dict[str, Any]] = [
    {"end_user_id": "a", "feature_key": "credits", "units": 3},
    {"end_user_id": "c", "feature_key": "credits", "units": 8},
    {"end_user_id": "b", "feature_key": "credits", "units": 10},
    {"end_user_id": "a", "feature_key": "credits", "units": 4},
    {"end_user_id": "d", "feature_key": "credits", "units": 5},
    {"end_user_id": "a", "feature_key": "credits", "units": 500},
    {"end_user_id": "e", "feature_key": "credits", "units": 1},
    {"end_user_id": "f", "feature_key": "images", "units": 3},
    {"end_user_id": "g", "feature_key": "credits", "units": 2, "idempotency_key": "g-1"},
    {"end_user_id": "c", "feature_key": "credits", "units": 8, "metadata": {"run": 2}},
    {"end_user_id": "b", "feature_key": "credits", "units": 9},
    {"end_user_id": "g", "feature_key": "credits", "units": 3},
    {"end_user_id": "h", "feature_key": "gb", "units": "1.25"},
    {"end_user_id": "a", "feature_key": "credits", "units": "0.5"},
    {"end_user_id": "a", "feature_key": "credits", "units": 2},
    {"end_user_id": "h", "feature_key": "gb", "units": "9"},
]


def _comparable(result: dict[str, Any]) -> Any:
    """A batch result without what differs between two tenants (ids, instants, request ids)."""
    if "error" in result:
        return result["status"], result["error"]["code"], result["error"]["param"]
    usage = {k: v for k, v in result["usage"].items() if k not in ("id", "timestamp", "created_at")}
    usage["entries"] = [(e["type"], e["amount"], e["balance_after"], e["reserved_after"])
                        for e in usage["entries"]]
    return result["status"], usage


def _history(api: Api) -> dict[tuple[str, str], list[Any]]:
    out: dict[tuple[str, str], list[Any]] = {}
    for e in reversed(ledger(api)):
        out.setdefault((e["end_user_id"], e["feature_key"]), []).append(
            (e["type"], e["amount"], e["balance_after"], e["reserved_after"], e["reason"]))
    return out


def test_a_batch_records_exactly_what_its_events_sent_one_by_one_would(server: Any) -> None:
    """Every lane of the batch (plain events together, the rest one by one) matches single usage.

    The batch runs events grouped by end user (each one's in the order sent); sent alone in that
    order, the same events give the same results, the same ledger (entries, running totals,
    expiries settled first) and the same events, whichever end users took the fast lane.
    """
    batch_api, single_api = new_tenant(server.base_url).sandbox, new_tenant(server.base_url).sandbox
    try:
        for api in (batch_api, single_api):
            _batch_scenario(api)
        batch = batch_api.ok("POST", "/v1/usage/batch", {"events": BATCH_EVENTS})["results"]
        order = sorted(range(len(BATCH_EVENTS)), key=lambda i: BATCH_EVENTS[i]["end_user_id"])
        single: dict[int, dict[str, Any]] = {}
        for i in order:
            reply = single_api.post("/v1/usage", BATCH_EVENTS[i])
            if reply.status == 201:
                single[i] = {"status": 201, "usage": reply.body}
            else:
                error = dict(reply.body["error"])
                error["param"] = f"events[{i}].{error['param']}" if error["param"] else None
                single[i] = {"status": reply.status, "error": error}
        assert [r["status"] for r in batch] == [201, 201, 402, 201, 201, 402, 402, 201, 201, 201, 402, 201,
                                                201, 400, 201, 402]
        assert [_comparable(r) for r in batch] == [_comparable(single[i]) for i in range(len(BATCH_EVENTS))]
        assert _history(batch_api) == _history(single_api)
        events_of = [[e["type"] for e in reversed(api.ok("GET", "/v1/events", params={"limit": 500})["data"])]
                     for api in (batch_api, single_api)]
        assert events_of[0] == events_of[1]
        # b's events were all refused: nothing of b's was written beyond its grant.
        assert [t for t, *_ in _history(batch_api)[("b", "credits")]] == ["grant"]
        for user, key in [("a", "credits"), ("c", "credits"), ("d", "credits"), ("f", "ai"), ("h", "gb")]:
            assert_conserved(batch_api, user, key)
    finally:
        batch_api.close()
        single_api.close()


def test_a_batch_spanning_hundreds_of_end_users_on_the_default_plan(api: Api) -> None:
    """First mention starts each end user's default plan (one by one); the next batch reads them
    all together, in more than one run of ids (the store splits long IN lists)."""
    feature(api, "credits")
    variant(api, [{"feature_key": "credits", "amount": 100}], plan="free", default=True)
    users = [f"user-{i:03d}" for i in range(450)]
    for units in (1, 2):
        results = api.ok("POST", "/v1/usage/batch", {"events": [
            {"end_user_id": u, "feature_key": "credits", "units": units} for u in reversed(users)]})["results"]
        assert [r["status"] for r in results] == [201] * len(users)
    assert {r["usage"]["end_user_id"]: r["usage"]["balance"] for r in results} == {u: 97 for u in users}
    assert assert_conserved(api, "user-449", "credits") == 97
    assert len(ledger(api, type="use")) == 2 * len(users)
