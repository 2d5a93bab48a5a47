"""The PostgreSQL adapter: pooled connections, store work in threads, retried transactions.

Several API processes may share one database. Correctness comes from three things:
- every balance change first locks the end user's row (``SELECT … FOR UPDATE``), so changes to
  one end user's balances are serialised while different end users proceed in parallel; a unit
  of work locks at most one end user, so lock order cannot cycle;
- an idempotency key is claimed with a transaction-scoped advisory lock, so a second request
  with a key that another process is still working on gets ``409 idempotency_key_in_use``;
- a transaction that fails with a serialization failure or a deadlock (SQLSTATE 40001, 40P01)
  or loses a unique-key race is rolled back and run again from the start.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from .sql import SqlTx

T = TypeVar("T")
RETRYABLE = (errors.SerializationFailure, errors.DeadlockDetected, errors.UniqueViolation)
MAX_ATTEMPTS = 8


class PgTx(SqlTx):
    # Code-point order, as Python sorts ids (``advance_due``, the sweep): one lock order for all.
    _LOCK_IN_ORDER = ' ORDER BY end_user_id COLLATE "C" FOR UPDATE'

    def _lock_row(self, env_id: int, end_user_id: str) -> None:
        self.execute("SELECT 1 FROM end_users WHERE env_id = :e AND end_user_id = :u FOR UPDATE",
                     {"e": env_id, "u": end_user_id})

    def try_lock_key(self, env_id: int, key: str) -> bool:
        row = self.one("SELECT pg_try_advisory_xact_lock(:e, hashtext(:k)) AS ok", {"e": env_id, "k": key})
        assert row is not None
        return bool(row["ok"])


class PostgresDatabase:
    kind = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 16) -> None:
        self.url = url
        self._writers = ConnectionPool(url, min_size=1, max_size=pool_size, open=True,
                                       kwargs={"row_factory": dict_row, "autocommit": False})
        self._readers = ConnectionPool(url, min_size=1, max_size=pool_size, open=True,
                                       kwargs={"row_factory": dict_row, "autocommit": True})
        self._threads = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="quotastack-db")

    @contextmanager
    def transaction(self) -> Iterator[PgTx]:
        with self._writers.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield PgTx(cur, "pyformat")

    @contextmanager
    def reader(self) -> Iterator[PgTx]:
        with self._readers.connection() as conn, conn.cursor() as cur:
            yield PgTx(cur, "pyformat")

    def retrying(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` (which opens its own transactions) again after a retryable failure."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return fn(*args)
            except RETRYABLE:
                if attempt == MAX_ATTEMPTS:
                    raise
                time.sleep(random.uniform(0, 0.002 * 2**attempt))
        raise AssertionError("unreachable")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self.retrying, fn, *args)

    def migrate(self) -> None:
        from .database import alembic_upgrade

        sa_url = "postgresql+psycopg://" + self.url.split("://", 1)[1]
        with psycopg.connect(self.url, autocommit=True) as conn:
            # One migrator at a time, however many processes start together.
            conn.execute("SELECT pg_advisory_lock(7310001)")
            try:
                alembic_upgrade(sa_url)
            finally:
                conn.execute("SELECT pg_advisory_unlock(7310001)")

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        self._writers.close()
        self._readers.close()
