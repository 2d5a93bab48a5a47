"""API keys to callers: tenant, environment, scopes, and the environment's clock."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, Protocol

from ..domain.errors import Forbidden, RateLimited, Unauthenticated
from ..service import tenants
from ..service.tenants import hash_key
from ..service.codec import loads
from ..service.context import Ctx
from ..service.ports import Database


def bearer(header: str | None) -> str:
    if not header:
        raise Unauthenticated("missing API key: send Authorization: Bearer <key>")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <key>'")
    return key.strip()


@lru_cache(maxsize=1024)
def _scopes(text: str) -> frozenset[str]:
    return frozenset(loads(text))


def now_us() -> int:
    return time.time_ns() // 1000


class RateLimiter:
    """A token bucket per key: ``rate`` requests a second, bursts of ``2 × rate``. 0 turns it off."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key_id: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        capacity = 2 * self.rate
        tokens, last = self._buckets.get(key_id, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key_id] = (tokens, now)
            wait = max(1, int((1 - tokens) / self.rate + 0.999))
            raise RateLimited(f"too many requests: retry after {wait} s", wait)
        self._buckets[key_id] = (tokens - 1, now)


class Principals(Protocol):
    """Principals kept between requests (``checks.CheckCache`` on SQLite)."""

    generation: int

    def principal(self, key_hash: str) -> Any: ...

    def remember_principal(self, generation: int, key_hash: str, row: Any) -> None: ...


class StalePrincipal(Exception):
    """A kept principal no longer matches the database: the unit of work is undone and run again."""


class Unconfirmed:
    """Principals a process keeps without being told of other processes' writes (PostgreSQL).

    A mutation authenticates with the kept principal, and its unit of work reads the key's
    principal again in the same round trip as its first read (``Tx.key_principal_later``), then
    compares before it commits (``Mutations.execute``): a key revoked, or an environment's
    sandbox clock moved, by any process before that read makes the unit of work roll back and
    run again with the principal read afresh. So a kept principal never outlives a change that
    committed before the request's first statement, exactly like a lookup of its own.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._rows: dict[str, dict[str, Any]] = {}

    def get(self, key_hash: str) -> dict[str, Any] | None:
        return self._rows.get(key_hash)

    def put(self, key_hash: str, row: dict[str, Any]) -> None:
        if len(self._rows) >= self.max_entries:
            self._rows.clear()
        self._rows[key_hash] = row

    def forget(self, key_hash: str) -> None:
        self._rows.pop(key_hash, None)


# What a unit of work confirms before it commits: the key's hash and the principal it ran with.
Confirm = tuple[str, dict[str, Any]]


class Authenticator:
    def __init__(self, db: Database, operator_key: str | None, limiter: RateLimiter) -> None:
        self.db = db
        self.operator_key = operator_key
        self.limiter = limiter
        self.principals: Principals | None = None
        self.unconfirmed: Unconfirmed | None = None

    def unit_context(self, header: str | None, request_id: str, scopes: Iterable[str],
                     ) -> tuple[Ctx, Confirm | None]:
        """``context`` for a request whose unit of work confirms a kept principal (see ``Unconfirmed``).

        The second item is what the unit of work must confirm, None when the principal was just
        read. A refusal (401, 403, 429) is never answered from a kept principal: the key is read
        afresh first, so the answer is the one a lookup of its own would give.
        """
        kept = self.unconfirmed
        key = bearer(header)
        if kept is None:
            return self.context(header, request_id, scopes), None
        key_hash = hash_key(key)
        principal = kept.get(key_hash)
        refused: Exception | None = None
        if principal is not None:
            scopes = tuple(scopes)
            try:
                return self.authorize(principal, request_id, scopes), (key_hash, principal)
            except (Unauthenticated, Forbidden, RateLimited) as exc:
                kept.forget(key_hash)
                refused = exc
        with self.db.reader() as tx:
            principal = tenants.authenticate(tx, key)
        kept.put(key_hash, principal)
        if refused is None or isinstance(refused, Unauthenticated):
            return self.authorize(principal, request_id, scopes), None
        # The kept principal already spent this request's token (403) or found none (429): the
        # key as read now answers, without taking another; a 429 stands if the key still holds.
        ctx = self.authorize(principal, request_id, scopes, take=False)
        if isinstance(refused, RateLimited):
            raise refused
        return ctx, None

    def context(self, header: str | None, request_id: str, scopes: Iterable[str], take: bool = True) -> Ctx:
        """The caller's context, if its key is valid and holds one of ``scopes`` (or admin).
        ``take=False``: the request already took its rate limit's token."""
        key = bearer(header)
        kept = self.principals
        if kept is None:
            with self.db.reader() as tx:
                principal = tenants.authenticate(tx, key)
            return self.authorize(principal, request_id, scopes, take=take)
        key_hash = hash_key(key)
        principal = kept.principal(key_hash)
        if principal is None:
            generation = kept.generation
            with self.db.reader() as tx:
                principal = tenants.authenticate(tx, key)
            kept.remember_principal(generation, key_hash, principal)
        return self.authorize(principal, request_id, scopes, take=take)

    def permit(self, principal: Any, scopes: Iterable[str], take: bool = True) -> frozenset[str]:
        """Refuse an unknown or revoked key, one over its rate (a token taken unless ``take`` is
        false), or one without any of ``scopes`` (or admin); else the key's scopes."""
        if principal is None or principal["revoked_at_us"] is not None:
            raise Unauthenticated("unknown or revoked API key")
        held = _scopes(principal["scopes"])
        if take:
            self.limiter.take(principal["key_id"])
        needed = tuple(scopes)
        if "admin" not in held and not any(s in held for s in needed):
            raise Forbidden(f"this key lacks the scope {needed[0]!r} for this call")
        return held

    def authorize(self, principal: Any, request_id: str, scopes: Iterable[str], real_now_us: int | None = None,
                  take: bool = True) -> Ctx:
        """A principal row (``Tx.key_principal`` or ``Tx.check_snapshot``) as a context, or refused."""
        held = self.permit(principal, scopes, take)
        real = now_us() if real_now_us is None else real_now_us
        return Ctx(principal["tenant_id"], principal["env_id"], principal["kind"], principal["key_id"], held,
                   real + principal["clock_offset_us"], request_id, principal["clock_offset_us"])

    def operator(self, header: str | None) -> None:
        key = bearer(header)
        if not self.operator_key or not hmac.compare_digest(key, self.operator_key):
            raise Unauthenticated("this call needs the operator key (QUOTASTACK_OPERATOR_KEY)")
