"""Opening a database by URL, migrating it, and handing out units of work.

``sqlite:///path/to/file.db`` (the default, embedded) and ``postgresql://…`` (production).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .sql import SqlTx

# Told, after every unit of work, whose entitlement checks it may have changed: a set of end
# user ids (empty: nobody's), or None for everyone (see ``SqlTx.changed_users``).
CommitListener = Callable[[set[str] | None], None]

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {col[0]: value for col, value in zip(cursor.description, row)}


class SqliteDatabase:
    """One connection per thread; writers serialise on SQLite's own write lock.

    The service runs store work inline on the event loop (``run``): a unit of work never
    awaits, so within one process transactions never interleave, and ``BEGIN IMMEDIATE``
    with a busy timeout orders writers of other processes.
    """

    kind = "sqlite"
    # Checkpoints run off the request path (see ``_checkpointing``); a request's commit runs one
    # itself only if the WAL has outgrown this many pages, i.e. the background has fallen behind.
    BACKSTOP_PAGES = 4_000
    CHECKPOINT_INTERVAL_SECONDS = 0.05

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._listeners: list[CommitListener] = []
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None

    def on_commit(self, listener: CommitListener) -> None:
        """Call ``listener`` after each unit of work of this process (see ``CommitListener``)."""
        self._listeners.append(listener)

    def changed_elsewhere(self) -> bool:
        """Has another connection (another process, or another thread here) committed since this
        thread last asked? SQLite's ``data_version``, which this connection's own commits do not
        move; those reach the ``on_commit`` listeners instead."""
        self._connection()
        local = self._local
        version = local.versions.execute("PRAGMA data_version").fetchone()[0]
        if version == local.version:
            return False
        local.version = version
        return True

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0, cached_statements=512)
            conn.row_factory = _dict_row
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL is durable across a killed process (not across an OS
            # crash or power loss); QUOTASTACK_SQLITE_SYNCHRONOUS=FULL buys the latter.
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA cache_size=-65536")
            # Read pages straight from the OS's page cache: no copy on the hot path's reads.
            conn.execute("PRAGMA mmap_size=4294967296")
            conn.execute(f"PRAGMA wal_autocheckpoint={self.BACKSTOP_PAGES}")
            self._local.conn = conn
            self._local.versions = conn.cursor()
            self._local.versions.row_factory = None
            self._local.version = None
            with self._lock:
                self._all.append(conn)
                if self._checkpointer is None and self.path != ":memory:":
                    self._checkpointer = threading.Thread(target=self._checkpointing, args=(self._stop,),
                                                          name="sqlite-checkpoint", daemon=True)
                    self._checkpointer.start()
        return conn

    def _checkpointing(self, stop: threading.Event) -> None:
        """Copy the WAL back into the database in the background, every few tens of milliseconds.

        SQLite's automatic checkpoint runs inside the commit that crosses its threshold (1,000
        pages by default): copying the pages and two or three fsyncs, 5-15 ms, landed on every
        50th or so usage and was its p99. A PASSIVE checkpoint takes no lock that writers or
        readers wait for, and the sqlite3 module releases the GIL while it runs, so requests no
        longer wait for its copying and fsyncs (they share only the CPU with it). Durability is
        unchanged: a commit is in the WAL either way, and a checkpoint fsyncs the WAL before it
        copies.
        """
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            while not stop.wait(self.CHECKPOINT_INTERVAL_SECONDS):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:  # a busy database or a closing one: the next round tries again
                    continue
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[SqlTx]:
        conn = self._connection()
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        tx = SqlTx(cur)
        try:
            yield tx
        except BaseException:
            conn.rollback()
            raise
        else:
            conn.commit()
        finally:
            cur.close()
            if self._listeners:
                changed = tx.changed_users()
                if changed is None or changed:
                    for listener in self._listeners:
                        listener(changed)

    @contextmanager
    def reader(self) -> Iterator[SqlTx]:
        conn = self._connection()
        cur = conn.cursor()
        try:
            yield SqlTx(cur)
        finally:
            cur.close()

    def retrying(self, fn: Callable[..., T], *args: Any) -> T:
        """SQLite transactions never fail on a conflict (they wait for the lock): run once."""
        return fn(*args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def migrate(self) -> None:
        # Open our own connection first: it puts the file in WAL mode before Alembic touches it.
        self._connection()
        alembic_upgrade(f"sqlite:///{self.path}", creator=lambda: sqlite3.connect(self.path))

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None and self._checkpointer is not threading.current_thread():
            self._checkpointer.join(timeout=5)
        self._checkpointer, self._stop = None, threading.Event()
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


def alembic_upgrade(url: str, creator: Callable[[], Any] | None = None) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool, **({"creator": creator} if creator else {}))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


def open_database(url: str) -> Any:
    """Open (and migrate) the database at ``url``: ``sqlite:///PATH`` or ``postgresql://…``."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresDatabase

        threads = int(os.environ.get("QUOTASTACK_PG_THREADS", "8"))
        if threads < 1:
            raise ValueError("QUOTASTACK_PG_THREADS must be at least 1")
        pg = PostgresDatabase(url, threads=threads)
        pg.migrate()
        return pg
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        synchronous = os.environ.get("QUOTASTACK_SQLITE_SYNCHRONOUS", "NORMAL").upper()
        if synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError("QUOTASTACK_SQLITE_SYNCHRONOUS must be NORMAL, FULL or EXTRA")
        db = SqliteDatabase(path, synchronous=synchronous)
        db.migrate()
        return db
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://…")
