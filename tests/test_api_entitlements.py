"""The entitlement check (the Edge's fast path) and the entitlements list."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .conftest import Api, assert_error, feature, grant, ledger, shifted, subscribe, use, variant


def check(api: Api, end_user_id: str, feature_key: str, **params: Any) -> dict[str, Any]:
    return api.ok("GET", "/v1/entitlements/check",  # type: ignore[no-any-return]
                  params={"end_user_id": end_user_id, "feature_key": feature_key, **params})


def catalog(api: Api) -> dict[str, Any]:
    feature(api, "api_calls")
    feature(api, "tokens")
    feature(api, "sso", type="boolean")
    feature(api, "audit", type="boolean")
    feature(api, "exports", type="boolean")
    feature(api, "tickets")
    feature(api, "legacy")
    feature(api, "ai_credits", precision=2)
    feature(api, "image_generation", credit_pool="ai_credits", credits_per_unit=10)
    plan_variant = variant(api, [
        {"feature_key": "api_calls", "amount": 50},
        {"feature_key": "tokens", "amount": 10, "overage": "allow"},
        {"feature_key": "sso", "enabled": True},
        {"feature_key": "audit", "enabled": False},
        {"feature_key": "tickets", "unlimited": True},
        {"feature_key": "legacy", "enabled": False},
    ])
    return subscribe(api, "u1", plan_variant["id"])


def test_a_metered_check_reports_balance_and_when_it_resets(api: Api) -> None:
    sub = catalog(api)
    assert check(api, "u1", "api_calls") == {
        "allowed": True, "balance": 50, "end_user_id": "u1", "feature_key": "api_calls", "unlimited": False,
        "reason": None, "resets_at": sub["current_period_end"], "units": 1}
    assert check(api, "u1", "api_calls", units=50)["allowed"] is True
    refused = check(api, "u1", "api_calls", units=51)
    assert (refused["allowed"], refused["reason"], refused["balance"], refused["units"]) == (
        False, "insufficient_balance", 50, 51)
    assert use(api, "u1", "api_calls", 20).status == 201
    assert check(api, "u1", "api_calls")["balance"] == 30  # no cache that lags


def test_boolean_checks_follow_the_plan(api: Api) -> None:
    catalog(api)
    assert check(api, "u1", "sso") == {
        "allowed": True, "balance": None, "end_user_id": "u1", "feature_key": "sso", "unlimited": False,
        "reason": None, "resets_at": None, "units": 1}
    assert (check(api, "u1", "audit")["allowed"], check(api, "u1", "audit")["reason"]) == (False, "feature_disabled")
    assert (check(api, "u1", "exports")["allowed"], check(api, "u1", "exports")["reason"]) == (False, "no_entitlement")
    assert check(api, "u2", "sso")["reason"] == "no_entitlement"  # no plan at all


def test_an_unlimited_check_is_always_allowed(api: Api) -> None:
    catalog(api)
    assert check(api, "u1", "tickets", units=10**12) == {
        "allowed": True, "balance": None, "end_user_id": "u1", "feature_key": "tickets", "unlimited": True,
        "reason": None, "resets_at": None, "units": 10**12}


def test_a_disabled_metered_feature_is_feature_disabled(api: Api) -> None:
    catalog(api)
    grant(api, "u1", "legacy", 100)
    result = check(api, "u1", "legacy")
    assert (result["allowed"], result["reason"]) == (False, "feature_disabled")


def test_a_credit_pool_check_charges_units_times_credits_per_unit(api: Api) -> None:
    catalog(api)
    grant(api, "u1", "ai_credits", 25)
    two = check(api, "u1", "image_generation", units=2)
    assert two == {"allowed": True, "balance": 25, "end_user_id": "u1", "feature_key": "image_generation",
                   "unlimited": False, "reason": None, "resets_at": None, "units": 2, "credit_pool": "ai_credits",
                   "amount": 20}
    three = check(api, "u1", "image_generation", units=3)
    assert (three["allowed"], three["reason"], three["amount"], three["balance"]) == (
        False, "insufficient_balance", 30, 25)


def test_no_entitlement_and_insufficient_balance_are_told_apart(api: Api) -> None:
    feature(api, "credits")
    assert check(api, "u1", "credits")["reason"] == "no_entitlement"
    grant(api, "u1", "credits", 1)
    assert check(api, "u1", "credits", units=2)["reason"] == "insufficient_balance"


def test_an_unknown_feature_is_reason_unknown_feature(api: Api) -> None:
    assert check(api, "u1", "nothing") == {
        "allowed": False, "balance": None, "end_user_id": "u1", "feature_key": "nothing", "unlimited": False,
        "reason": "unknown_feature", "resets_at": None, "units": None}


def test_overage_allowed_checks_say_so(api: Api) -> None:
    catalog(api)
    result = check(api, "u1", "tokens", units=11)
    assert (result["allowed"], result["overage"], result["balance"], result["reason"]) == (True, True, 10, None)


def test_check_units_are_validated_against_the_features_precision(api: Api) -> None:
    catalog(api)
    assert check(api, "u1", "ai_credits", units="0.5")["units"] == Decimal("0.5")
    for units in ("1.5", "0", "-1", "abc", "NaN"):
        assert_error(api.get("/v1/entitlements/check", end_user_id="u1", feature_key="api_calls", units=units),
                     400, "invalid_amount", "units")
    assert_error(api.get("/v1/entitlements/check", end_user_id="u1"), 400, "invalid_request", "feature_key")
    assert_error(api.get("/v1/entitlements/check", end_user_id="x" * 256, feature_key="api_calls"),
                 400, "invalid_request", "end_user_id")


def test_a_check_changes_nothing(api: Api) -> None:
    catalog(api)
    before = ledger(api)
    events = api.ok("GET", "/v1/events")["data"]
    for _ in range(3):
        check(api, "u1", "api_calls", units=5)
        check(api, "u1", "image_generation")
        check(api, "u9", "api_calls")
    assert ledger(api) == before
    assert api.ok("GET", "/v1/events")["data"] == events
    assert api.ok("GET", "/v1/subscriptions", params={"end_user_id": "u9"})["data"] == []


def test_the_entitlements_list_checks_every_feature(api: Api) -> None:
    catalog(api)
    listed = api.ok("GET", "/v1/entitlements", params={"end_user_id": "u1"})
    assert listed["object"] == "list" and listed["end_user_id"] == "u1"
    keys = ["api_calls", "tokens", "sso", "audit", "exports", "tickets", "legacy", "ai_credits", "image_generation"]
    assert [e["feature_key"] for e in listed["data"]] == keys
    for entry in listed["data"]:
        assert entry == check(api, "u1", entry["feature_key"])
    assert_error(api.get("/v1/entitlements"), 400, "invalid_request", "end_user_id")


def test_resets_at_is_the_end_of_the_entitlements_reset_window(api: Api) -> None:
    feature(api, "messages")
    plan_variant = variant(api, [{"feature_key": "messages", "amount": 40, "reset": {"every": 5, "unit": "hour"}}],
                           billing_period={"every": 1, "unit": "day"})
    sub = subscribe(api, "u1", plan_variant["id"])
    window_end = shifted(sub["current_period_start"], hours=5)
    result = check(api, "u1", "messages")
    assert (result["balance"], result["resets_at"]) == (40, window_end)
    [block] = api.ok("GET", "/v1/balances/u1", params={"feature_key": "messages"})["data"][0]["blocks"]
    assert (block["source"], block["expires_at"]) == ("plan", window_end)
