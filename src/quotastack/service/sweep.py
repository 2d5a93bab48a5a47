"""The sweep: process what time has made due, for every environment, a bounded batch at a time.

Correctness never depends on it: reads count expiries from the instant they happen and every
request brings the subscription and the balance it touches up to now. The sweep does the same for
end users nobody touches (renewals, resets, expiries, reservation releases, with their events),
and drops idempotency records past their retention.
"""

from __future__ import annotations

from ..domain.periods import US_PER_SECOND
from .context import Ctx
from .ports import Database
from .queries import settle_end_user
from .subscriptions import ensure_subscription

IDEMPOTENCY_RETENTION_US = 48 * 3600 * US_PER_SECOND


def sweep(db: Database, real_now_us: int, limit: int = 500) -> int:
    """Settle up to ``limit`` due balances per environment; returns how many were settled."""
    with db.reader() as tx:
        environments = tx.environments()
    settled = 0
    for env in environments:
        ctx = Ctx(env["tenant_id"], env["id"], env["kind"], None, frozenset(), real_now_us + env["clock_offset_us"],
                  "req_sweep")
        with db.reader() as tx:
            subscriptions = sorted({r["end_user_id"] for r in tx.due_subscriptions(ctx.env_id, ctx.now_us, limit)})
        for end_user_id in subscriptions:
            with db.transaction() as tx:
                live = ensure_subscription(tx, ctx, end_user_id)
                settled += live is not None
        with db.reader() as tx:
            due = sorted({(r["end_user_id"], r["feature_key"]) for r in tx.due_accounts(ctx.env_id, ctx.now_us, limit)})
        for end_user_id, _ in due:
            # One end user per transaction keeps every lock short.
            with db.transaction() as tx:
                settled += settle_end_user(tx, ctx, end_user_id, limit)
    with db.transaction() as tx:
        tx.delete_idempotency_older_than(real_now_us - IDEMPOTENCY_RETENTION_US)
    return settled
