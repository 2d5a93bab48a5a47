"""Pathological input found by trying to break the service: each is a 400, never a 500."""

from __future__ import annotations

from .conftest import Api, assert_error, feature, grant, ledger


def test_integers_beyond_64_bits_are_out_of_range_not_a_crash(api: Api) -> None:
    feature(api, "credits")
    before = len(ledger(api))
    big = b'{"end_user_id": "u", "feature_key": "credits", "units": 18446744073709551616}'
    assert_error(api.call("POST", "/v1/usage", content=big), 400, "invalid_amount", "units")
    meta = b'{"end_user_id": "u", "feature_key": "credits", "amount": 1, "metadata": {"n": 18446744073709551616}}'
    assert api.call("POST", "/v1/grants", content=meta).status == 201  # metadata is the tenant's own
    clock = b'{"seconds": 100000000000000000000}'
    assert_error(api.call("POST", "/v1/test_clock/advance", content=clock), 400, "invalid_request", "seconds")
    assert len(ledger(api)) == before + 1


def test_nesting_too_deep_and_lone_surrogates_are_400(api: Api) -> None:
    feature(api, "credits")
    deep = b'{"end_user_id": "u", "feature_key": "credits", "units": 1, "metadata": ' + b'{"a": ' * 300 \
        + b'1' + b'}' * 300 + b'}'
    assert_error(api.call("POST", "/v1/usage", content=deep), 400, "invalid_request")
    lone = b'{"end_user_id": "u", "feature_key": "credits", "units": 1, "metadata": {"s": "\\ud800"}}'
    assert_error(api.call("POST", "/v1/usage", content=lone), 400, "invalid_request")


def test_nul_characters_are_refused_on_every_engine(api: Api) -> None:
    feature(api, "credits")
    body = b'{"end_user_id": "a\\u0000b", "feature_key": "credits", "amount": 1}'
    assert_error(api.call("POST", "/v1/grants", content=body), 400, "invalid_request")
    assert_error(api.get("/v1/balances/a%00b"), 400, "invalid_request")
    assert_error(api.get("/v1/entitlements/check", end_user_id="a\x00b", feature_key="credits"), 400,
                 "invalid_request")


def test_balances_take_the_same_end_user_ids_as_everything_else(api: Api) -> None:
    feature(api, "credits")
    assert_error(api.get("/v1/balances/" + "x" * 256), 400, "invalid_request", "end_user_id")
    grant(api, "team/alice", "credits", 5)
    data = api.ok("GET", "/v1/balances/team%2Falice")
    assert (data["end_user_id"], data["data"][0]["balance"]) == ("team/alice", 5)


def test_an_unknown_cursor_or_status_is_400_not_an_empty_page(api: Api) -> None:
    feature(api, "credits")
    assert_error(api.get("/v1/features", starting_after="feat_nope"), 400, "invalid_request", "starting_after")
    assert_error(api.get("/v1/reservations", status="bogus"), 400, "invalid_request", "status")
    assert_error(api.get("/v1/subscriptions", status="bogus"), 400, "invalid_request", "status")
