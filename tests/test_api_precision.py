"""Exact amounts through HTTP: no float ever, no silent rounding, computed amounts rounded once."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from .conftest import Api, Reply, assert_conserved, assert_error, balance_of, feature, grant, ledger, use


def raw(api: Api, path: str, text: str) -> Reply:
    """POST a body written by hand, so JSON numbers reach the server as the client typed them."""
    return api.call("POST", path, content=text.encode())


def number_tokens(text: str) -> list[str]:
    """Every non-integer JSON number in ``text``, exactly as written."""
    found: list[str] = []

    def keep(token: str) -> Decimal:
        found.append(token)
        return Decimal(token)

    json.loads(text, parse_float=keep)
    return found


def assert_plain_numbers(reply: Reply) -> None:
    for token in number_tokens(reply.text):
        assert "e" not in token.lower(), token
        assert token == format(Decimal(token).normalize(), "f"), token  # no trailing zeros, no 0.30000000000000004


def test_a_tenth_plus_two_tenths_is_exactly_three_tenths(api: Api) -> None:
    feature(api, "credits", precision=2)
    for amount in ("0.1", "0.2"):  # JSON numbers, which a float parser would not keep exact
        reply = raw(api, "/v1/grants", f'{{"end_user_id": "u1", "feature_key": "credits", "amount": {amount}}}')
        assert reply.status == 201 and f'"original_amount":{amount},' in reply.text
    balances = api.get("/v1/balances/u1", feature_key="credits")
    assert '"balance":0.3,' in balances.text
    assert balances.body["data"][0]["balance"] == Decimal("0.3")
    check = api.get("/v1/entitlements/check", end_user_id="u1", feature_key="credits", units="0.3")
    assert '"allowed":true,"balance":0.3,' in check.text
    assert_plain_numbers(balances)
    assert_plain_numbers(check)
    usage = use(api, "u1", "credits", "0.3")
    assert usage.status == 201 and '"balance":0,' in usage.text
    assert assert_conserved(api, "u1", "credits") == 0


def test_more_decimals_than_the_precision_are_refused_not_rounded(api: Api) -> None:
    feature(api, "credits", precision=2)
    body = '{"end_user_id": "u1", "feature_key": "credits", "amount": 17.9699999}'
    error = assert_error(raw(api, "/v1/grants", body), 400, "invalid_amount", "amount")
    assert error["message"] == "amount has more than 2 decimal places"
    assert_error(api.post("/v1/grants", {"end_user_id": "u1", "feature_key": "credits", "amount": "17.9699999"}),
                 400, "invalid_amount", "amount")
    assert grant(api, "u1", "credits", "17.9700000")["original_amount"] == Decimal("17.97")
    assert_error(use(api, "u1", "credits", "0.001"), 400, "invalid_amount", "units")
    assert [e["amount"] for e in ledger(api)] == [Decimal("17.97")]


def test_half_a_cent_per_unit_charges_exactly_one_cent(api: Api) -> None:
    feature(api, "ai_credits", precision=2)
    feature(api, "image_generation", credit_pool="ai_credits", credits_per_unit="0.005")
    grant(api, "u1", "ai_credits", 1)
    check = api.ok("GET", "/v1/entitlements/check", params={"end_user_id": "u1", "feature_key": "image_generation"})
    assert (check["amount"], check["balance"]) == (Decimal("0.01"), 1)
    one = use(api, "u1", "image_generation", 1)
    assert '"amount":0.01,' in one.text and '"balance":0.99,' in one.text
    [entry] = ledger(api, usage_id=one.body["id"])
    assert (entry["feature_key"], entry["amount"], entry["balance_after"]) == (
        "ai_credits", Decimal("0.01"), Decimal("0.99"))
    three = use(api, "u1", "image_generation", 3).body  # 0.015 rounds half away from zero to 0.02
    assert (three["amount"], three["balance"]) == (Decimal("0.02"), Decimal("0.97"))
    assert assert_conserved(api, "u1", "ai_credits") == Decimal("0.97")


def test_a_computed_amount_is_rounded_once_from_the_exact_product(api: Api) -> None:
    # 549450.549450550 × 999999.999999909 = 549450549450.4999…: rounding the product to 28 digits
    # first (the default Decimal context) made it …450.5 and then …451.
    feature(api, "pool")
    feature(api, "steps", precision=9, credit_pool="pool", credits_per_unit="999999.999999909")
    grant(api, "u1", "pool", 549450549451)
    check = api.ok("GET", "/v1/entitlements/check", params={
        "end_user_id": "u1", "feature_key": "steps", "units": "549450.549450550"})
    assert check["amount"] == 549450549450
    usage = use(api, "u1", "steps", "549450.54945055").body
    assert (usage["amount"], usage["balance"]) == (549450549450, 1)
    assert assert_conserved(api, "u1", "pool") == 1


def test_a_computed_amount_out_of_range_is_invalid_amount(api: Api) -> None:
    feature(api, "pool", precision=9)
    feature(api, "steps", credit_pool="pool", credits_per_unit="999999.999999999")
    grant(api, "u1", "pool", 1)
    error = assert_error(use(api, "u1", "steps", 10**15), 400, "invalid_amount", "units")
    assert error["message"] == "units × credits_per_unit is out of range"
    assert_error(api.get("/v1/entitlements/check", end_user_id="u1", feature_key="steps", units=10**15),
                 400, "invalid_amount", "units")


def test_extreme_amounts_are_written_in_plain_notation(api: Api) -> None:
    feature(api, "big")
    feature(api, "tiny", precision=9)
    big = api.post("/v1/grants", {"end_user_id": "u1", "feature_key": "big", "amount": "1E+15"})
    assert '"original_amount":1000000000000000,' in big.text
    tiny = api.post("/v1/grants", {"end_user_id": "u1", "feature_key": "tiny", "amount": "1E-9"})
    assert '"original_amount":0.000000001,' in tiny.text
    balances = api.get("/v1/balances/u1")
    assert [(d["feature_key"], d["balance"]) for d in balances.body["data"]] == [
        ("big", 10**15), ("tiny", Decimal("0.000000001"))]
    assert_plain_numbers(balances)
    assert_plain_numbers(api.get("/v1/ledger"))
    assert balance_of(api, "u1", "tiny") == (Decimal("0.000000001"), 0)


def test_amounts_may_be_sent_as_strings_or_numbers_with_trailing_zeros(api: Api) -> None:
    feature(api, "credits", precision=2)
    as_string: Any = grant(api, "u1", "credits", "12.50")
    as_number = raw(api, "/v1/grants", '{"end_user_id": "u1", "feature_key": "credits", "amount": 12.50}')
    assert as_string["original_amount"] == as_number.body["original_amount"] == Decimal("12.5")
    assert '"original_amount":12.5,' in as_number.text
    assert assert_conserved(api, "u1", "credits") == 25
