"""Subscriptions through time, driven by the sandbox clock: every lifecycle path, at the API.

Each test makes its own tenant; after each, the ledger adds up for every end user it touched.
"""

from __future__ import annotations


import httpx
import pytest

from quotastack.domain.periods import format_rfc3339, parse_rfc3339

from .sandbox import DAY, HOUR, Sandbox, seconds_between


@pytest.fixture(autouse=True)
def features(sb: Sandbox) -> None:
    sb.post("/v1/features", {"key": "credits"}, 201)
    sb.post("/v1/features", {"key": "messages"}, 201)


def test_a_monthly_subscription_renews_with_a_fresh_allowance(sb: Sandbox) -> None:
    variant = sb.plan("pro", [{"feature_key": "credits", "amount": 1000}])
    sub = sb.subscribe("ann", variant)
    sb.use("ann", "credits", 300)
    sb.advance(to=sub["current_period_end"])
    renewed = sb.live("ann")
    assert renewed["id"] == sub["id"] and renewed["current_period_start"] == sub["current_period_end"]
    assert sb.balance("ann", "credits")["balance"] == 1000  # no hoarding: the 700 unused expired
    types = [e["type"] for e in sb.get("/v1/ledger", end_user_id="ann")["data"]]
    assert types[:3] == ["grant", "expire", "use"]
    assert [e["type"] for e in sb.get("/v1/events", type="subscription.renewed")["data"]] == ["subscription.renewed"]


def test_a_check_at_the_boundary_instant_sees_the_new_window_before_any_sweep(sb: Sandbox) -> None:
    variant = sb.plan("chat", [{"feature_key": "messages", "amount": 40, "reset": {"every": 5, "unit": "hour"}}])
    sub = sb.subscribe("bo", variant)
    sb.use("bo", "messages", 40)
    refused = sb.check("bo", "messages")
    assert (refused["allowed"], refused["reason"], refused["balance"]) == (False, "insufficient_balance", 0)
    boundary = refused["resets_at"]
    assert seconds_between(sub["created_at"], boundary) == 5 * HOUR
    # Move the clock without processing anything: straight to the instant, then ask.
    sb.http.post("/v1/test_clock/advance", json={"to": boundary})
    fresh = sb.check("bo", "messages")
    assert (fresh["allowed"], fresh["balance"]) == (True, 40)
    assert seconds_between(boundary, fresh["resets_at"]) == 5 * HOUR


def test_forty_messages_every_five_hours_never_accumulate(sb: Sandbox) -> None:
    variant = sb.plan("plus", [{"feature_key": "messages", "amount": 40, "reset": {"every": 5, "unit": "hour"}}])
    sb.subscribe("cy", variant)
    sb.advance(seconds=3 * DAY)  # 14 full windows and a part, unused
    assert sb.balance("cy", "messages")["balance"] == 40
    grants = sb.get("/v1/ledger", end_user_id="cy", type="grant", limit=100)["data"]
    expiries = sb.get("/v1/ledger", end_user_id="cy", type="expire", limit=100)["data"]
    assert (len(grants), len(expiries)) == (15, 14)


def test_rollover_carries_unused_credit_up_to_its_cap(sb: Sandbox) -> None:
    variant = sb.plan("team", [{"feature_key": "credits", "amount": 1000,
                                "rollover": {"max_amount": 500}}])
    sub = sb.subscribe("di", variant)
    sb.use("di", "credits", 200)
    sb.advance(to=sub["current_period_end"])
    assert sb.balance("di", "credits")["balance"] == 1500  # 800 unused, 500 carried
    rollovers = sb.get("/v1/ledger", end_user_id="di", type="rollover")["data"]
    assert [e["amount"] for e in rollovers] == [500]
    sb.advance(to=sb.live("di")["current_period_end"])
    # Already holding 500 of rolled-over credit: nothing more carries, however much was unused.
    assert sb.balance("di", "credits")["balance"] == 1500


def test_rolled_over_credit_expires_after_its_own_life(sb: Sandbox) -> None:
    variant = sb.plan("exp", [{"feature_key": "credits", "amount": 100,
                               "rollover": {"max_amount": 100, "expires_after": {"every": 1, "unit": "week"}}}])
    sub = sb.subscribe("ed", variant)
    sb.advance(to=sub["current_period_end"])
    assert sb.balance("ed", "credits")["balance"] == 200
    sb.advance(seconds=7 * DAY)
    assert sb.balance("ed", "credits")["balance"] == 100


def test_max_balance_caps_every_grant_and_the_ledger_says_so(sb: Sandbox) -> None:
    variant = sb.plan("cap", [{"feature_key": "credits", "amount": 1000, "max_balance": 1500,
                               "rollover": {"max_amount": 1000}}])
    sub = sb.subscribe("fa", variant)
    sb.advance(to=sub["current_period_end"])
    assert sb.balance("fa", "credits")["balance"] == 1500
    grants = sb.get("/v1/ledger", end_user_id="fa", type="grant")["data"]
    assert grants[0]["amount"] == 500 and grants[0]["reason"] == "max_balance: 500 of 1000 not granted"


def test_a_trial_ends_into_the_first_paid_period(sb: Sandbox) -> None:
    variant = sb.plan("tri", [{"feature_key": "credits", "amount": 100}], trial={"every": 7, "unit": "day"})
    sub = sb.subscribe("gu", variant)
    assert sub["status"] == "trialing" and seconds_between(sub["created_at"], sub["trial_end"]) == 7 * DAY
    assert sub["current_period_end"] == sub["trial_end"]
    sb.advance(seconds=7 * DAY)
    after = sb.live("gu")
    assert after["status"] == "active" and after["current_period_start"] == sub["trial_end"]
    assert sb.balance("gu", "credits")["balance"] == 100


def test_without_auto_renew_it_expires_and_falls_back_to_the_default_plan(sb: Sandbox) -> None:
    sb.plan("free", [{"feature_key": "credits", "amount": 10}], default=True)
    paid = sb.plan("paid", [{"feature_key": "credits", "amount": 1000}])
    sub = sb.subscribe("ha", paid, auto_renew=False)
    sb.advance(to=sub["current_period_end"])
    assert sb.get(f"/v1/subscriptions/{sub['id']}")["status"] == "expired"
    fallback = sb.live("ha")
    assert fallback["default_plan"] is True and fallback["current_period_start"] == sub["current_period_end"]
    assert sb.balance("ha", "credits")["balance"] == 10


def test_cancel_at_period_end_then_immediately(sb: Sandbox) -> None:
    variant = sb.plan("c", [{"feature_key": "credits", "amount": 100}])
    sub = sb.subscribe("io", variant)
    pending = sb.post(f"/v1/subscriptions/{sub['id']}/cancel", {"at": "period_end"})
    assert pending["cancel_at_period_end"] is True and pending["status"] == "active"
    sb.advance(to=sub["current_period_end"])
    assert sb.get(f"/v1/subscriptions/{sub['id']}")["status"] == "canceled"
    assert sb.balance("io", "credits")["balance"] == 0
    other = sb.subscribe("jo", variant)
    before = sb.now()
    done = sb.post(f"/v1/subscriptions/{other['id']}/cancel", {"at": "immediately"})
    assert done["status"] == "canceled" and before <= done["ended_at"] <= sb.now()
    assert sb.balance("jo", "credits")["balance"] == 0
    again = sb.http.post(f"/v1/subscriptions/{other['id']}/cancel", json={})
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"


def test_pause_freezes_plan_credits_and_resume_moves_the_period(sb: Sandbox) -> None:
    variant = sb.plan("p", [{"feature_key": "credits", "amount": 100}])
    sub = sb.subscribe("ka", variant)
    sb.post("/v1/grants", {"end_user_id": "ka", "feature_key": "credits", "amount": 5}, 201)
    paused = sb.post(f"/v1/subscriptions/{sub['id']}/pause")
    assert paused["status"] == "paused"
    check = sb.check("ka", "credits", units=6)
    assert (check["allowed"], check["reason"], check["balance"]) == (False, "subscription_paused", 5)
    sb.use("ka", "credits", 5)  # the grant is not the plan's: still spendable
    frozen = sb.balance("ka", "credits")
    assert (frozen["balance"], frozen["frozen"]) == (0, 100)
    sb.advance(seconds=40 * DAY)  # past the period end: nothing renews, expires or resets
    assert sb.balance("ka", "credits")["frozen"] == 100
    resumed = sb.post(f"/v1/subscriptions/{sub['id']}/resume")
    assert resumed["status"] == "active"
    assert seconds_between(sub["current_period_end"], resumed["current_period_end"]) == 40 * DAY
    block = sb.balance("ka", "credits")["blocks"][0]
    assert block["expires_at"] == resumed["current_period_end"] and block["remaining"] == 100
    wrong = sb.http.post(f"/v1/subscriptions/{sub['id']}/resume", json={})
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "invalid_state"


def test_an_immediate_change_replaces_the_allowance_less_what_was_used(sb: Sandbox) -> None:
    basic = sb.plan("basic", [{"feature_key": "credits", "amount": 1000}])
    pro = sb.plan("pro2", [{"feature_key": "credits", "amount": 5000}])
    sub = sb.subscribe("li", basic)
    sb.use("li", "credits", 300)
    changed = sb.post(f"/v1/subscriptions/{sub['id']}/change", {"plan_variant_id": pro})
    assert changed["plan_variant_id"] == pro and changed["current_period_end"] == sub["current_period_end"]
    assert sb.balance("li", "credits")["balance"] == 4700
    down = sb.post(f"/v1/subscriptions/{sub['id']}/change", {"plan_variant_id": basic})
    assert down["plan_variant_id"] == basic
    assert sb.balance("li", "credits")["balance"] == 700


def test_a_change_at_period_end_is_scheduled_until_the_boundary(sb: Sandbox) -> None:
    basic = sb.plan("b2", [{"feature_key": "credits", "amount": 100}])
    pro = sb.plan("p2", [{"feature_key": "credits", "amount": 900}])
    sub = sb.subscribe("mo", basic)
    scheduled = sb.post(f"/v1/subscriptions/{sub['id']}/change", {"plan_variant_id": pro, "timing": "period_end"})
    assert scheduled["scheduled_change"]["plan_variant_id"] == pro and scheduled["plan_variant_id"] == basic
    assert sb.balance("mo", "credits")["balance"] == 100
    sb.advance(to=sub["current_period_end"])
    after = sb.live("mo")
    assert after["plan_variant_id"] == pro and after["scheduled_change"] is None
    assert sb.balance("mo", "credits")["balance"] == 900


def test_renew_starts_the_next_period_now(sb: Sandbox) -> None:
    variant = sb.plan("r", [{"feature_key": "credits", "amount": 100}])
    sub = sb.subscribe("ni", variant, auto_renew=False)
    sb.use("ni", "credits", 60)
    sb.advance(seconds=10 * DAY)
    renewed = sb.post(f"/v1/subscriptions/{sub['id']}/renew")
    assert seconds_between(sub["current_period_start"], renewed["current_period_start"]) == 10 * DAY
    assert sb.balance("ni", "credits")["balance"] == 100
    assert [e["type"] for e in sb.get("/v1/events", type="subscription.renewed")["data"]] == ["subscription.renewed"]


def test_the_test_clock_is_sandbox_only_and_never_goes_back(sb: Sandbox) -> None:
    live = httpx.post(f"{sb.http.base_url}/v1/test_clock/advance", json={"seconds": 1},
                      headers={"Authorization": f"Bearer {sb.keys[1]['key']}"})
    assert live.status_code == 403 and live.json()["error"]["code"] == "forbidden_in_live"
    now = sb.now()
    back = sb.http.post("/v1/test_clock/advance", json={"to": format_rfc3339(parse_rfc3339(now, "n") - 10**6)})
    assert back.status_code == 400 and back.json()["error"]["code"] == "invalid_request"
    assert seconds_between(now, sb.advance(seconds=90)) == 90


def test_priced_overage_is_summarised_at_period_end(sb: Sandbox) -> None:
    variant = sb.plan("meter", [{"feature_key": "credits", "amount": 100, "overage": "allow", "pricing": {
        "mode": "graduated", "currency": "USD",
        "tiers": [{"up_to": 1000, "unit_price": "0.01"}, {"up_to": None, "unit_price": "0.005"}]}}])
    sub = sb.subscribe("ol", variant)
    used = sb.use("ol", "credits", 1600)
    assert used["overage"] == 1500
    sb.advance(to=sub["current_period_end"])
    summaries = sb.get("/v1/events", type="usage.period_summary")["data"]
    assert len(summaries) == 1
    data = summaries[0]["data"]
    assert (data["units"], data["overage_units"], data["pricing"]["amount"]) == (1600, 1500, 12.5)


def test_a_refund_to_an_expired_block_is_lost_and_counts_against_what_is_left(sb: Sandbox) -> None:
    # Found by the property test: a refund skipped for an expired block stayed refundable.
    variant = sb.plan("rf", [{"feature_key": "credits", "amount": 100}])
    sub = sb.subscribe("pe", variant)
    usage = sb.use("pe", "credits", 30)
    sb.advance(to=sub["current_period_end"])
    lost = sb.post("/v1/refunds", {"usage_id": usage["id"], "amount": 10}, 201)
    assert (lost["requested"], lost["amount"]) == (10, 0)
    assert lost["skipped"] == [{"block_id": usage["entries"][0]["block_id"], "amount": 10, "reason": "block expired"}]
    too_much = sb.http.post("/v1/refunds", json={"usage_id": usage["id"], "amount": 21})
    assert too_much.status_code == 400 and too_much.json()["error"]["message"] == "at most 20 can be refunded"
    assert sb.balance("pe", "credits")["balance"] == 100


def test_a_scheduled_change_that_drops_a_feature_still_renews(sb: Sandbox) -> None:
    # Found by breaking it: the dropped feature's window stayed due for ever and the request spun.
    both = sb.plan("both", [{"feature_key": "credits", "amount": 10}, {"feature_key": "messages", "amount": 10}])
    one = sb.plan("one", [{"feature_key": "credits", "amount": 10}])
    sub = sb.subscribe("qu", both)
    sb.post(f"/v1/subscriptions/{sub['id']}/change", {"plan_variant_id": one, "timing": "period_end"})
    sb.advance(seconds=32 * DAY)
    after = sb.live("qu")
    assert after["plan_variant_id"] == one and after["status"] == "active"
    assert (sb.balance("qu", "credits")["balance"], sb.balance("qu", "messages")["balance"]) == (10, 0)


def test_undoing_a_change_never_gives_back_what_was_used(sb: Sandbox) -> None:
    # Found by breaking it: a change that granted 0 forgot the 30 and 100 already used.
    a = sb.plan("a", [{"feature_key": "messages", "amount": 40, "reset": {"every": 5, "unit": "hour"}},
                      {"feature_key": "credits", "amount": 1000}])
    w = sb.plan("w", [{"feature_key": "messages", "amount": 10, "reset": {"every": 1, "unit": "day"}},
                      {"feature_key": "credits", "amount": 100}])
    sub = sb.subscribe("ra", a)
    sb.use("ra", "messages", 30)
    sb.use("ra", "credits", 100)
    sb.post(f"/v1/subscriptions/{sub['id']}/change", {"plan_variant_id": w})
    assert (sb.balance("ra", "messages")["balance"], sb.balance("ra", "credits")["balance"]) == (0, 0)
    sb.post(f"/v1/subscriptions/{sub['id']}/change", {"plan_variant_id": a})
    assert (sb.balance("ra", "messages")["balance"], sb.balance("ra", "credits")["balance"]) == (10, 900)


def test_credits_held_at_a_change_count_as_used(sb: Sandbox) -> None:
    # Found by breaking it: 30 held + a fresh 100 made 130 spendable in a 100 window.
    small = sb.plan("s", [{"feature_key": "messages", "amount": 40, "reset": {"every": 5, "unit": "hour"}}])
    large = sb.plan("l", [{"feature_key": "messages", "amount": 100, "reset": {"every": 5, "unit": "hour"}}])
    sub = sb.subscribe("sa", small)
    held = sb.post("/v1/reservations", {"end_user_id": "sa", "feature_key": "messages", "units": 30}, 201)
    sb.post(f"/v1/subscriptions/{sub['id']}/change", {"plan_variant_id": large})
    after = sb.balance("sa", "messages")
    assert (after["balance"], after["reserved"]) == (70, 30)
    sb.post(f"/v1/reservations/{held['id']}/commit", {"units": 10})
    sb.post(f"/v1/subscriptions/{sub['id']}/change", {"plan_variant_id": small})
    assert sb.balance("sa", "messages")["balance"] == 10
