"""Tiered prices for usage beyond the allowance (postpaid overage).

``graduated``: each unit is priced by the tier it falls in. ``volume``: every unit is priced by
the tier that the total falls in. Tier bounds are in units; prices are exact decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class Tier:
    up_to: Decimal | None  # inclusive upper bound in units; None = no bound
    unit_price: Decimal


def price(mode: str, tiers: list[Tier], units: Decimal) -> tuple[Decimal, list[dict[str, Decimal | None]]]:
    """Total price of ``units`` and the amount by tier."""
    rows: list[dict[str, Decimal | None]] = []
    if mode == "volume":
        for tier in tiers:
            if tier.up_to is None or units <= tier.up_to:
                amount = units * tier.unit_price
                rows.append({"up_to": tier.up_to, "units": units, "unit_price": tier.unit_price,
                             "amount": amount})
                return amount, rows
        raise AssertionError("the last tier is unbounded")
    total = Decimal(0)
    floor = Decimal(0)
    for tier in tiers:
        if units <= floor:
            break
        top = units if tier.up_to is None else min(units, tier.up_to)
        in_tier = top - floor
        amount = in_tier * tier.unit_price
        rows.append({"up_to": tier.up_to, "units": in_tier, "unit_price": tier.unit_price,
                     "amount": amount})
        total += amount
        if tier.up_to is None:
            break
        floor = tier.up_to
    return total, rows
