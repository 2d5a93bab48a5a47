"""Subscriptions: create, read, list, trials, calendar periods, the default plan."""

from __future__ import annotations

from .conftest import Api, assert_conserved, assert_error, balance_of, feature, ledger, subscribe, variant


def pro(api: Api, **fields: object) -> dict:
    feature(api, "api_calls")
    return variant(api, [{"feature_key": "api_calls", "amount": 100}], **fields)


def test_a_subscription_starts_now_and_grants_its_allowances(api: Api) -> None:
    plan_variant = pro(api)
    sub = subscribe(api, "user_123", plan_variant["id"], metadata={"order": "o1"})
    assert sub["id"].startswith("sub_")
    assert {k: sub[k] for k in ("object", "end_user_id", "plan_id", "plan_variant_id", "status", "trial_end",
                                "cancel_at_period_end", "paused_at", "auto_renew", "timezone", "metadata",
                                "default_plan", "ended_at", "scheduled_change")} == {
        "object": "subscription", "end_user_id": "user_123", "plan_id": plan_variant["plan_id"],
        "plan_variant_id": plan_variant["id"], "status": "active", "trial_end": None,
        "cancel_at_period_end": False, "paused_at": None, "auto_renew": True, "timezone": "UTC",
        "metadata": {"order": "o1"}, "default_plan": False, "ended_at": None, "scheduled_change": None}
    assert sub["current_period_start"] == sub["created_at"]
    assert api.ok("GET", f"/v1/subscriptions/{sub['id']}") == sub
    assert balance_of(api, "user_123", "api_calls") == (100, 0)
    [entry] = ledger(api, end_user_id="user_123")
    assert (entry["type"], entry["amount"], entry["subscription_id"]) == ("grant", 100, sub["id"])
    block = api.ok("GET", f"/v1/grants/{entry['block_id']}")
    assert (block["source"], block["expires_at"], block["effective_at"]) == (
        "plan", sub["current_period_end"], sub["current_period_start"])
    assert_conserved(api, "user_123", "api_calls")


def test_a_variant_with_a_trial_starts_trialing_unless_trial_is_false(api: Api) -> None:
    plan_variant = pro(api, trial_period={"every": 7, "unit": "day"})
    trialing = subscribe(api, "u1", plan_variant["id"])
    assert trialing["status"] == "trialing"
    assert trialing["trial_end"] == trialing["current_period_end"] is not None
    paid = subscribe(api, "u2", plan_variant["id"], trial=False)
    assert (paid["status"], paid["trial_end"]) == ("active", None)
    custom = subscribe(api, "u3", plan_variant["id"], trial={"every": 1, "unit": "day"})
    assert custom["status"] == "trialing"


def test_periods_are_calendar_months_counted_from_the_anchor(api: Api) -> None:
    plan_variant = pro(api)
    api.ok("POST", "/v1/test_clock/advance", {"to": "2031-03-15T12:00:00Z"})
    sub = subscribe(api, "u1", plan_variant["id"], start_at="2031-01-31T00:00:00Z")
    assert (sub["current_period_start"], sub["current_period_end"]) == ("2031-02-28T00:00:00Z", "2031-03-31T00:00:00Z")
    # Local midnights in New York: EST before 9 March 2031, EDT after.
    local = subscribe(api, "u2", plan_variant["id"], start_at="2031-01-31T00:00:00-05:00",
                      timezone="America/New_York")
    assert (local["current_period_start"], local["current_period_end"]) == (
        "2031-02-28T05:00:00Z", "2031-03-31T04:00:00Z")
    assert local["timezone"] == "America/New_York"
    assert balance_of(api, "u1", "api_calls") == (100, 0)


def test_invalid_subscriptions_are_refused(api: Api) -> None:
    plan_variant = pro(api)
    cases = [
        ({"end_user_id": "u1", "plan_variant_id": "var_nothing"}, 404, "not_found", "plan_variant_id"),
        ({"end_user_id": "u1", "plan_variant_id": plan_variant["id"], "timezone": "Mars/Olympus"},
         400, "invalid_request", "timezone"),
        ({"end_user_id": "u1", "plan_variant_id": plan_variant["id"], "start_at": "2999-01-01T00:00:00Z"},
         400, "invalid_request", "start_at"),
        ({"end_user_id": "u1", "plan_variant_id": plan_variant["id"], "start_at": "2020-01-01"},
         400, "invalid_request", "start_at"),
        ({"end_user_id": "u1", "plan_variant_id": plan_variant["id"], "start_at": "2020-01-01T00:00:00"},
         400, "invalid_request", "start_at"),
        ({"end_user_id": "", "plan_variant_id": plan_variant["id"]}, 400, "invalid_request", "end_user_id"),
        ({"end_user_id": "x" * 256, "plan_variant_id": plan_variant["id"]}, 400, "invalid_request", "end_user_id"),
        ({"end_user_id": "u1"}, 400, "invalid_request", "plan_variant_id"),
        ({"end_user_id": "u1", "plan_variant_id": plan_variant["id"], "auto_renew": "no"},
         400, "invalid_request", "auto_renew"),
    ]
    for body, status, code, param in cases:
        assert_error(api.post("/v1/subscriptions", body), status, code, param)
    assert api.ok("GET", "/v1/subscriptions")["data"] == []
    assert ledger(api) == []


def test_a_second_live_subscription_is_409_subscription_exists_and_changes_nothing(api: Api) -> None:
    plan_variant = pro(api)
    first = subscribe(api, "u1", plan_variant["id"])
    entries = ledger(api)
    error = assert_error(api.post("/v1/subscriptions", {"end_user_id": "u1", "plan_variant_id": plan_variant["id"]}),
                         409, "subscription_exists", "end_user_id")
    assert error["type"] == "state_error"
    assert [s["id"] for s in api.ok("GET", "/v1/subscriptions")["data"]] == [first["id"]]
    assert ledger(api) == entries
    assert balance_of(api, "u1", "api_calls") == (100, 0)


def test_a_default_plan_subscription_is_replaced_by_a_new_one(api: Api) -> None:
    feature(api, "api_calls")
    variant(api, [{"feature_key": "api_calls", "amount": 5}], plan="free", default=True)
    paid = variant(api, [{"feature_key": "api_calls", "amount": 100}], plan="pro")
    check = api.ok("GET", "/v1/entitlements/check", params={"end_user_id": "u1", "feature_key": "api_calls"})
    assert (check["allowed"], check["balance"]) == (True, 5)
    [free] = api.ok("GET", "/v1/subscriptions", params={"end_user_id": "u1"})["data"]
    assert (free["default_plan"], free["status"]) == (True, "active")

    sub = subscribe(api, "u1", paid["id"])
    assert sub["default_plan"] is False
    ended = api.ok("GET", f"/v1/subscriptions/{free['id']}")
    assert ended["status"] == "canceled" and ended["ended_at"] == sub["created_at"]
    assert balance_of(api, "u1", "api_calls") == (100, 0)
    assert [(e["type"], e["amount"], e["subscription_id"]) for e in ledger(api, end_user_id="u1")] == [
        ("grant", 100, sub["id"]), ("expire", 5, free["id"]), ("grant", 5, free["id"])]
    assert_conserved(api, "u1", "api_calls")
    canceled = api.ok("GET", "/v1/events", params={"type": "subscription.canceled"})["data"]
    assert [(e["data"]["id"], e["data"]["reason"]) for e in canceled] == [(free["id"], "replaced")]
    assert_error(api.post("/v1/subscriptions", {"end_user_id": "u1", "plan_variant_id": paid["id"]}),
                 409, "subscription_exists", "end_user_id")


def test_list_subscriptions_by_end_user_and_status_newest_first(api: Api) -> None:
    feature(api, "api_calls")
    variant(api, [], plan="free", default=True)
    paid = variant(api, [], plan="pro")
    api.ok("GET", "/v1/entitlements", params={"end_user_id": "u1"})  # u1 starts on the free plan
    subs = [subscribe(api, user, paid["id"]) for user in ("u1", "u2", "u3")]
    everyone = api.ok("GET", "/v1/subscriptions")
    assert len(everyone["data"]) == 4 and everyone["has_more"] is False
    assert [s["id"] for s in everyone["data"][:3]] == [s["id"] for s in reversed(subs)]
    u1 = api.ok("GET", "/v1/subscriptions", params={"end_user_id": "u1"})["data"]
    assert [(s["status"], s["default_plan"]) for s in u1] == [("active", False), ("canceled", True)]
    canceled = api.ok("GET", "/v1/subscriptions", params={"status": "canceled"})["data"]
    assert [s["end_user_id"] for s in canceled] == ["u1"]
    page = api.ok("GET", "/v1/subscriptions", params={"limit": 2})
    assert page["has_more"] is True and page["next_cursor"] == page["data"][1]["id"]
    rest = api.ok("GET", "/v1/subscriptions", params={"limit": 2, "starting_after": page["next_cursor"]})
    assert [s["id"] for s in page["data"] + rest["data"]] == [s["id"] for s in everyone["data"]]
    assert rest["has_more"] is False


def test_a_missing_subscription_is_404(api: Api) -> None:
    assert_error(api.get("/v1/subscriptions/sub_nothing"), 404, "not_found")
