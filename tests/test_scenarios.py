"""End-to-end billing timelines for the patterns of MISSION.md, driven by the sandbox clock.

Each scenario is one tenant's story with exact numbers at every step; after each, the ledger
adds up for every end user (API.md §8).
"""

from __future__ import annotations



from .sandbox import DAY, HOUR, Sandbox


def test_pattern_1_tiered_b2b_saas_with_rollover_and_top_up_packs(sb: Sandbox) -> None:
    sb.post("/v1/features", {"key": "credits", "name": "Credits"}, 201)
    starter = sb.plan("starter", [{"feature_key": "credits", "amount": 10_000, "rollover": {"max_amount": 5_000}}])
    growth = sb.plan("growth", [{"feature_key": "credits", "amount": 50_000, "rollover": {"max_amount": 20_000}}])
    # Packs burn after the plan's credits (higher priority number) and outlive the month.
    sb.post("/v1/packs", {"key": "boost_5k", "feature_key": "credits", "amount": 5_000, "priority": 200,
                          "price": {"amount": 49, "currency": "USD"}, "expires_after": {"every": 3, "unit": "month"}},
            201)
    sub = sb.subscribe("acme", starter)

    # Month 1: a burst beyond the allowance, covered by a top-up pack.
    sb.use("acme", "credits", 9_000)
    sb.post("/v1/packs/boost_5k/purchase", {"end_user_id": "acme", "pay_with": "external"}, 201)
    used = sb.use("acme", "credits", 3_000)  # 1,000 from the plan, then 2,000 from the pack
    assert [(e["amount"]) for e in used["entries"]] == [1_000, 2_000]
    assert sb.balance("acme", "credits")["balance"] == 3_000

    # Month 2: a fresh 10,000; nothing of the plan was left to roll over; the pack remains.
    sb.advance(to=sub["current_period_end"])
    assert sb.balance("acme", "credits")["balance"] == 13_000
    sb.use("acme", "credits", 4_000)

    # Month 3: 6,000 unused, 5,000 of it rolls over (the cap).
    sb.advance(to=sb.live("acme")["current_period_end"])
    assert sb.balance("acme", "credits")["balance"] == 10_000 + 5_000 + 3_000

    # Upgrade mid-month: Growth's 50,000 replace Starter's 10,000, less the 2,000 used this month.
    sb.use("acme", "credits", 2_000)  # from the plan block: it expires first; rollover never does
    changed = sb.post(f"/v1/subscriptions/{sub['id']}/change", {"plan_variant_id": growth})
    assert changed["plan_variant_id"] == growth
    assert sb.balance("acme", "credits")["balance"] == 48_000 + 5_000 + 3_000


def test_pattern_2_flat_price_with_a_quota_that_resets_every_five_hours(sb: Sandbox) -> None:
    sb.post("/v1/features", {"key": "messages", "unit": "message"}, 201)
    sb.plan("free", [{"feature_key": "messages", "amount": 10, "reset": {"every": 1, "unit": "day"}}], default=True)
    plus = sb.plan("plus", [{"feature_key": "messages", "amount": 40, "reset": {"every": 5, "unit": "hour"}}])

    # A new end user is on the free plan from the first check.
    first = sb.check("zoe", "messages")
    assert (first["allowed"], first["balance"]) == (True, 10)
    sub = sb.subscribe("zoe", plus)
    assert sb.check("zoe", "messages")["balance"] == 40

    for _ in range(40):
        sb.use("zoe", "messages", 1)
    refused = sb.check("zoe", "messages")
    assert (refused["allowed"], refused["reason"]) == (False, "insufficient_balance")
    sb.use("zoe", "messages", 1, status=402)

    sb.advance(seconds=5 * HOUR)
    assert sb.check("zoe", "messages")["balance"] == 40
    sb.advance(seconds=DAY)  # idle for a day: no hoarding
    assert sb.check("zoe", "messages")["balance"] == 40

    # Canceled at period end: back on the free plan's 10 a day after that.
    sb.post(f"/v1/subscriptions/{sub['id']}/cancel", {"at": "period_end"})
    sb.advance(to=sub["current_period_end"])
    assert sb.live("zoe")["default_plan"] is True
    assert sb.check("zoe", "messages")["balance"] == 10


def test_pattern_4_generation_credits_reserved_before_and_committed_after(sb: Sandbox) -> None:
    sb.post("/v1/features", {"key": "gen_credits"}, 201)
    sb.post("/v1/features", {"key": "image", "credit_pool": "gen_credits", "credits_per_unit": 4}, 201)
    sb.post("/v1/features", {"key": "video", "credit_pool": "gen_credits", "credits_per_unit": 25}, 201)
    weekly = sb.plan("creator", [{"feature_key": "gen_credits", "amount": 100}], period={"every": 1, "unit": "week"})
    sub = sb.subscribe("ivy", weekly)

    # An image succeeds: reserve 4, commit 4.
    image = sb.post("/v1/reservations", {"end_user_id": "ivy", "feature_key": "image", "units": 1}, 201)
    assert (image["amount"], image["balance"]) == (4, 96)
    assert sb.post(f"/v1/reservations/{image['id']}/commit", {"units": 1})["committed_amount"] == 4
    # A video fails: reserve 50 (two clips), release, nothing charged.
    video = sb.post("/v1/reservations", {"end_user_id": "ivy", "feature_key": "video", "units": 2}, 201)
    assert sb.check("ivy", "gen_credits")["balance"] == 46
    assert sb.post(f"/v1/reservations/{video['id']}/release")["status"] == "released"
    assert sb.balance("ivy", "gen_credits")["balance"] == 96
    # Four clips do not fit: refused, nothing held.
    sb.post("/v1/reservations", {"end_user_id": "ivy", "feature_key": "video", "units": 4}, 402)
    # Next week: a fresh 100, the unused 96 expired.
    sb.advance(to=sub["current_period_end"])
    assert sb.balance("ivy", "gen_credits")["balance"] == 100


def test_pattern_5_agents_sold_by_outcome_with_long_held_reservations(sb: Sandbox) -> None:
    sb.post("/v1/features", {"key": "outcomes", "precision": 2}, 201)
    retainer = sb.plan("retainer", [{"feature_key": "outcomes", "amount": "1000.00"}])
    sb.subscribe("orbit", retainer)

    # A multi-step agent run holds 300 for up to a week and charges step by step.
    run = sb.post("/v1/reservations", {"end_user_id": "orbit", "feature_key": "outcomes", "units": 300,
                                       "ttl_seconds": 7 * DAY}, 201)
    for step in ("12.50", "40.25", "7.25"):
        partial = sb.post(f"/v1/reservations/{run['id']}/commit", {"units": step, "final": False})
        assert partial["status"] == "held"
    assert partial["held"] == 240 and partial["committed_amount"] == 60
    done = sb.post(f"/v1/reservations/{run['id']}/commit", {"units": "15.10"})
    assert (done["status"], done["committed_amount"]) == ("committed", 75.1)
    assert sb.balance("orbit", "outcomes")["balance"] == 924.9

    # No outcome, no charge: the run is released.
    failed = sb.post("/v1/reservations", {"end_user_id": "orbit", "feature_key": "outcomes", "units": 200}, 201)
    sb.post(f"/v1/reservations/{failed['id']}/release")
    # An abandoned run: its hold lapses after the TTL, with nobody calling.
    abandoned = sb.post("/v1/reservations", {"end_user_id": "orbit", "feature_key": "outcomes", "units": 500,
                                             "ttl_seconds": 2 * DAY}, 201)
    assert sb.check("orbit", "outcomes")["balance"] == 424.9
    sb.advance(seconds=2 * DAY)
    assert sb.check("orbit", "outcomes")["balance"] == 924.9
    assert sb.get(f"/v1/reservations/{abandoned['id']}")["status"] == "expired"
    late = sb.http.post(f"/v1/reservations/{abandoned['id']}/commit", json={"units": 1})
    assert late.status_code == 409 and late.json()["error"]["code"] == "invalid_state"
    events = [e["data"]["reservation_id"] for e in sb.get("/v1/events", type="reservation.expired")["data"]]
    assert events == [abandoned["id"]]
