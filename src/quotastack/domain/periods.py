"""Calendar-correct periods and windows.

Instants are ``int`` microseconds since the Unix epoch, UTC (names end in ``_us``). A period of
``every`` × ``unit`` is anchored at an instant and counted from that anchor:

- ``minute`` and ``hour`` are elapsed time: the n-th boundary is ``anchor + n × length``.
- ``day`` and ``week`` are wall-clock days in the subscription's time zone, so a day across a
  DST change lasts 23 or 25 hours and a window that starts at local midnight always ends at
  local midnight.
- ``month`` and ``year`` count months from the original anchor and clamp the day to the end of
  the month: from Jan 31 the boundaries are Feb 28 (29), Mar 31, Apr 30, …, never drifting.
"""

from __future__ import annotations

import calendar
from functools import lru_cache
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import InvalidRequest

UNITS = ("minute", "hour", "day", "week", "month", "year")
US_PER_SECOND = 1_000_000
_ELAPSED_US = {"minute": 60 * US_PER_SECOND, "hour": 3600 * US_PER_SECOND}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# A duration may not exceed 100 years in total; anything longer is a typo.
_MAX_EVERY = {"minute": 52_560_000, "hour": 876_000, "day": 36_500, "week": 5_200, "month": 1_200,
              "year": 100}


@dataclass(frozen=True, slots=True)
class Duration:
    every: int
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise InvalidRequest(f"unit must be one of {', '.join(UNITS)}", "unit")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise InvalidRequest("every must be a positive integer", "every")
        if self.every > _MAX_EVERY[self.unit]:
            raise InvalidRequest("duration is longer than 100 years", "every")

    def as_dict(self) -> dict[str, object]:
        return {"every": self.every, "unit": self.unit}

    @classmethod
    def from_dict(cls, data: dict[str, object] | None) -> "Duration | None":
        if data is None:
            return None
        return cls(int(data["every"]), str(data["unit"]))  # type: ignore[call-overload]


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``, or InvalidRequest."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise InvalidRequest(f"unknown time zone {name!r}", "timezone") from None


def to_datetime(instant_us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=instant_us)


def to_us(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("naive datetime")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * US_PER_SECOND + delta.microseconds


@lru_cache(maxsize=65_536)
def format_rfc3339(instant_us: int) -> str:
    """``2026-12-03T17:00:00Z``, with fractional seconds only when there are some."""
    moment = to_datetime(instant_us)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_rfc3339(text: str, param: str) -> int:
    """An RFC 3339 timestamp with any offset, as instant microseconds."""
    if not isinstance(text, str) or "T" not in text.upper():
        raise InvalidRequest(f"{param} must be an RFC 3339 timestamp", param)
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InvalidRequest(f"{param} must be an RFC 3339 timestamp", param) from None
    if moment.tzinfo is None:
        raise InvalidRequest(f"{param} needs a UTC offset or Z", param)
    return to_us(moment)


def _local_to_us(naive: datetime, tz: ZoneInfo) -> int:
    """A wall-clock time in ``tz`` as an instant.

    With ``fold=0`` an ambiguous time (fall back) is its first occurrence, and a time skipped by
    spring-forward is read with the offset before the gap, which lands the same distance past
    the gap (02:30 on a 02:00 -> 03:00 night becomes 03:30).
    """
    return to_us(naive.replace(tzinfo=tz, fold=0).astimezone(timezone.utc))


def _add_months(local: datetime, months: int) -> datetime:
    total = local.year * 12 + (local.month - 1) + months
    year, month0 = divmod(total, 12)
    day = min(local.day, calendar.monthrange(year, month0 + 1)[1])
    return local.replace(year=year, month=month0 + 1, day=day)


def boundary(anchor_us: int, duration: Duration, n: int, tz: ZoneInfo) -> int:
    """The n-th boundary after ``anchor_us`` (boundary 0 is the anchor itself)."""
    if duration.unit in _ELAPSED_US:
        return anchor_us + n * duration.every * _ELAPSED_US[duration.unit]
    local = to_datetime(anchor_us).astimezone(tz).replace(tzinfo=None)
    if duration.unit == "day":
        target = local + timedelta(days=n * duration.every)
    elif duration.unit == "week":
        target = local + timedelta(days=7 * n * duration.every)
    elif duration.unit == "month":
        target = _add_months(local, n * duration.every)
    else:
        target = _add_months(local, 12 * n * duration.every)
    return _local_to_us(target, tz)


def window_index(anchor_us: int, duration: Duration, at_us: int, tz: ZoneInfo) -> int:
    """The n with ``boundary(n) <= at_us < boundary(n + 1)`` (negative before the anchor)."""
    if duration.unit in _ELAPSED_US:
        return (at_us - anchor_us) // (duration.every * _ELAPSED_US[duration.unit])
    # Estimate from the mean length, then step to the exact window.
    mean_us = {"day": 86_400, "week": 604_800, "month": 2_629_746, "year": 31_556_952}[
        duration.unit
    ] * US_PER_SECOND * duration.every
    n = (at_us - anchor_us) // mean_us
    while boundary(anchor_us, duration, n, tz) > at_us:
        n -= 1
    while boundary(anchor_us, duration, n + 1, tz) <= at_us:
        n += 1
    return n


def window_containing(anchor_us: int, duration: Duration, at_us: int, tz: ZoneInfo) -> tuple[int, int]:
    """``(start_us, end_us)`` of the window that contains ``at_us``."""
    n = window_index(anchor_us, duration, at_us, tz)
    return boundary(anchor_us, duration, n, tz), boundary(anchor_us, duration, n + 1, tz)


def after(start_us: int, duration: Duration, tz: ZoneInfo) -> int:
    """The instant one ``duration`` after ``start_us``."""
    return boundary(start_us, duration, 1, tz)
