"""Exact amounts.

Inside QuotaStack every amount is an ``int`` in minor units of its feature: with ``precision``
p, the amount 12.5 at p=2 is stored as 1250. Decimals exist only at the edges (parsing requests,
writing responses). Nothing here ever touches a float.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation, localcontext

from .errors import InvalidAmount

MAX_PRECISION = 9
# One amount is at most 10**15 minor units, so that sums of many amounts stay far inside a
# signed 64-bit integer (the database column type) and any amount has at most 15 significant
# digits.
MAX_MINOR = 10**15


def to_decimal(value: object, param: str) -> Decimal:
    """Read a request value (int, Decimal or decimal string) as a finite Decimal."""
    if isinstance(value, bool):
        raise InvalidAmount(f"{param} must be a number", param)
    if isinstance(value, float):
        # JSON bodies are parsed with Decimal for non-integers, so a float here is a caller bug.
        raise InvalidAmount(f"{param} must be an exact decimal", param)
    try:
        number = Decimal(value) if isinstance(value, (int, str, Decimal)) else None
    except (InvalidOperation, ValueError):
        number = None
    if number is None or not number.is_finite():
        raise InvalidAmount(f"{param} must be a decimal number", param)
    return number


def to_minor(value: object, precision: int, param: str, *, allow_zero: bool = False) -> int:
    """Convert a request amount to minor units, refusing rather than rounding.

    Raises InvalidAmount when the amount is not positive (or negative, with ``allow_zero``),
    has more decimal places than ``precision``, or exceeds ``MAX_MINOR``.
    """
    if type(value) is str and value.isdecimal() and value.isascii() and len(value) <= 16:
        # Plain digits, the usual ``units=1``: no Decimal needed.
        whole = int(value) * 10**precision
        if 0 < whole <= MAX_MINOR or (whole == 0 and allow_zero):
            return whole
    number = to_decimal(value, param)
    if number < 0 or (number == 0 and not allow_zero):
        raise InvalidAmount(f"{param} must be {'zero or ' if allow_zero else ''}positive", param)
    if number == 0:
        return 0
    # Integer arithmetic on the digits, not Decimal arithmetic: that rounds to the context's
    # 28 digits (1.00000000000000000000000000001 would pass as 1) and overflows or underflows
    # on extreme exponents (1e999999999, 1e-999999999).
    if number.adjusted() > 15:  # at least 10**16, beyond MAX_MINOR at any precision
        raise InvalidAmount(f"{param} is out of range", param)
    _, digits, exponent = number.as_tuple()
    significant = "".join(map(str, digits)).rstrip("0")
    exponent += len(digits) - len(significant)  # number == int(significant) * 10**exponent
    assert isinstance(exponent, int)
    if exponent + precision < 0:
        raise InvalidAmount(
            f"{param} has more than {precision} decimal place{'s' if precision != 1 else ''}", param
        )
    minor = int(significant) * 10 ** (exponent + precision)
    if minor > MAX_MINOR:
        raise InvalidAmount(f"{param} is out of range", param)
    return minor


def from_minor(minor: int, precision: int) -> Decimal:
    """The Decimal for an amount in minor units, without trailing zeros or exponent."""
    value = Decimal(minor).scaleb(-precision)
    if value == value.to_integral_value():
        return Decimal(int(value))
    return value.normalize()


def scale_round(units_minor: int, units_precision: int, rate: Decimal, precision: int) -> int:
    """``units × rate`` in minor units of ``precision``, rounded half away from zero.

    Used where the service computes an amount itself (units of a feature that draws on a
    credit pool at ``rate`` credits per unit).
    """
    # Exact, then rounded once: units and rate have at most 16 digits each, so their product
    # fits in 40 digits, where the default 28-digit context would round it first (and then
    # round half up a value that was below the half).
    with localcontext(Context(prec=40)):
        exact = Decimal(units_minor).scaleb(-units_precision) * rate
        return int(exact.scaleb(precision).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def format_decimal(value: Decimal) -> str:
    """Plain decimal notation for JSON: ``49000``, ``12.5``, ``0.001`` (never ``1E+3``)."""
    if value == value.to_integral_value():
        return str(int(value))
    text = format(value.normalize(), "f")
    return text
