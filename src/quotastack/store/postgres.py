"""The PostgreSQL adapter: store work in threads with a connection each, pipelined, retried.

Several API processes may share one database. Correctness comes from three things:
- every balance change first locks the end user's row (an upsert that locks it, see
  ``PgTx.lock_end_user``), so changes to one end user's balances are serialised while different
  end users proceed in parallel; a unit of work that locks several end users locks them in id
  order, so lock waits cannot cycle;
- an idempotency key is claimed with a transaction-scoped advisory lock, so a second request
  with a key that another process is still working on gets ``409 idempotency_key_in_use``;
- a transaction that fails with a serialization failure or a deadlock (SQLSTATE 40001, 40P01)
  or loses a unique-key race is rolled back and run again from the start.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

from ..service.ports import Row
from .sql import _KEY_PRINCIPAL, SqlTx, _to_pyformat

T = TypeVar("T")
RETRYABLE = (errors.SerializationFailure, errors.DeadlockDetected, errors.UniqueViolation)
MAX_ATTEMPTS = 8
# psycopg prepares a statement on its fifth execution on a connection; the store's statements are
# a few hundred at most, so keep them all prepared (psycopg's default keeps 100).
PREPARED_MAX = 512


class Cork:
    """Holds a connection's queued statements in the kernel until the unit of work waits for an answer.

    psycopg's pipeline sends every statement as soon as it is queued: one TCP segment each, and
    on loopback each segment wakes the backend to read it. With ``TCP_CORK`` set on the
    connection's socket while a unit of work queues, the kernel holds them, and they leave as
    one segment when the cork comes off: before every read's wait (``PgTx``) and before the
    commit's. The backend then reads a round trip's statements at once. Where there is no
    ``TCP_CORK`` (another system, a Unix socket) this does nothing.
    """

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._sock: socket.socket | None = None
        option = getattr(socket, "TCP_CORK", None)
        if option is None:
            return
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))  # the same socket, under a second fd
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            sock.close()
            return
        self._sock, self._option = sock, option

    def on(self) -> None:
        if self._sock is not None:
            self._sock.setsockopt(socket.IPPROTO_TCP, self._option, 1)

    def off(self) -> None:
        """Send what is held, now."""
        if self._sock is not None:
            self._sock.setsockopt(socket.IPPROTO_TCP, self._option, 0)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class PgTx(SqlTx):
    # Code-point order, as Python sorts ids (``advance_due``, the sweep): one lock order for all.
    _LOCK_IN_ORDER = ' ORDER BY end_user_id COLLATE "C" FOR UPDATE'
    _FOR_UPDATE = " FOR UPDATE"

    # ``lock_end_user`` on PostgreSQL: an upsert whose ``DO UPDATE`` has a ``WHERE`` that is never
    # true locks the existing row as its update would (``FOR NO KEY UPDATE``: waiting for any
    # other holder, then seeing its committed row) and writes nothing to it, and on first mention
    # the inserted row is locked as new: create and lock in one statement. (Without the ``WHERE``
    # every lock wrote a new row version; with it, waiters queue on the tuple's lock.) It
    # returns nothing to wait for, so in pipeline mode it goes to the server with the next read,
    # which runs after the lock is held. It conflicts with ``SELECT … FOR UPDATE`` on the same row
    # (the sweep and batches), so every path that changes an end user's balances still takes one
    # lock per end user.
    _ON_EXISTING_END_USER = "DO UPDATE SET created_at_us = end_users.created_at_us WHERE false"

    def __init__(self, cursor: Any, paramstyle: str = "named", cork: Cork | None = None) -> None:
        super().__init__(cursor, paramstyle)
        self._cork = cork
        # Inserts and updates not sent yet: (kind, table, value columns, where columns, values).
        self._held: list[tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[Any, ...]]] = []

    # ---- writes held back, sent as one statement ---------------------------------------------
    #
    # Consecutive ``insert`` and ``update`` calls are held and sent as one statement (data-
    # modifying ``WITH`` parts, see ``_held_sql``) just before the next statement of any other
    # kind, or the commit: a usage's block update and its three inserts are one statement, not
    # four. The parts of one statement all run on the snapshot taken before it, so none sees
    # another's rows: an update of a table already written by a held part is sent only after
    # those (``update``); inserts only add rows, which no other held part looks at.

    def insert(self, table: str, row: Mapping[str, Any]) -> None:
        self._wrote(table, (row,))
        self._ahead = None
        self._held.append(("insert", table, tuple(row), (), tuple(row.values())))

    def update(self, table: str, where: Mapping[str, Any], values: Mapping[str, Any]) -> None:
        if any(held[1] == table for held in self._held):
            self.send_held()
        self._wrote(table)
        self._ahead = None
        self._held.append(("update", table, tuple(values), tuple(where),
                           tuple(values.values()) + tuple(where.values())))

    def send_held(self) -> None:
        """Queue the held writes, as one statement, ahead of anything sent after them."""
        held = self._held
        if not held:
            return
        self._held = []
        sql = _held_sql(tuple((kind, table, cols, where) for kind, table, cols, where, _ in held))
        self._cur.execute(sql, [value for *_, values in held for value in values])

    def insert_many(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        self.send_held()
        super().insert_many(table, rows)

    def set_remaining(self, pairs: Sequence[tuple[str, int]]) -> None:
        self.send_held()
        super().set_remaining(pairs)

    @contextmanager
    def _answer(self) -> Iterator[None]:
        """Around waiting for an answer: what is held goes out first (see ``Cork``)."""
        if self._cork is None:
            yield
            return
        self._cork.off()
        try:
            yield
        finally:
            self._cork.on()

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        cur = self.execute(sql, params)
        with self._answer():
            return list(cur.fetchall())

    def one(self, sql: str, params: Mapping[str, Any] | None = None) -> Row | None:
        cur = self.execute(sql, params)
        with self._answer():
            return cur.fetchone()  # type: ignore[no-any-return]

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        row = self.one(sql, params)
        return None if row is None else next(iter(row.values()))

    def delete_idempotency_older_than(self, cutoff_us: int) -> int:
        # Counted by a read: in pipeline mode a cursor's rowcount is not known until later.
        return int(self.scalar("WITH gone AS (DELETE FROM idempotency_keys WHERE created_at_us < :c RETURNING 1) "
                               "SELECT COUNT(*) FROM gone", {"c": cutoff_us}))

    # The stored outcome read ahead by try_lock_key: ((env_id, key), row), for the get() after it.
    _ahead: tuple[tuple[int, str], Row | None] | None = None

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        self.send_held()
        self._ahead = None  # anything else done in between makes the read-ahead stale
        return super().execute(sql, params)

    def try_lock_key(self, env_id: int, key: str) -> bool:
        """Claim the key, and read its stored outcome in the same round trip.

        ``Mutations.once`` reads the stored outcome right after the claim. The read is a
        statement of its own, queued behind the claim, so (at READ COMMITTED) it sees every
        outcome committed before the claim was granted, exactly as a separate read would; it
        just doesn't wait for the claim's answer before being sent.
        """
        # One 64-bit lock key: the key's hash seeded with the environment. (The two-int form took
        # env_id as int4, and failed once an environment's id passed 2**31 - 1.)
        claim = self.execute("SELECT pg_try_advisory_xact_lock(hashtextextended(:k, :e)) AS ok",
                             {"e": env_id, "k": key})
        with claim.connection.cursor() as ahead:
            ahead.execute(_to_pyformat("SELECT * FROM idempotency_keys WHERE env_id = :e AND key = :k"),
                          {"e": env_id, "k": key})
            with self._answer():
                row = claim.fetchone()  # one round trip for both: the pipeline sends them together
                assert row is not None
                stored = ahead.fetchone()
        if row["ok"]:
            self._ahead = ((env_id, key), stored)
        return bool(row["ok"])

    def key_principal_later(self, key_hash: str) -> Callable[[], Row | None]:
        """Queue ``key_principal`` on a cursor of its own; it travels with the next read.

        At READ COMMITTED the statement sees every change committed before it runs, which is
        after the unit of work began; its answer is collected when asked for, by then (almost
        always) without a round trip of its own.
        """
        self.send_held()
        cur = self._cur.connection.cursor()
        cur.execute(_to_pyformat(_KEY_PRINCIPAL), {"h": key_hash})

        def answer() -> Row | None:
            try:
                if cur.pgresult is not None:  # it came back with an earlier read: nothing to wait for
                    return cur.fetchone()  # type: ignore[no-any-return]
                with self._answer():
                    return cur.fetchone()  # type: ignore[no-any-return]
            finally:
                cur.close()
        return answer

    def get(self, table: str, **where: Any) -> Row | None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and table == "idempotency_keys" and where.keys() == {"env_id", "key"} \
                and ahead[0] == (where["env_id"], where["key"]):
            return ahead[1]
        return super().get(table, **where)


@lru_cache(maxsize=512)
def _held_sql(shape: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]) -> str:
    """One statement for held writes of this shape: ``WITH w0 AS (…), w1 AS (…) <the last>``.

    Placeholders are positional, in the order of the parts and of each part's columns.
    """
    parts = []
    for kind, table, cols, where in shape:
        if kind == "insert":
            parts.append(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})")
        else:
            parts.append(f"UPDATE {table} SET {', '.join(f'{c} = %s' for c in cols)} "
                         f"WHERE {' AND '.join(f'{c} = %s' for c in where)}")
    if len(parts) == 1:
        return parts[0]
    return "WITH " + ", ".join(f"w{i} AS ({part})" for i, part in enumerate(parts[:-1])) + " " + parts[-1]


class PostgresDatabase:
    """Store work runs in a small thread pool; each thread owns one connection for its lifetime.

    A unit of work runs in pipeline mode: statements whose results nobody reads yet (``BEGIN``,
    the inserts and updates, savepoints, ``COMMIT``) are queued and sent with the next statement
    that is read, so a transaction costs one round trip per read plus one for its writes and
    commit, not one per statement. Errors of queued statements surface at that next read or at
    commit, still inside the unit of work, which then rolls back as before.
    """

    kind = "postgresql"

    def __init__(self, url: str, *, threads: int = 8) -> None:
        self.url = url
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        self._corks: dict[int, Cork] = {}  # by id() of the connection in ``_all`` it belongs to
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="quotastack-db")

    def _connection(self) -> psycopg.Connection[Any]:
        """This thread's connection, opened on first use and again after it broke."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            self._forget(conn)
        # Autocommit: a reader's statements are single-statement transactions; a unit of work
        # opens its own with BEGIN (conn.transaction()).
        conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row)
        conn.prepared_max = PREPARED_MAX
        self._local.conn = conn
        self._local.cork = cork = Cork(conn)
        with self._lock:
            self._all.append(conn)
            self._corks[id(conn)] = cork
        return conn

    def _forget(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
            cork = self._corks.pop(id(conn), None)
        conn.close()
        if cork is not None:
            cork.close()
        self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[PgTx]:
        """``BEGIN`` … ``COMMIT``, both queued in the pipeline like any write.

        ``BEGIN`` travels with the unit of work's first read and ``COMMIT`` with its trailing
        writes. (psycopg's ``conn.transaction()`` in pipeline mode syncs right after ``BEGIN``: a
        round trip for ``BEGIN`` alone.) A unit of work that raises queues ``ROLLBACK``; if an
        error of the database aborted the pipeline, the server skips it and the transaction is
        still open once the pipeline is synced: then psycopg's own ``rollback()`` ends it (and,
        as after any error, forgets the connection's prepared statements).
        """
        conn = self._connection()
        cork: Cork = self._local.cork
        try:
            with conn.pipeline(), conn.cursor() as cur:
                cork.on()
                try:
                    cur.execute("BEGIN")
                    tx = PgTx(cur, "pyformat", cork)
                    try:
                        yield tx
                    except BaseException:
                        cur.execute("ROLLBACK")  # what it held back is dropped unsent
                        raise
                    tx.send_held()
                    cur.execute("COMMIT")
                finally:
                    cork.off()  # before the pipeline's end waits for the commit's answer
        except BaseException:
            if not conn.closed and not conn.broken \
                    and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            raise

    @contextmanager
    def reader(self) -> Iterator[PgTx]:
        conn = self._connection()
        # The thread's one connection: a read inside this thread's unit of work would run in that
        # transaction, not beside it as a reader should.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, "reader() inside transaction()"
        with conn.cursor() as cur:
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
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
            for cork in self._corks.values():
                cork.close()
            self._corks.clear()
        self._local = threading.local()
