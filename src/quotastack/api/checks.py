"""Answers to the entitlement check, kept between checks on SQLite.

On the embedded engine every write of this process goes through one ``SqliteDatabase``, which
tells this cache whose checks each unit of work may have changed (the end users it locked, or
everyone when it touched the catalog, keys or environments); a commit by any other connection
(another process on the same file, ``quotastack worker``) moves SQLite's ``data_version``, which
the first lookup of every burst of requests reads first (see ``_unversion``), and which empties
the cache. An answer is also dated: it holds from the instant it was read until the first
instant at which time alone changes it (the next renewal or reset, the next block to take effect
or expire, the next reservation to expire; see ``SqlTx.check_snapshot``). So a cached answer is
exactly what the ledger would say: it never lags a write or a boundary.

What is kept is the response body, per end user, environment, feature and ``units``, and each
key's principal apart: every hit is still authorised (scopes, revocation, rate limit) like a
miss, and an answer read through one key serves every key of its environment. The principals
also serve every other request's authentication (``Authenticator.context``): a key change, like
any catalog change, forgets them all.

A server that runs the ASGI lifespan (``quotastack serve``) warms the cache when it starts
(``warm``): it reads ahead the answers for one unit of every feature for the end users of every
environment, in id order, a run of them at a time between requests, until the cache is full.
The first check of an end user is then a hit too; a warmed answer is read, dated and forgotten
exactly like one a check read.

PostgreSQL deployments run several processes that write without telling each other, so they
read every check from the database.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..service import entitlements
from ..service.context import Ctx
from ..store.database import SqliteDatabase
from .auth import now_us
from .render import dumps

# An entry is one bytes object: when it holds from (real µs, inclusive) and until (exclusive),
# packed, then the body. Per end user, entries are kept by "environment id NUL feature key NUL
# units" (the edge refuses NUL in any query: no two keys collide). Strings and bytes are objects
# the garbage collector never tracks, so neither are the per-end-user dicts that hold only them:
# a full cache costs its collections nothing. (Kept as (body, since, until) tuples, the warmed
# cache's 100,000 dicts were walked by every full collection, and halved the check's throughput.)
DATES = struct.Struct("<qq")
PRINCIPAL_COLUMNS = ("key_id", "env_id", "scopes", "revoked_at_us", "tenant_id", "kind", "clock_offset_us")
FOREVER = 2**63 - 1


class CheckCache:
    def __init__(self, db: SqliteDatabase, max_entries: int) -> None:
        self.db = db
        self.max_entries = max_entries
        self._users: dict[str, dict[str, bytes]] = {}
        self._principals: dict[str, dict[str, Any]] = {}  # by key hash; a key change empties all
        self._size = 0
        # Bumped by every invalidation: an answer read before one is not stored after it.
        self.generation = 0
        self.hits = self.misses = 0
        # Lookups run on the event loop's thread; a unit of work committed on another thread of
        # the process (a test's, a CLI's) may forget answers meanwhile.
        self._lock = threading.Lock()
        # Whether another connection's commits have been looked for since the last request
        # arrived (see ``_unversion``).
        self._versioned = False
        db.on_commit(self.forget)

    def _unversion(self) -> None:
        """Queued on the event loop when ``data_version`` is read, so it runs before the handler
        of every request that arrives after that read (the loop runs its callbacks in the order
        they were queued, and a request's handler is queued when its bytes arrive). Until it runs,
        the checks being handled all arrived before the read, and a commit that completed before
        any of them arrived is already counted: they need not read it again. One read serves a
        whole burst of requests, and no check can miss a commit that completed before it came in.
        """
        self._versioned = False

    def forget(self, end_users: set[str] | None) -> None:
        """Drop the answers of ``end_users`` (None: of everyone)."""
        with self._lock:
            self.generation += 1
            if end_users is None:
                self._users.clear()
                self._principals.clear()
                self._size = 0
                return
            for end_user_id in end_users:
                entries = self._users.pop(end_user_id, None)
                if entries is not None:
                    self._size -= len(entries)

    def _current(self) -> bool:
        """False when another connection has committed since the last request arrived: then
        everything kept is forgotten."""
        if self._versioned:
            return True
        self._versioned = True
        asyncio.get_running_loop().call_soon(self._unversion)
        if self.db.changed_elsewhere():
            self.forget(None)
            return False
        return True

    def principal(self, key_hash: str) -> dict[str, Any] | None:
        """The key's principal as last read, for authenticating any request without a statement."""
        return self._principals.get(key_hash) if self._current() else None

    def remember_principal(self, generation: int, key_hash: str, row: Any) -> None:
        with self._lock:
            if generation == self.generation and key_hash not in self._principals:
                self._principals[key_hash] = {c: row[c] for c in PRINCIPAL_COLUMNS}

    def get(self, end_user_id: str, key_hash: str, feature_key: str, units: str, real_now_us: int,
            ) -> tuple[dict[str, Any], bytes] | None:
        """The key's principal and the kept body, when there is one that holds now."""
        if not self._current():
            self.misses += 1
            return None
        principal = self._principals.get(key_hash)
        entries = self._users.get(end_user_id)
        entry = None if entries is None or principal is None else \
            entries.get(f"{principal['env_id']}\0{feature_key}\0{units}")
        if entry is None:
            self.misses += 1
            return None
        since, until = DATES.unpack_from(entry)
        if not since <= real_now_us < until:
            self.misses += 1
            return None
        self.hits += 1
        return principal, entry[DATES.size:]

    def put(self, generation: int, end_user_id: str, env_id: int, feature_key: str, units: str, body: bytes,
            real_now_us: int, until_us: int | None) -> None:
        """Keep ``body``, read at ``real_now_us`` when the cache was at ``generation`` and true until
        ``until_us`` (real time; None: until a write)."""
        with self._lock:
            if generation != self.generation:
                return
            key = f"{env_id}\0{feature_key}\0{units}"
            entries = self._users.get(end_user_id)
            if entries is None or key not in entries:
                # A new entry, whether of a new end user or not: make room, oldest end user first
                # (dicts keep insertion order), possibly this one.
                while self._size >= self.max_entries and self._users:
                    self._size -= len(self._users.pop(next(iter(self._users))))
                entries = self._users.get(end_user_id)
                if entries is None:
                    entries = self._users[end_user_id] = {}
                self._size += 1
            entries[key] = DATES.pack(real_now_us, FOREVER if until_us is None else until_us) + body

    def kept(self, end_user_id: str) -> list[tuple[bytes, int, int]]:
        """The end user's kept answers, as (body, valid from, valid until): for tests and debugging."""
        return [(entry[DATES.size:], *DATES.unpack_from(entry)) for entry in self._users.get(end_user_id, {}).values()]

    async def warm(self, run: int = 50, slice_seconds: float = 0.01) -> int:
        """Read ahead the answers for one unit of every feature, for the end users of every
        environment, ``run`` end users at a time, until the cache is full or everyone is read;
        and every key's principal. Returns how many answers it kept.

        Each run is one statement (``entitlements.answers``), kept only if nothing was forgotten
        while it was read, like a check's own read (``put``'s generation); a run that was not is
        left to the checks. It never evicts: it stops when the cache is full. It yields to the
        requests waiting every ``slice_seconds``, so under load it takes about half of the event
        loop's time (a server started under load is warm within seconds, ~30 µs an end user) and
        a request waits for it at most about a slice.
        """
        kept = 0
        deadline = time.perf_counter() + slice_seconds
        self._current()
        generation = self.generation
        with self.db.reader() as tx:
            principals = tx.key_principals()
            environments = tx.environments()
        for row in principals:
            self.remember_principal(generation, row["key_hash"], row)
        for env in environments:
            with self.db.reader() as tx:
                features = [row["key"] for row in tx.page("features", env["id"], {}, 10_000, None)]
            for feature_key in features:
                after: str | None = ""
                while after is not None:
                    room = min(run, self.max_entries - self._size)
                    if room <= 0:
                        return kept
                    self._current()
                    generation, real_now = self.generation, now_us()
                    with self.db.reader() as tx:
                        # The sandbox clock as it is now: it may have moved since the last run.
                        offset = tx.get("environments", id=env["id"])["clock_offset_us"]
                        ctx = Ctx(env["tenant_id"], env["id"], env["kind"], None, frozenset(),
                                  real_now + offset, "warm")
                        answers, next_after = entitlements.answers(tx, ctx, feature_key, after, room)
                    if generation == self.generation:
                        for end_user_id, result, until in answers:
                            self.put(generation, end_user_id, env["id"], feature_key, "1", dumps(result),
                                     real_now, None if until is None else until - offset)
                        kept += len(answers)
                    after = next_after
                    if time.perf_counter() >= deadline:
                        await asyncio.sleep(0)
                        deadline = time.perf_counter() + slice_seconds
        return kept

    def __len__(self) -> int:
        return self._size

    def metrics(self) -> Iterator[Metric]:
        """For ``GET /metrics``."""
        lookups = CounterMetricFamily("quotastack_check_cache_lookups", "Entitlement checks looked up in the "
                                      "answers kept between checks, by result", labels=["result"])
        lookups.add_metric(["hit"], self.hits)
        lookups.add_metric(["miss"], self.misses)
        yield lookups
        yield GaugeMetricFamily("quotastack_check_cache_entries", "Answers kept between checks", value=self._size)
