"""Reservations (reserve, commit, release, extend, expiry) and refunds."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from .conftest import (Api, assert_conserved, assert_error, balance_of, feature, grant, instant, ledger, shifted,
                       subscribe, use, variant)


def reserve(api: Api, units: Any, end_user_id: str = "u1", feature_key: str = "credits", **fields: Any) -> Any:
    return api.post("/v1/reservations", {"end_user_id": end_user_id, "feature_key": feature_key, "units": units,
                                         **fields})


def funded(api: Api, amount: Any = 10, precision: int = 2) -> dict[str, Any]:
    feature(api, "credits", precision=precision)
    return grant(api, "u1", "credits", amount)


def test_a_reservation_moves_credits_from_balance_to_reserved(api: Api) -> None:
    block = funded(api)
    reply = reserve(api, "2.5", metadata={"run": "r1"})
    assert reply.status == 201
    rsv = reply.body
    assert rsv["id"].startswith("rsv_")
    assert {k: rsv[k] for k in ("object", "status", "units", "amount", "held", "committed_amount", "balance",
                                "ended_at", "metadata")} == {
        "object": "reservation", "status": "held", "units": Decimal("2.5"), "amount": Decimal("2.5"),
        "held": Decimal("2.5"), "committed_amount": 0, "balance": Decimal("7.5"), "ended_at": None,
        "metadata": {"run": "r1"}}
    assert rsv["expires_at"] == shifted(rsv["created_at"], seconds=900)
    [entry] = rsv["entries"]
    assert (entry["type"], entry["block_id"], entry["amount"], entry["balance_after"], entry["reserved_after"]) == (
        "reserve", block["id"], Decimal("2.5"), Decimal("7.5"), Decimal("2.5"))
    assert balance_of(api, "u1", "credits") == (Decimal("7.5"), Decimal("2.5"))
    check = api.ok("GET", "/v1/entitlements/check", params={"end_user_id": "u1", "feature_key": "credits",
                                                            "units": "7.51"})
    assert (check["allowed"], check["balance"]) == (False, Decimal("7.5"))
    assert api.ok("GET", f"/v1/reservations/{rsv['id']}") == {
        k: v for k, v in rsv.items() if k not in ("balance", "entries")}
    assert assert_conserved(api, "u1", "credits") == Decimal("7.5")


def test_a_reservation_beyond_the_balance_is_402_and_holds_nothing(api: Api) -> None:
    funded(api)
    entries = ledger(api)
    assert_error(reserve(api, "10.01"), 402, "insufficient_balance", "units")
    assert ledger(api) == entries
    assert api.ok("GET", "/v1/reservations")["data"] == []
    assert balance_of(api, "u1", "credits") == (10, 0)


def test_a_final_commit_charges_the_cost_and_releases_the_rest(api: Api) -> None:
    funded(api)
    rsv = reserve(api, 4).body
    done = api.ok("POST", f"/v1/reservations/{rsv['id']}/commit", {"units": "1.25"})
    assert (done["status"], done["held"], done["committed_amount"], done["balance"]) == (
        "committed", 0, Decimal("1.25"), Decimal("8.75"))
    assert done["ended_at"] is not None and done["usage_id"].startswith("use_")
    assert [(e["type"], e["amount"], e["reason"]) for e in done["entries"]] == [
        ("commit", Decimal("1.25"), None), ("release", Decimal("2.75"), "rest of a final commit")]
    assert [e["type"] for e in ledger(api, reservation_id=rsv["id"])] == ["release", "commit", "reserve"]
    assert api.ok("GET", f"/v1/usage/{done['usage_id']}")["amount"] == Decimal("1.25")
    assert assert_conserved(api, "u1", "credits") == Decimal("8.75")


def test_partial_commits_keep_the_rest_held(api: Api) -> None:
    funded(api)
    rsv = reserve(api, 4).body
    step = api.ok("POST", f"/v1/reservations/{rsv['id']}/commit", {"units": 1, "final": False})
    assert (step["status"], step["held"], step["committed_amount"], step["balance"]) == ("held", 3, 1, 6)
    assert balance_of(api, "u1", "credits") == (6, 3)
    assert assert_conserved(api, "u1", "credits") == 6
    last = api.ok("POST", f"/v1/reservations/{rsv['id']}/commit", {"units": 2})
    assert (last["status"], last["held"], last["committed_amount"], last["balance"]) == ("committed", 0, 3, 7)
    assert assert_conserved(api, "u1", "credits") == 7


def test_committing_more_than_is_held_draws_the_free_balance_or_is_402(api: Api) -> None:
    funded(api)
    rsv = reserve(api, 2).body
    entries = ledger(api)
    assert_error(api.post(f"/v1/reservations/{rsv['id']}/commit", {"units": "10.01"}), 402, "insufficient_balance",
                 "units")
    assert ledger(api) == entries
    assert api.ok("GET", f"/v1/reservations/{rsv['id']}")["status"] == "held"
    done = api.ok("POST", f"/v1/reservations/{rsv['id']}/commit", {"units": 5})
    assert (done["committed_amount"], done["balance"]) == (5, 5)
    assert sorted((e["type"], e["amount"]) for e in done["entries"]) == [("commit", 2), ("use", 3)]
    assert assert_conserved(api, "u1", "credits") == 5


def test_release_gives_everything_back_and_ends_the_reservation(api: Api) -> None:
    funded(api)
    rsv = reserve(api, 4).body
    released = api.ok("POST", f"/v1/reservations/{rsv['id']}/release")
    assert (released["status"], released["held"], released["balance"]) == ("released", 0, 10)
    assert [(e["type"], e["amount"], e["reason"]) for e in released["entries"]] == [("release", 4, "released")]
    for action, body in (("commit", {"units": 1}), ("release", None), ("extend", {"ttl_seconds": 60})):
        assert_error(api.post(f"/v1/reservations/{rsv['id']}/{action}", body), 409, "invalid_state")
    assert assert_conserved(api, "u1", "credits") == 10


def test_extend_moves_expires_at_and_expiry_releases_what_is_held(api: Api) -> None:
    funded(api)
    rsv = reserve(api, 4, ttl_seconds=60).body
    extended = api.ok("POST", f"/v1/reservations/{rsv['id']}/extend", {"ttl_seconds": 120})
    now = api.ok("GET", "/v1/test_clock")["now"]
    assert instant(rsv["created_at"]) < instant(extended["expires_at"]) - timedelta(seconds=120) < instant(now)
    api.ok("POST", "/v1/test_clock/advance", {"seconds": 100})
    assert api.ok("GET", f"/v1/reservations/{rsv['id']}")["status"] == "held"
    api.ok("POST", "/v1/test_clock/advance", {"seconds": 60})
    # Reads see the expiry from its instant, whether or not anything has run since.
    expired = api.ok("GET", f"/v1/reservations/{rsv['id']}")
    assert (expired["status"], expired["held"], expired["ended_at"]) == ("expired", 0, extended["expires_at"])
    check = api.ok("GET", "/v1/entitlements/check", params={"end_user_id": "u1", "feature_key": "credits"})
    assert check["balance"] == 10
    assert balance_of(api, "u1", "credits") == (10, 0)
    [release] = ledger(api, type="release")
    assert (release["amount"], release["created_at"], release["reason"]) == (4, extended["expires_at"],
                                                                          "reservation expired")
    assert [e["type"] for e in api.ok("GET", "/v1/events", params={"type": "reservation.expired"})["data"]] == [
        "reservation.expired"]
    assert_error(api.post(f"/v1/reservations/{rsv['id']}/commit", {"units": 1}), 409, "invalid_state")
    assert assert_conserved(api, "u1", "credits") == 10


def test_list_reservations_by_end_user_and_status(api: Api) -> None:
    funded(api)
    grant(api, "u2", "credits", 5)
    first = reserve(api, 1).body
    second = reserve(api, 1).body
    other = reserve(api, 1, end_user_id="u2").body
    api.ok("POST", f"/v1/reservations/{first['id']}/release")
    assert [r["id"] for r in api.ok("GET", "/v1/reservations")["data"]] == [other["id"], second["id"], first["id"]]
    assert [r["id"] for r in api.ok("GET", "/v1/reservations", params={"end_user_id": "u1"})["data"]] == [
        second["id"], first["id"]]
    assert [r["id"] for r in api.ok("GET", "/v1/reservations", params={"status": "released"})["data"]] == [
        first["id"]]
    page = api.ok("GET", "/v1/reservations", params={"limit": 1})
    assert (page["has_more"], page["next_cursor"]) == (True, other["id"])


def test_invalid_reservations_are_refused(api: Api) -> None:
    funded(api)
    feature(api, "sso", type="boolean")
    assert_error(reserve(api, 1, feature_key="nothing"), 404, "not_found", "feature_key")
    assert_error(reserve(api, 1, feature_key="sso"), 400, "invalid_request", "feature_key")
    assert_error(reserve(api, "0.001"), 400, "invalid_amount", "units")
    assert_error(reserve(api, 1, ttl_seconds=0), 400, "invalid_request", "ttl_seconds")
    assert_error(reserve(api, 1, ttl_seconds=604_801), 400, "invalid_request", "ttl_seconds")
    assert_error(api.post("/v1/reservations/rsv_nothing/commit", {"units": 1}), 404, "not_found")
    assert_error(api.post("/v1/reservations/rsv_nothing/release"), 404, "not_found")
    assert_error(api.get("/v1/reservations/rsv_nothing"), 404, "not_found")
    assert ledger(api, type="reserve") == []


# ---- refunds ------------------------------------------------------------------------------------------

def test_a_refund_gives_a_usage_back_to_its_blocks(api: Api) -> None:
    feature(api, "credits")
    first = grant(api, "u1", "credits", 3, priority=1)
    second = grant(api, "u1", "credits", 10, priority=2)
    usage = use(api, "u1", "credits", 8).body
    partial = api.ok("POST", "/v1/refunds", {"usage_id": usage["id"], "amount": 4}, 201)
    assert partial["id"].startswith("rfd_")
    assert (partial["requested"], partial["amount"], partial["skipped"], partial["balance"]) == (4, 4, [], 9)
    assert [(e["type"], e["block_id"], e["amount"]) for e in partial["entries"]] == [
        ("refund", first["id"], 3), ("refund", second["id"], 1)]
    assert_error(api.post("/v1/refunds", {"usage_id": usage["id"], "amount": 5}), 400, "invalid_amount", "amount")
    rest = api.ok("POST", "/v1/refunds", {"usage_id": usage["id"]}, 201)
    assert (rest["amount"], rest["balance"]) == (4, 13)
    assert_error(api.post("/v1/refunds", {"usage_id": usage["id"]}), 400, "invalid_amount", "amount")
    assert assert_conserved(api, "u1", "credits") == 13


def test_a_refund_skips_a_block_that_has_expired_since(api: Api) -> None:
    feature(api, "credits")
    short = grant(api, "u1", "credits", 5, expires_after={"every": 1, "unit": "hour"})
    grant(api, "u1", "credits", 5)
    usage = use(api, "u1", "credits", 7).body
    api.ok("POST", "/v1/test_clock/advance", {"seconds": 7200})
    refund = api.ok("POST", "/v1/refunds", {"usage_id": usage["id"]}, 201)
    assert (refund["requested"], refund["amount"]) == (7, 2)
    assert refund["skipped"] == [{"block_id": short["id"], "amount": 5, "reason": "block expired"}]
    assert assert_conserved(api, "u1", "credits") == 5


def test_a_committed_reservation_can_be_refunded(api: Api) -> None:
    funded(api)
    rsv = reserve(api, 4).body
    api.ok("POST", f"/v1/reservations/{rsv['id']}/commit", {"units": 3})
    refund = api.ok("POST", "/v1/refunds", {"reservation_id": rsv["id"]}, 201)
    assert (refund["reservation_id"], refund["amount"], refund["balance"]) == (rsv["id"], 3, 10)
    assert assert_conserved(api, "u1", "credits") == 10


def test_a_refund_names_exactly_one_existing_charge(api: Api) -> None:
    funded(api)
    usage = use(api, "u1", "credits", 1).body
    assert_error(api.post("/v1/refunds", {}), 400, "invalid_request", "usage_id")
    assert_error(api.post("/v1/refunds", {"usage_id": usage["id"], "reservation_id": "rsv_x"}),
                 400, "invalid_request", "usage_id")
    assert_error(api.post("/v1/refunds", {"usage_id": "use_nothing"}), 404, "not_found", "usage_id")
    assert_error(api.post("/v1/refunds", {"reservation_id": "rsv_nothing"}), 404, "not_found", "reservation_id")
    assert_error(api.post("/v1/refunds", {"usage_id": usage["id"], "amount": "0.001"}), 400, "invalid_amount",
                 "amount")
    assert ledger(api, type="refund") == []


def test_reservations_of_a_credit_pool_feature_hold_pool_credits(api: Api) -> None:
    feature(api, "ai_credits", precision=2)
    feature(api, "image_generation", credit_pool="ai_credits", credits_per_unit="2.5")
    subscribe(api, "u1", variant(api, [{"feature_key": "ai_credits", "amount": 20}])["id"])
    rsv = reserve(api, 4, feature_key="image_generation").body
    assert (rsv["charged_feature_key"], rsv["units"], rsv["amount"], rsv["balance"]) == ("ai_credits", 4, 10, 10)
    done = api.ok("POST", f"/v1/reservations/{rsv['id']}/commit", {"units": 1})
    assert (done["committed_amount"], done["balance"]) == (Decimal("2.5"), Decimal("17.5"))
    assert assert_conserved(api, "u1", "ai_credits") == Decimal("17.5")


def test_the_balance_at_a_past_moment_shows_what_was_reserved_then(api: Api) -> None:
    # Regression: a past ?at= always reported reserved 0.
    funded(api)
    rsv = reserve(api, 4).body
    api.ok("POST", "/v1/test_clock/advance", {"seconds": 60})
    api.ok("POST", f"/v1/reservations/{rsv['id']}/release")
    then = api.ok("GET", "/v1/balances/u1", params={"feature_key": "credits",
                                                    "at": shifted(rsv["created_at"], seconds=30)})["data"]
    assert [(d["balance"], d["reserved"]) for d in then] == [(6, 4)]
    assert balance_of(api, "u1", "credits") == (10, 0)
    assert assert_conserved(api, "u1", "credits") == 10
