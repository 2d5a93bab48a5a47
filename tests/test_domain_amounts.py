"""Exact amounts: parsing refuses rather than rounds; computed amounts round half away from zero."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotastack.domain.amounts import MAX_MINOR, format_decimal, from_minor, scale_round, to_minor
from quotastack.domain.errors import InvalidAmount


def test_a_tenth_plus_two_tenths_is_exactly_three_tenths() -> None:
    assert to_minor("0.1", 2, "amount") + to_minor(Decimal("0.2"), 2, "amount") == 30
    assert from_minor(30, 2) == Decimal("0.3")
    assert format_decimal(from_minor(30, 2)) == "0.3"


def test_excess_decimal_places_are_refused_not_rounded() -> None:
    with pytest.raises(InvalidAmount) as err:
        to_minor(Decimal("17.9699999"), 2, "amount")
    assert err.value.param == "amount"
    assert "2 decimal places" in err.value.message


def test_trailing_zeros_beyond_precision_are_fine() -> None:
    assert to_minor("12.50000", 2, "amount") == 1250
    assert to_minor(Decimal("1E+3"), 0, "amount") == 1000


@pytest.mark.parametrize("value", [0, "0", "-1", Decimal("-0.01"), "NaN", "Infinity", "abc", True, 1.5, None, [1]])
def test_non_positive_or_non_numeric_amounts_are_refused(value: object) -> None:
    with pytest.raises(InvalidAmount):
        to_minor(value, 2, "amount")


def test_zero_is_allowed_only_when_asked() -> None:
    assert to_minor(0, 0, "amount", allow_zero=True) == 0


def test_amounts_beyond_the_range_are_refused() -> None:
    assert to_minor(MAX_MINOR, 0, "amount") == MAX_MINOR
    with pytest.raises(InvalidAmount):
        to_minor(MAX_MINOR + 1, 0, "amount")
    with pytest.raises(InvalidAmount):
        to_minor("1000000.000000001", 9, "amount")


def test_a_rate_of_half_a_cent_on_one_unit_charges_one_cent() -> None:
    assert scale_round(1, 0, Decimal("0.005"), 2) == 1


def test_computed_amounts_round_half_away_from_zero() -> None:
    assert scale_round(3, 0, Decimal("0.5"), 0) == 2  # 1.5 -> 2
    assert scale_round(5, 0, Decimal("0.5"), 0) == 3  # 2.5 -> 3, not banker's 2
    assert scale_round(1, 0, Decimal("0.004"), 2) == 0
    assert scale_round(15, 1, Decimal("10"), 0) == 15  # 1.5 units x 10


def test_formatting_never_uses_exponents() -> None:
    assert format_decimal(from_minor(49000, 0)) == "49000"
    assert format_decimal(from_minor(1250, 2)) == "12.5"
    assert format_decimal(from_minor(1, 3)) == "0.001"
    assert format_decimal(from_minor(10**15, 0)) == "1000000000000000"
    assert format_decimal(from_minor(1, 9)) == "0.000000001"


@given(st.integers(min_value=1, max_value=MAX_MINOR), st.integers(min_value=0, max_value=9))
def test_minor_units_round_trip_through_their_decimal_text(minor: int, precision: int) -> None:
    text = format_decimal(from_minor(minor, precision))
    assert to_minor(text, precision, "amount") == minor
    assert "E" not in text and "e" not in text
