"""Credits: grants, voids, credit blocks, pack purchases, balances now and at a past moment."""

from __future__ import annotations

import calendar
from datetime import datetime
from decimal import Decimal

from .conftest import (Api, assert_conserved, assert_error, balance_of, feature, grant, ledger, rfc3339, shifted,
                       subscribe, use, variant)


def months_later(timestamp: str, months: int) -> str:
    """The same wall-clock time ``months`` calendar months later, the day clamped to the month's end."""
    moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    year, month0 = divmod(moment.year * 12 + moment.month - 1 + months, 12)
    day = min(moment.day, calendar.monthrange(year, month0 + 1)[1])
    return rfc3339(moment.replace(year=year, month=month0 + 1, day=day))


# ---- grants ---------------------------------------------------------------------------------------------

def test_a_grant_creates_a_block_and_its_ledger_entry(api: Api) -> None:
    feature(api, "ai_credits", precision=2)
    block = grant(api, "u1", "ai_credits", "12.5", source="promo", priority=7, metadata={"campaign": "launch"})
    assert block["id"].startswith("blk_")
    assert {k: v for k, v in block.items() if k not in ("id", "created_at", "effective_at")} == {
        "object": "credit_block", "end_user_id": "u1", "feature_key": "ai_credits",
        "original_amount": Decimal("12.5"), "remaining": Decimal("12.5"), "requested_amount": Decimal("12.5"),
        "priority": 7, "expires_at": None, "source": "promo", "status": "active", "subscription_id": None,
        "metadata": {"campaign": "launch"}}
    assert block["effective_at"] == block["created_at"]
    stored = api.ok("GET", f"/v1/grants/{block['id']}")
    assert stored == {k: v for k, v in block.items() if k != "requested_amount"}
    [entry] = ledger(api, end_user_id="u1")
    assert (entry["type"], entry["block_id"], entry["amount"], entry["balance_after"]) == (
        "grant", block["id"], Decimal("12.5"), Decimal("12.5"))
    [event] = api.ok("GET", "/v1/events", params={"type": "credits.granted"})["data"]
    assert event["data"] == {"block_id": block["id"], "amount": Decimal("12.5"), "source": "promo",
                             "expires_at": None, "end_user_id": "u1", "feature_key": "ai_credits"}
    assert assert_conserved(api, "u1", "ai_credits") == Decimal("12.5")


def test_a_grant_can_expire_after_a_duration_or_at_an_instant(api: Api) -> None:
    feature(api, "credits")
    after = grant(api, "u1", "credits", 10, expires_after={"every": 2, "unit": "hour"})
    assert after["expires_at"] == shifted(after["effective_at"], hours=2)
    at = grant(api, "u1", "credits", 5, expires_at="2999-01-01T01:00:00+01:00")
    assert at["expires_at"] == "2999-01-01T00:00:00Z"
    api.ok("POST", "/v1/test_clock/advance", {"seconds": 3 * 3600})
    assert balance_of(api, "u1", "credits") == (5, 0)
    assert api.ok("GET", f"/v1/grants/{after['id']}")["status"] == "expired"
    assert [(e["type"], e["amount"]) for e in ledger(api, end_user_id="u1")] == [
        ("expire", 10), ("grant", 5), ("grant", 10)]
    assert [e["created_at"] for e in ledger(api, type="expire")] == [after["expires_at"]]
    assert assert_conserved(api, "u1", "credits") == 5


def test_a_future_grant_is_scheduled_until_its_effective_at(api: Api) -> None:
    feature(api, "credits")
    now = api.ok("GET", "/v1/test_clock")["now"]
    later = shifted(now, hours=1)
    block = grant(api, "u1", "credits", 10, effective_at=later)
    assert (block["status"], block["effective_at"]) == ("scheduled", later)
    assert balance_of(api, "u1", "credits") == (0, 0)
    assert ledger(api, end_user_id="u1") == []
    api.ok("POST", "/v1/test_clock/advance", {"seconds": 7200})
    assert balance_of(api, "u1", "credits") == (10, 0)
    [entry] = ledger(api, end_user_id="u1")
    assert (entry["type"], entry["amount"], entry["created_at"], entry["reason"]) == ("grant", 10, later, "effective")
    assert api.ok("GET", f"/v1/grants/{block['id']}")["status"] == "active"
    assert_conserved(api, "u1", "credits")


def test_invalid_grants_are_refused_and_change_nothing(api: Api) -> None:
    feature(api, "credits")
    feature(api, "sso", type="boolean")
    feature(api, "img", credit_pool="credits")
    base = {"end_user_id": "u1", "feature_key": "credits", "amount": 1}
    cases = [
        (base | {"feature_key": "nothing"}, 404, "not_found", "feature_key"),
        (base | {"feature_key": "sso"}, 400, "invalid_request", "feature_key"),
        (base | {"feature_key": "img"}, 400, "invalid_request", "feature_key"),
        (base | {"expires_at": "2000-01-01T00:00:00Z"}, 400, "invalid_request", "expires_at"),
        (base | {"expires_at": "2999-01-01T00:00:00Z", "expires_after": {"every": 1, "unit": "day"}},
         400, "invalid_request", "expires_after"),
        (base | {"effective_at": "2999-01-01T00:00:00Z", "expires_at": "2998-01-01T00:00:00Z"},
         400, "invalid_request", "expires_at"),
        (base | {"source": "plan"}, 400, "invalid_request", "source"),
        (base | {"priority": -1}, 400, "invalid_request", "priority"),
        (base | {"effective_at": "soon"}, 400, "invalid_request", "effective_at"),
    ]
    for body, status, code, param in cases:
        assert_error(api.post("/v1/grants", body), status, code, param)
    assert ledger(api) == []
    assert balance_of(api, "u1", "credits") == (0, 0)


def test_max_balance_caps_a_grant_and_the_ledger_says_so(api: Api) -> None:
    feature(api, "credits")
    capped = variant(api, [{"feature_key": "credits", "amount": 100, "max_balance": 150}])
    subscribe(api, "u1", capped["id"])
    block = grant(api, "u1", "credits", 80)
    assert (block["original_amount"], block["requested_amount"]) == (50, 80)
    entry = ledger(api, end_user_id="u1")[0]
    assert (entry["type"], entry["amount"], entry["reason"]) == ("grant", 50, "max_balance: 30 of 80 not granted")
    assert_error(api.post("/v1/grants", {"end_user_id": "u1", "feature_key": "credits", "amount": 1}),
                 409, "invalid_state", "amount")
    bought = grant(api, "u1", "credits", 20, source="purchase")  # purchases are not capped
    assert bought["original_amount"] == 20
    assert assert_conserved(api, "u1", "credits") == 170


# ---- voids ----------------------------------------------------------------------------------------------

def test_voiding_a_block_removes_what_remains_of_it(api: Api) -> None:
    feature(api, "credits")
    first = grant(api, "u1", "credits", 10, priority=1)
    grant(api, "u1", "credits", 5, priority=2)
    assert use(api, "u1", "credits", 4).status == 201
    voided = api.ok("POST", f"/v1/grants/{first['id']}/void", {})
    assert (voided["status"], voided["remaining"], voided["original_amount"]) == ("voided", 0, 10)
    entry = ledger(api, end_user_id="u1")[0]
    assert (entry["type"], entry["block_id"], entry["amount"], entry["balance_after"], entry["reason"]) == (
        "void", first["id"], 6, 5, "voided")
    assert assert_conserved(api, "u1", "credits") == 5


def test_voiding_a_voided_block_is_409_invalid_state(api: Api) -> None:
    feature(api, "credits")
    block = grant(api, "u1", "credits", 10)
    assert api.post(f"/v1/grants/{block['id']}/void").status == 200
    entries = ledger(api)
    error = assert_error(api.post(f"/v1/grants/{block['id']}/void"), 409, "invalid_state")
    assert error["type"] == "state_error"
    assert ledger(api) == entries
    assert_error(api.post("/v1/grants/blk_nothing/void"), 404, "not_found")
    assert_error(api.post(f"/v1/grants/{block['id']}/void", {"reason": "x"}), 400, "invalid_request")


def test_a_missing_block_is_404(api: Api) -> None:
    assert_error(api.get("/v1/grants/blk_nothing"), 404, "not_found")


# ---- packs ----------------------------------------------------------------------------------------------

def catalog_with_packs(api: Api) -> None:
    feature(api, "ai_credits", precision=2)
    feature(api, "wallet", unit="USD", precision=2)
    api.ok("POST", "/v1/packs", {"key": "boost", "feature_key": "ai_credits", "amount": 1000,
                                 "price": {"amount": "9.99", "currency": "USD"},
                                 "expires_after": {"every": 3, "unit": "month"}, "priority": 50}, 201)


def test_purchase_a_pack_paid_externally(api: Api) -> None:
    catalog_with_packs(api)
    block = api.ok("POST", "/v1/packs/boost/purchase", {"end_user_id": "u1", "pay_with": "external"}, 201)
    assert (block["feature_key"], block["original_amount"], block["source"], block["priority"], block["pack_key"]) == (
        "ai_credits", 1000, "purchase", 50, "boost")
    assert block["payment"] == {"pay_with": "external"}
    assert block["expires_at"] == months_later(block["effective_at"], 3)
    assert block["metadata"] == {"pack_key": "boost"}
    default = api.ok("POST", "/v1/packs/boost/purchase", {"end_user_id": "u1"}, 201)
    assert default["payment"] == {"pay_with": "external"}
    assert assert_conserved(api, "u1", "ai_credits") == 2000


def test_purchase_a_pack_from_the_wallet(api: Api) -> None:
    catalog_with_packs(api)
    grant(api, "u1", "wallet", 20)
    block = api.ok("POST", "/v1/packs/boost/purchase", {"end_user_id": "u1", "pay_with": "wallet"}, 201)
    payment = block["payment"]
    assert (payment["pay_with"], payment["wallet_feature_key"]) == ("wallet", "wallet")
    [paid] = payment["wallet_entries"]
    assert (paid["type"], paid["feature_key"], paid["amount"], paid["balance_after"], paid["reason"]) == (
        "use", "wallet", Decimal("9.99"), Decimal("10.01"), "pack purchase: boost")
    assert assert_conserved(api, "u1", "wallet") == Decimal("10.01")
    assert assert_conserved(api, "u1", "ai_credits") == 1000


def test_a_wallet_short_of_the_price_is_402_and_nothing_changes(api: Api) -> None:
    catalog_with_packs(api)
    grant(api, "u1", "wallet", "9.98")
    entries = ledger(api)
    error = assert_error(api.post("/v1/packs/boost/purchase", {"end_user_id": "u1", "pay_with": "wallet"}),
                         402, "insufficient_balance")
    assert error["type"] == "balance_error"
    assert ledger(api) == entries
    assert balance_of(api, "u1", "wallet") == (Decimal("9.98"), 0)
    assert balance_of(api, "u1", "ai_credits") == (0, 0)


def test_wallet_purchases_need_a_price_and_a_wallet_feature(api: Api) -> None:
    feature(api, "ai_credits", precision=2)
    api.ok("POST", "/v1/packs", {"key": "free_pack", "feature_key": "ai_credits", "amount": 5}, 201)
    api.ok("POST", "/v1/packs", {"key": "euro_pack", "feature_key": "ai_credits", "amount": 5,
                                 "price": {"amount": 1, "currency": "EUR"}}, 201)
    for pack in ("free_pack", "euro_pack"):
        assert_error(api.post(f"/v1/packs/{pack}/purchase", {"end_user_id": "u1", "pay_with": "wallet"}),
                     400, "invalid_request", "pay_with")
    assert_error(api.post("/v1/packs/nothing/purchase", {"end_user_id": "u1"}), 404, "not_found")
    assert_error(api.post("/v1/packs/free_pack/purchase", {"end_user_id": "u1", "pay_with": "card"}),
                 400, "invalid_request", "pay_with")
    assert ledger(api) == []


# ---- balances -------------------------------------------------------------------------------------------

def test_balances_list_every_metered_feature_held_or_entitled(api: Api) -> None:
    feature(api, "api_calls")
    feature(api, "tickets")
    feature(api, "sso", type="boolean")
    feature(api, "ai_credits", precision=2)
    feature(api, "img", credit_pool="ai_credits", credits_per_unit=10)
    plan_variant = variant(api, [{"feature_key": "api_calls", "amount": 100}, {"feature_key": "sso", "enabled": True},
                                 {"feature_key": "tickets", "unlimited": True}])
    subscribe(api, "u1", plan_variant["id"])
    block = grant(api, "u1", "ai_credits", "2.5", expires_at="2999-01-01T00:00:00Z", priority=3)
    balances = api.ok("GET", "/v1/balances/u1")
    assert balances["object"] == "balances" and balances["end_user_id"] == "u1"
    assert [(d["feature_key"], d["balance"], d["reserved"], d["unlimited"]) for d in balances["data"]] == [
        ("api_calls", 100, 0, False), ("tickets", 0, 0, True), ("ai_credits", Decimal("2.5"), 0, False)]
    assert balances["data"][2]["blocks"] == [{
        "id": block["id"], "remaining": Decimal("2.5"), "original_amount": Decimal("2.5"), "priority": 3,
        "effective_at": block["effective_at"], "expires_at": "2999-01-01T00:00:00Z", "source": "manual"}]
    one = api.ok("GET", "/v1/balances/u1", params={"feature_key": "ai_credits"})
    assert one["data"] == [balances["data"][2]]
    assert api.ok("GET", "/v1/balances/nobody")["data"] == []
    assert_error(api.get("/v1/balances/u1", feature_key="nothing"), 404, "not_found", "feature_key")
    assert_error(api.get("/v1/balances/u1", feature_key="sso"), 400, "invalid_request", "feature_key")
    assert_error(api.get("/v1/balances/u1", feature_key="img"), 400, "invalid_request", "feature_key")


def test_balance_at_a_past_moment_comes_from_the_ledger(api: Api) -> None:
    feature(api, "credits")
    kept = grant(api, "u1", "credits", 10)
    short = grant(api, "u1", "credits", 4, expires_after={"every": 1, "unit": "hour"}, priority=200)
    t0 = kept["created_at"]
    api.ok("POST", "/v1/test_clock/advance", {"seconds": 60})
    assert use(api, "u1", "credits", 3).status == 201
    api.ok("POST", "/v1/test_clock/advance", {"seconds": 7200})
    assert balance_of(api, "u1", "credits") == (7, 0)

    def balance_at(moment: str) -> list[tuple[Decimal, list[str]]]:
        data = api.ok("GET", "/v1/balances/u1", params={"feature_key": "credits", "at": moment})["data"]
        return [(d["balance"], [b["id"] for b in d["blocks"]]) for d in data]

    assert balance_at(shifted(t0, seconds=-1)) == [(0, [])]
    assert balance_at(shifted(t0, seconds=30)) == [(14, [kept["id"], short["id"]])]
    assert balance_at(shifted(t0, seconds=90)) == [(11, [kept["id"], short["id"]])]
    assert balance_at(shifted(t0, seconds=2 * 3600)) == [(7, [kept["id"]])]
    everything = api.ok("GET", "/v1/balances/u1", params={"at": shifted(t0, seconds=30)})
    assert everything["at"] == shifted(t0, seconds=30)
    assert [(d["feature_key"], d["balance"]) for d in everything["data"]] == [("credits", 14)]
    assert_error(api.get("/v1/balances/u1", at="yesterday"), 400, "invalid_request", "at")
    assert assert_conserved(api, "u1", "credits") == 7
