"""The catalog: features, plans, plan variants, top-up packs."""

from __future__ import annotations

import re
from decimal import Decimal

from .conftest import Api, assert_error, feature, grant, variant

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


# ---- features -----------------------------------------------------------------------------------------

def test_create_a_metered_feature_with_defaults(api: Api) -> None:
    created = feature(api, "api_calls")
    assert created["id"].startswith("feat_") and TIMESTAMP.match(created["created_at"])
    assert {k: v for k, v in created.items() if k not in ("id", "created_at")} == {
        "object": "feature", "key": "api_calls", "name": "api_calls", "type": "metered", "unit": None,
        "precision": 0, "credit_pool": None, "credits_per_unit": None, "metadata": {}}
    assert api.ok("GET", "/v1/features/api_calls") == created


def test_create_boolean_and_credit_pool_features(api: Api) -> None:
    sso = feature(api, "sso", type="boolean", name="Single sign-on")
    assert (sso["type"], sso["name"], sso["precision"]) == ("boolean", "Single sign-on", 0)
    feature(api, "ai_credits", precision=2, unit="credit", metadata={"team": "ml"})
    image = feature(api, "image_generation", credit_pool="ai_credits", credits_per_unit=10)
    assert (image["credit_pool"], image["credits_per_unit"]) == ("ai_credits", 10)
    half = api.post("/v1/features", {"key": "half", "credit_pool": "ai_credits", "credits_per_unit": "0.005"})
    assert half.status == 201 and '"credits_per_unit":0.005' in half.text
    default_rate = feature(api, "one_to_one", credit_pool="ai_credits")
    assert default_rate["credits_per_unit"] == 1


def test_feature_keys_are_unique_per_environment(api: Api) -> None:
    feature(api, "api_calls")
    assert_error(api.post("/v1/features", {"key": "api_calls"}), 400, "invalid_request", "key")


def test_invalid_feature_definitions_are_refused(api: Api) -> None:
    feature(api, "ai_credits", precision=2)
    feature(api, "sso", type="boolean")
    cases = [
        ({"key": "x", "credit_pool": "missing"}, 404, "not_found", "credit_pool"),
        ({"key": "x", "credit_pool": "x"}, 400, "invalid_request", "credit_pool"),
        ({"key": "x", "credit_pool": "sso"}, 400, "invalid_request", "credit_pool"),
        ({"key": "x", "credits_per_unit": 2}, 400, "invalid_request", "credits_per_unit"),
        ({"key": "x", "credit_pool": "ai_credits", "credits_per_unit": 0}, 400, "invalid_amount", "credits_per_unit"),
        ({"key": "x", "credit_pool": "ai_credits", "credits_per_unit": "0.0000000001"},
         400, "invalid_amount", "credits_per_unit"),
        ({"key": "x", "type": "boolean", "precision": 2}, 400, "invalid_request", "type"),
        ({"key": "x", "type": "counter"}, 400, "invalid_request", "type"),
        ({"key": "x", "precision": 10}, 400, "invalid_request", "precision"),
        ({"key": "has space"}, 400, "invalid_request", "key"),
    ]
    for body, status, code, param in cases:
        assert_error(api.post("/v1/features", body), status, code, param)
    feature(api, "pooled", credit_pool="ai_credits")
    assert_error(api.post("/v1/features", {"key": "x", "credit_pool": "pooled"}), 400, "invalid_request", "credit_pool")
    assert [f["key"] for f in api.ok("GET", "/v1/features")["data"]] == ["pooled", "sso", "ai_credits"]


def test_list_features_newest_first_with_pagination(api: Api) -> None:
    for key in ("a", "b", "c", "d", "e"):
        feature(api, key)
    first = api.ok("GET", "/v1/features", params={"limit": 2})
    assert [f["key"] for f in first["data"]] == ["e", "d"]
    assert (first["has_more"], first["next_cursor"]) == (True, first["data"][-1]["id"])
    second = api.ok("GET", "/v1/features", params={"limit": 2, "starting_after": first["next_cursor"]})
    assert [f["key"] for f in second["data"]] == ["c", "b"] and second["has_more"] is True
    last = api.ok("GET", "/v1/features", params={"limit": 2, "starting_after": second["next_cursor"]})
    assert [f["key"] for f in last["data"]] == ["a"]
    assert (last["has_more"], last["next_cursor"]) == (False, None)


def test_update_a_features_name_unit_and_metadata(api: Api) -> None:
    created = feature(api, "api_calls")
    updated = api.ok("POST", "/v1/features/api_calls", {"name": "API calls", "unit": "call", "metadata": {"a": 1}})
    assert (updated["name"], updated["unit"], updated["metadata"]) == ("API calls", "call", {"a": 1})
    assert (updated["id"], updated["precision"]) == (created["id"], 0)
    assert api.ok("GET", "/v1/features/api_calls") == updated
    assert_error(api.post("/v1/features/nothing", {"name": "x"}), 404, "not_found")
    assert_error(api.post("/v1/features/api_calls", {"type": "boolean"}), 400, "invalid_request", "type")


def test_precision_can_change_until_the_feature_has_ledger_entries(api: Api) -> None:
    feature(api, "credits")
    assert api.ok("POST", "/v1/features/credits", {"precision": 2})["precision"] == 2
    grant(api, "u1", "credits", "1.25")
    assert_error(api.post("/v1/features/credits", {"precision": 3}), 400, "invalid_request", "precision")
    assert api.ok("GET", "/v1/features/credits")["precision"] == 2
    assert api.ok("POST", "/v1/features/credits", {"precision": 2, "name": "Credits"})["name"] == "Credits"


def test_a_missing_feature_is_404(api: Api) -> None:
    assert_error(api.get("/v1/features/nothing"), 404, "not_found")


# ---- plans and variants ---------------------------------------------------------------------------------

def test_create_get_and_list_plans(api: Api) -> None:
    pro = api.ok("POST", "/v1/plans", {"key": "pro", "name": "Pro"}, 201)
    assert pro["id"].startswith("plan_")
    assert {k: pro[k] for k in ("object", "key", "name", "default", "metadata")} == {
        "object": "plan", "key": "pro", "name": "Pro", "default": False, "metadata": {}}
    free = api.ok("POST", "/v1/plans", {"key": "free", "default": True}, 201)
    assert (free["name"], free["default"]) == ("free", True)
    assert api.ok("GET", f"/v1/plans/{pro['id']}") == pro
    assert api.ok("GET", "/v1/plans/pro") == pro
    assert [p["key"] for p in api.ok("GET", "/v1/plans")["data"]] == ["free", "pro"]
    assert_error(api.get("/v1/plans/plan_nothing"), 404, "not_found")


def test_plan_keys_are_unique_and_there_is_at_most_one_default_plan(api: Api) -> None:
    api.ok("POST", "/v1/plans", {"key": "free", "default": True}, 201)
    assert_error(api.post("/v1/plans", {"key": "free"}), 400, "invalid_request", "key")
    assert_error(api.post("/v1/plans", {"key": "free2", "default": True}), 400, "invalid_request", "default")
    assert_error(api.post("/v1/plans", {"key": "x", "default": "yes"}), 400, "invalid_request", "default")


def test_create_a_variant_with_every_kind_of_entitlement(api: Api) -> None:
    feature(api, "api_calls")
    feature(api, "messages")
    feature(api, "ai_credits", precision=2)
    feature(api, "tokens")
    feature(api, "sso", type="boolean")
    feature(api, "support_tickets")
    pricing = {"mode": "graduated", "currency": "USD",
               "tiers": [{"up_to": 1000000, "unit_price": "0.000002"}, {"up_to": None, "unit_price": "0.000001"}]}
    created = variant(api, [
        {"feature_key": "api_calls", "amount": 50000},
        {"feature_key": "messages", "amount": 40, "reset": {"every": 5, "unit": "hour"}},
        {"feature_key": "ai_credits", "amount": "1000.50",
         "rollover": {"max_amount": 500, "expires_after": {"every": 1, "unit": "month"}},
         "max_balance": 3000, "priority": 10},
        {"feature_key": "tokens", "amount": 100000, "overage": "allow", "pricing": pricing},
        {"feature_key": "sso", "enabled": True},
        {"feature_key": "support_tickets", "unlimited": True},
    ], price={"amount": 20, "currency": "USD"}, billing_period={"every": 1, "unit": "month"},
        trial_period={"every": 7, "unit": "day"})
    assert created["id"].startswith("var_") and created["key"] == "pro_monthly"
    assert created["price"] == {"amount": 20, "currency": "USD"}
    assert created["billing_period"] == {"every": 1, "unit": "month"}
    assert created["trial_period"] == {"every": 7, "unit": "day"}
    base = {"amount": None, "enabled": True, "unlimited": False, "priority": 100, "max_balance": None,
            "overage": "block", "pricing": None, "reset": None, "rollover": None}
    assert created["entitlements"] == [
        base | {"feature_key": "api_calls", "amount": 50000},
        base | {"feature_key": "messages", "amount": 40, "reset": {"every": 5, "unit": "hour"}},
        base | {"feature_key": "ai_credits", "amount": Decimal("1000.5"), "priority": 10, "max_balance": 3000,
                "rollover": {"max_amount": 500, "expires_after": {"every": 1, "unit": "month"}}},
        base | {"feature_key": "tokens", "amount": 100000, "overage": "allow", "pricing": {
            "mode": "graduated", "currency": "USD", "tiers": [
                {"up_to": 1000000, "unit_price": Decimal("0.000002")},
                {"up_to": None, "unit_price": Decimal("0.000001")}]}},
        base | {"feature_key": "sso"},
        base | {"feature_key": "support_tickets", "unlimited": True},
    ]
    plan_id = created["plan_id"]
    assert api.ok("GET", f"/v1/plans/{plan_id}/variants/{created['id']}") == created
    assert api.ok("GET", f"/v1/plan_variants/{created['id']}") == created
    listed = api.ok("GET", f"/v1/plans/{plan_id}/variants")
    assert listed["data"] == [created] and listed["has_more"] is False


def test_a_variant_defaults_to_a_monthly_period_without_trial(api: Api) -> None:
    created = variant(api, [])
    assert (created["billing_period"], created["trial_period"], created["price"]) == (
        {"every": 1, "unit": "month"}, None, None)


def test_variants_are_listed_per_plan_and_found_only_under_their_plan(api: Api) -> None:
    pro = variant(api, [], plan="pro")
    team = variant(api, [], plan="team")
    variant(api, [], plan="pro", key="pro_annual", billing_period={"every": 1, "unit": "year"})
    assert [v["key"] for v in api.ok("GET", "/v1/plans/pro/variants")["data"]] == ["pro_annual", "pro_monthly"]
    assert_error(api.get(f"/v1/plans/{pro['plan_id']}/variants/{team['id']}"), 404, "not_found")
    assert_error(api.get("/v1/plans/nothing/variants"), 404, "not_found")
    assert_error(api.get("/v1/plan_variants/var_nothing"), 404, "not_found")


def test_invalid_variants_are_refused_and_nothing_is_created(api: Api) -> None:
    feature(api, "api_calls", precision=1)
    feature(api, "sso", type="boolean")
    feature(api, "pool")
    feature(api, "img", credit_pool="pool")
    plan = api.ok("POST", "/v1/plans", {"key": "pro"}, 201)
    tiers = [{"up_to": 10, "unit_price": 1}, {"up_to": None, "unit_price": 0}]
    cases = [
        ([{"feature_key": "nothing", "amount": 1}], 404, "not_found", "entitlements[0].feature_key"),
        ([{"feature_key": "api_calls", "amount": 1}, {"feature_key": "api_calls", "amount": 2}],
         400, "invalid_request", "entitlements[1].feature_key"),
        ([{"feature_key": "sso", "amount": 5}], 400, "invalid_request", "entitlements[0].amount"),
        ([{"feature_key": "api_calls", "amount": 5, "unlimited": True}], 400, "invalid_request",
         "entitlements[0].amount"),
        ([{"feature_key": "api_calls", "amount": "0.25"}], 400, "invalid_amount", "entitlements[0].amount"),
        ([{"feature_key": "api_calls", "amount": -1}], 400, "invalid_amount", "entitlements[0].amount"),
        ([{"feature_key": "img", "amount": 5}], 400, "invalid_request", "entitlements[0].amount"),
        ([{"feature_key": "api_calls", "amount": 5, "pricing": {"mode": "graduated", "currency": "USD",
                                                                 "tiers": tiers}}],
         400, "invalid_request", "entitlements[0].pricing"),
        ([{"feature_key": "api_calls", "amount": 5, "overage": "allow", "pricing": {
            "mode": "volume", "currency": "USD", "tiers": [{"up_to": 10, "unit_price": 1},
                                                           {"up_to": 5, "unit_price": 1}]}}],
         400, "invalid_request", "entitlements[0].pricing.tiers[1].up_to"),
        ([{"feature_key": "api_calls", "amount": 5, "overage": "allow", "pricing": {
            "mode": "volume", "currency": "USD", "tiers": [{"up_to": 10, "unit_price": 1}]}}],
         400, "invalid_request", "entitlements[0].pricing.tiers"),
        ([{"feature_key": "api_calls", "amount": 5, "overage": "allow", "pricing": {
            "mode": "volume", "currency": "USD", "tiers": [{"up_to": None, "unit_price": -1}]}}],
         400, "invalid_amount", "entitlements[0].pricing.tiers[0].unit_price"),
        ([{"feature_key": "api_calls", "amount": 5, "reset": {"every": 0, "unit": "hour"}}],
         400, "invalid_request", "entitlements[0].reset.every"),
        ([{"feature_key": "api_calls", "amount": 5, "reset": {"every": 1, "unit": "fortnight"}}],
         400, "invalid_request", "entitlements[0].reset.unit"),
    ]
    for entitlements, status, code, param in cases:
        body = {"key": "v", "entitlements": entitlements}
        assert_error(api.post(f"/v1/plans/{plan['id']}/variants", body), status, code, param)
    assert api.ok("GET", f"/v1/plans/{plan['id']}/variants")["data"] == []
    assert_error(api.post("/v1/plans/plan_nothing/variants", {"key": "v"}), 404, "not_found")
    assert_error(api.post(f"/v1/plans/{plan['id']}/variants", {"key": "v", "price": {"amount": -1, "currency": "USD"}}),
                 400, "invalid_amount", "price.amount")


def test_variant_keys_are_unique_per_environment(api: Api) -> None:
    variant(api, [], plan="pro", key="monthly")
    plan = api.ok("GET", "/v1/plans/pro")
    assert_error(api.post(f"/v1/plans/{plan['id']}/variants", {"key": "monthly"}), 400, "invalid_request", "key")


# ---- packs ----------------------------------------------------------------------------------------------

def test_create_get_and_list_packs(api: Api) -> None:
    feature(api, "ai_credits", precision=2)
    boost = api.ok("POST", "/v1/packs", {"key": "boost_1000", "feature_key": "ai_credits", "amount": "1000.5",
                                         "price": {"amount": "9.99", "currency": "USD"},
                                         "expires_after": {"every": 3, "unit": "month"}, "priority": 50}, 201)
    assert boost["id"].startswith("pack_")
    assert {k: v for k, v in boost.items() if k not in ("id", "created_at")} == {
        "object": "pack", "key": "boost_1000", "feature_key": "ai_credits", "amount": Decimal("1000.5"),
        "price": {"amount": Decimal("9.99"), "currency": "USD"}, "expires_after": {"every": 3, "unit": "month"},
        "priority": 50, "metadata": {}}
    small = api.ok("POST", "/v1/packs", {"key": "small", "feature_key": "ai_credits", "amount": 5}, 201)
    assert (small["priority"], small["price"], small["expires_after"]) == (100, None, None)
    assert api.ok("GET", "/v1/packs/boost_1000") == boost
    assert [p["key"] for p in api.ok("GET", "/v1/packs")["data"]] == ["small", "boost_1000"]
    assert_error(api.get("/v1/packs/nothing"), 404, "not_found")


def test_invalid_packs_are_refused(api: Api) -> None:
    feature(api, "ai_credits", precision=2)
    feature(api, "sso", type="boolean")
    feature(api, "img", credit_pool="ai_credits")
    api.ok("POST", "/v1/packs", {"key": "p", "feature_key": "ai_credits", "amount": 1}, 201)
    cases = [
        ({"key": "p", "feature_key": "ai_credits", "amount": 1}, 400, "invalid_request", "key"),
        ({"key": "q", "feature_key": "nothing", "amount": 1}, 404, "not_found", "feature_key"),
        ({"key": "q", "feature_key": "sso", "amount": 1}, 400, "invalid_request", "feature_key"),
        ({"key": "q", "feature_key": "img", "amount": 1}, 400, "invalid_request", "feature_key"),
        ({"key": "q", "feature_key": "ai_credits", "amount": "0.001"}, 400, "invalid_amount", "amount"),
        ({"key": "q", "feature_key": "ai_credits", "amount": 0}, 400, "invalid_amount", "amount"),
        ({"key": "q", "feature_key": "ai_credits"}, 400, "invalid_request", "amount"),
        ({"key": "q", "feature_key": "ai_credits", "amount": 1, "price": {"amount": 1, "currency": "usd"}},
         400, "invalid_request", "price.currency"),
    ]
    for body, status, code, param in cases:
        assert_error(api.post("/v1/packs", body), status, code, param)
    assert [p["key"] for p in api.ok("GET", "/v1/packs")["data"]] == ["p"]

