"""The sandbox clock: a sandbox environment's time runs ahead of real time by an offset.

Everything time-driven reads ``Ctx.now_us``, which already includes the offset, so moving the
clock moves expiry, windows and TTLs together. Live environments have no clock to move.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..domain import periods
from ..domain.errors import ForbiddenInLive, InvalidRequest
from ..domain.periods import US_PER_SECOND
from . import views
from .context import Ctx
from .ports import Tx
from .queries import settle_end_user
from .subscriptions import advance_due

MAX_ADVANCE_SECONDS = 100 * 366 * 86_400


def _sandbox_only(ctx: Ctx) -> None:
    if ctx.environment != "sandbox":
        raise ForbiddenInLive("the test clock exists only in the sandbox: use a qs_test_ key")


def get_clock(tx: Tx, ctx: Ctx) -> dict[str, Any]:
    _sandbox_only(ctx)
    env = tx.get("environments", id=ctx.env_id)
    assert env is not None
    return {"object": "test_clock", "now": views.ts(ctx.now_us),
            "advanced_seconds": env["clock_offset_us"] // US_PER_SECOND}


def advance(tx: Tx, ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    """Move the sandbox clock forward by ``seconds`` or to ``to``; never backwards."""
    _sandbox_only(ctx)
    if ("seconds" in data) == ("to" in data):
        raise InvalidRequest("give exactly one of seconds or to", "seconds")
    # Locked, and read afresh: an advance that committed since this request's key was read has
    # moved the clock, and one running meanwhile waits (concurrent advances add up; none moves
    # the clock back).
    env = tx.lock_environment(ctx.env_id)
    assert env is not None
    ctx = replace(ctx, now_us=ctx.now_us - ctx.clock_offset_us + env["clock_offset_us"],
                  clock_offset_us=env["clock_offset_us"])
    if "seconds" in data:
        seconds = data["seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 <= seconds <= MAX_ADVANCE_SECONDS:
            raise InvalidRequest("seconds must be a whole number from 0 to 100 years", "seconds")
        target_us = ctx.now_us + seconds * US_PER_SECOND
    else:
        target_us = periods.parse_rfc3339(data["to"], "to")
        if target_us < ctx.now_us:
            raise InvalidRequest("the test clock never moves backwards", "to")
    offset_us = env["clock_offset_us"] + (target_us - ctx.now_us)
    tx.update("environments", {"id": ctx.env_id}, {"clock_offset_us": offset_us})
    later = replace(ctx, now_us=target_us, clock_offset_us=offset_us)
    # Every boundary up to the new instant, in order: renewals, resets, rollovers, trial ends,
    # scheduled changes, then the expiries and reservation releases that are due.
    advance_due(tx, later, limit=1_000_000)
    settle_end_user(tx, later, None, limit=1_000_000)
    return {"object": "test_clock", "now": views.ts(target_us), "advanced_seconds": offset_us // US_PER_SECOND}
