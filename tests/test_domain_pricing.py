"""Tiered overage prices, with exact decimals."""

from decimal import Decimal as D

from quotastack.domain.pricing import Tier, price

TIERS = [Tier(D(1_000_000), D("0.000002")), Tier(None, D("0.000001"))]


def test_graduated_prices_each_unit_by_its_own_tier() -> None:
    total, rows = price("graduated", TIERS, D(1_500_000))
    assert total == D("2.5")  # 1,000,000 x 0.000002 + 500,000 x 0.000001
    assert [r["units"] for r in rows] == [D(1_000_000), D(500_000)]


def test_volume_prices_every_unit_by_the_tier_of_the_total() -> None:
    total, rows = price("volume", TIERS, D(1_500_000))
    assert total == D("1.5")
    assert len(rows) == 1


def test_usage_inside_the_first_tier() -> None:
    assert price("graduated", TIERS, D(10))[0] == D("0.00002")
    assert price("volume", TIERS, D(1_000_000))[0] == D("2")


def test_no_usage_costs_nothing() -> None:
    assert price("graduated", TIERS, D(0)) == (D(0), [])
