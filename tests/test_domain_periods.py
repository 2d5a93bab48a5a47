"""Calendar arithmetic: anchored, clamped, DST-correct."""

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotastack.domain.errors import InvalidRequest
from quotastack.domain.periods import (
    Duration, boundary, format_rfc3339, parse_rfc3339, to_us, window_containing, window_index, zone,
)

UTC = ZoneInfo("UTC")
NY = ZoneInfo("America/New_York")


def at(text: str, tz: ZoneInfo = UTC) -> int:
    return to_us(datetime.fromisoformat(text).replace(tzinfo=tz))


def iso(instant_us: int, tz: ZoneInfo = UTC) -> str:
    return datetime.fromtimestamp(instant_us / 1e6, tz).isoformat()


def test_monthly_from_jan_31_clamps_and_returns_to_the_anchor_day() -> None:
    anchor = at("2026-01-31T10:00:00")
    month = Duration(1, "month")
    assert [iso(boundary(anchor, month, n, UTC))[:10] for n in range(1, 5)] == [
        "2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31"]


def test_monthly_from_jan_30_across_a_leap_february() -> None:
    anchor = at("2028-01-30T00:00:00")
    month = Duration(1, "month")
    assert [iso(boundary(anchor, month, n, UTC))[:10] for n in range(1, 4)] == [
        "2028-02-29", "2028-03-30", "2028-04-30"]


def test_yearly_from_feb_29() -> None:
    anchor = at("2024-02-29T12:00:00")
    year = Duration(1, "year")
    assert [iso(boundary(anchor, year, n, UTC))[:10] for n in range(1, 5)] == [
        "2025-02-28", "2026-02-28", "2027-02-28", "2028-02-29"]


def test_a_week_across_the_us_spring_forward_ends_at_local_midnight() -> None:
    start = at("2026-03-05T00:00:00", NY)
    end = boundary(start, Duration(1, "week"), 1, NY)
    assert iso(end, NY) == "2026-03-12T00:00:00-04:00"  # EDT, not 01:00
    assert (end - start) == (7 * 24 - 1) * 3600 * 10**6


def test_a_month_in_kolkata_ends_at_local_midnight() -> None:
    kolkata = ZoneInfo("Asia/Kolkata")
    start = at("2026-03-01T00:00:00", kolkata)
    assert iso(boundary(start, Duration(1, "month"), 1, kolkata), kolkata) == "2026-04-01T00:00:00+05:30"


def test_five_hour_windows_are_elapsed_time_across_midnight_and_dst() -> None:
    five = Duration(5, "hour")
    anchor = at("2026-03-07T22:00:00", NY)
    ends = [boundary(anchor, five, n, NY) for n in range(1, 4)]
    assert [iso(e, NY) for e in ends] == [
        "2026-03-08T04:00:00-04:00",  # 22:00 EST + 5 h of elapsed time: the clock skipped an hour
        "2026-03-08T09:00:00-04:00",
        "2026-03-08T14:00:00-04:00",
    ]
    assert ends[0] - anchor == 5 * 3600 * 10**6


def test_a_day_across_the_fall_back_lasts_25_hours() -> None:
    start = at("2026-11-01T00:00:00", NY)
    end = boundary(start, Duration(1, "day"), 1, NY)
    assert iso(end, NY) == "2026-11-02T00:00:00-05:00"
    assert end - start == 25 * 3600 * 10**6


def test_a_wall_clock_time_skipped_by_dst_moves_forward() -> None:
    start = at("2026-03-07T02:30:00", NY)
    end = boundary(start, Duration(1, "day"), 1, NY)
    assert iso(end, NY) == "2026-03-08T03:30:00-04:00"


def test_the_window_containing_an_instant() -> None:
    anchor = at("2026-01-31T00:00:00")
    month = Duration(1, "month")
    start, end = window_containing(anchor, month, at("2026-03-15T00:00:00"), UTC)
    assert (iso(start)[:10], iso(end)[:10]) == ("2026-02-28", "2026-03-31")
    assert window_containing(anchor, month, at("2026-02-28T00:00:00"), UTC)[0] == at("2026-02-28T00:00:00")


@given(st.integers(min_value=0, max_value=400 * 86_400 * 10**6),
       st.sampled_from([Duration(5, "hour"), Duration(1, "day"), Duration(1, "week"), Duration(1, "month"),
                        Duration(3, "month"), Duration(1, "year"), Duration(90, "minute")]),
       st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata", "Europe/London", "Australia/Lord_Howe"]))
def test_every_instant_lies_in_exactly_one_window(offset_us: int, duration: Duration, tz_name: str) -> None:
    tz = ZoneInfo(tz_name)
    anchor = at("2026-01-31T00:30:00", tz)
    instant = anchor + offset_us
    n = window_index(anchor, duration, instant, tz)
    assert boundary(anchor, duration, n, tz) <= instant < boundary(anchor, duration, n + 1, tz)


def test_rfc3339_parsing_accepts_offsets_and_formatting_is_utc_z() -> None:
    assert format_rfc3339(parse_rfc3339("2026-12-03T18:00:00+01:00", "t")) == "2026-12-03T17:00:00Z"
    assert format_rfc3339(parse_rfc3339("2026-12-03T17:00:00.250Z", "t")) == "2026-12-03T17:00:00.25Z"
    for bad in ("2026-12-03", "2026-12-03T17:00:00", "yesterday", ""):
        with pytest.raises(InvalidRequest):
            parse_rfc3339(bad, "t")


def test_bad_durations_and_zones_are_refused() -> None:
    for every, unit in ((0, "day"), (1, "fortnight"), (101, "year"), (True, "day")):
        with pytest.raises(InvalidRequest):
            Duration(every, unit)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        zone("Mars/Olympus_Mons")


def test_instants_are_utc_microseconds() -> None:
    assert to_us(datetime(1970, 1, 1, 0, 0, 1, tzinfo=timezone.utc)) == 1_000_000
