"""The PostgreSQL adapter itself: pipelined units of work, retries, the end user's lock.

A unit of work runs in pipeline mode, so a failing insert or update reports its error at the
next read or at commit rather than where it was issued. These tests pin down that such an error
still has its own class (so ``retrying`` recognises 40001/40P01 and unique-key races), that the
transaction is rolled back whole, that the thread's connection stays usable afterwards, and that
``lock_end_user`` creates and locks an end user with one writer at a time.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from .serving import engines

pytestmark = pytest.mark.skipif("postgresql" not in engines(), reason="PostgreSQL is not among the engines")


@pytest.fixture
def pg() -> Iterator[object]:
    from quotastack.store import open_database

    from .serving import database_url

    db = open_database(database_url("postgresql", None))  # type: ignore[arg-type]
    table = f"scratch_{random.randrange(10**9)}"
    with db.reader() as tx:
        tx.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY)")
        tx.execute(f"INSERT INTO {table} VALUES (1)")
    db.table = table  # type: ignore[attr-defined]
    yield db
    with db.reader() as tx:
        tx.execute(f"DROP TABLE {table}")
    db.close()


def rows(db: object, table: str) -> list[int]:
    with db.reader() as tx:  # type: ignore[attr-defined]
        return [row["id"] for row in tx.all(f"SELECT id FROM {table} ORDER BY id")]


def test_a_failed_write_in_a_savepoint_raises_its_own_error_and_rolls_everything_back(pg: object) -> None:
    table = pg.table  # type: ignore[attr-defined]
    with pytest.raises(errors.UniqueViolation):
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            tx.execute(f"INSERT INTO {table} VALUES (2)")
            with tx.savepoint():
                tx.execute(f"INSERT INTO {table} VALUES (1)")  # the duplicate: reported later
            tx.one("SELECT 1 AS one")
    assert rows(pg, table) == [1]
    with pg.reader() as tx:  # type: ignore[attr-defined]
        assert tx.one("SELECT 1 AS one") == {"one": 1}


def test_a_failed_write_is_reported_at_commit_when_nothing_is_read_after_it(pg: object) -> None:
    table = pg.table  # type: ignore[attr-defined]
    with pytest.raises(errors.UniqueViolation):
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            tx.execute(f"INSERT INTO {table} VALUES (3)")
            tx.execute(f"INSERT INTO {table} VALUES (1)")
    assert rows(pg, table) == [1]


def test_a_serialization_failure_of_a_pipelined_write_is_retried_from_the_start(pg: object) -> None:
    table = pg.table  # type: ignore[attr-defined]
    attempts = []

    def unit() -> None:
        attempts.append(1)
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            tx.execute(f"INSERT INTO {table} VALUES (10)")
            if len(attempts) == 1:
                # Not read back: in pipeline mode this fails only when the commit is sent.
                tx.execute("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")

    pg.retrying(unit)  # type: ignore[attr-defined]
    assert len(attempts) == 2
    assert rows(pg, table) == [1, 10]


def test_a_domain_error_in_a_savepoint_keeps_the_rest_of_the_transaction(pg: object) -> None:
    """As Mutations.once does with a 402: the savepoint's work is undone, the outcome is stored."""
    table = pg.table  # type: ignore[attr-defined]
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        try:
            with tx.savepoint():
                tx.execute(f"INSERT INTO {table} VALUES (20)")
                raise LookupError("refused")
        except LookupError:
            pass
        tx.execute(f"INSERT INTO {table} VALUES (21)")
    assert rows(pg, table) == [1, 21]


def test_a_unit_of_work_that_raises_is_rolled_back_and_its_connection_left_idle(pg: object) -> None:
    """BEGIN and COMMIT are queued in the pipeline; an exception of the unit of work queues ROLLBACK."""
    table = pg.table  # type: ignore[attr-defined]
    with pytest.raises(LookupError):
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            tx.execute(f"INSERT INTO {table} VALUES (30)")
            assert tx.one("SELECT 1 AS one") == {"one": 1}  # BEGIN and the insert went with this read
            raise LookupError("refused")
    assert rows(pg, table) == [1]
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        tx.execute(f"INSERT INTO {table} VALUES (31)")
    assert rows(pg, table) == [1, 31]
    with pg.reader() as tx:  # type: ignore[attr-defined]
        status = tx.one("SELECT 1 AS one")
        assert status == {"one": 1}


def test_a_failed_commit_leaves_the_connection_usable(pg: object) -> None:
    """A deferred constraint fails at COMMIT itself: the transaction ends, nothing of it remains."""
    table = pg.table  # type: ignore[attr-defined]
    with pg.reader() as tx:  # type: ignore[attr-defined]
        tx.execute(f"CREATE TABLE {table}_d (id INT PRIMARY KEY DEFERRABLE INITIALLY DEFERRED)")
    try:
        with pytest.raises(errors.UniqueViolation):
            with pg.transaction() as tx:  # type: ignore[attr-defined]
                tx.execute(f"INSERT INTO {table}_d VALUES (1)")
                tx.execute(f"INSERT INTO {table}_d VALUES (1)")
        assert rows(pg, f"{table}_d") == []
    finally:
        with pg.reader() as tx:  # type: ignore[attr-defined]
            tx.execute(f"DROP TABLE {table}_d")


def test_every_wait_for_an_answer_sends_what_the_cork_holds(pg: object) -> None:
    """Statements queued under TCP_CORK leave before each read, claim and commit waits for its answer.

    A wait that forgot to take the cork off would still end, but only after the kernel's 200 ms:
    30 of them would take 6 s. Afterwards the connection's socket is left uncorked.
    """
    import socket

    table = pg.table  # type: ignore[attr-defined]
    started = time.monotonic()
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        later = tx.key_principal_later("no such key")
        for i in range(10):
            tx.execute(f"INSERT INTO {table} VALUES ({100 + i})")
            assert tx.one(f"SELECT COUNT(*) AS n FROM {table}") == {"n": i + 2}
            assert len(tx.all(f"SELECT id FROM {table}")) == i + 2
            assert tx.try_lock_key(random.randrange(10**12, 10**13), f"key-{i}") is True
        assert later() is None
        tx.execute(f"DELETE FROM {table} WHERE id >= 100")
    assert time.monotonic() - started < 2.0
    assert rows(pg, table) == [1]
    cork = pg._local.cork  # type: ignore[attr-defined]
    if cork._sock is not None:
        assert cork._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0


@pytest.fixture
def pairs(pg: object) -> Iterator[str]:
    """A scratch table of (id, v) rows for the held writes' tests."""
    table = f"{pg.table}_v"  # type: ignore[attr-defined]
    with pg.reader() as tx:  # type: ignore[attr-defined]
        tx.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, v INT NOT NULL)")
    yield table
    with pg.reader() as tx:  # type: ignore[attr-defined]
        tx.execute(f"DROP TABLE {table}")


def values(pg: object, table: str) -> list[tuple[int, int]]:
    with pg.reader() as tx:  # type: ignore[attr-defined]
        return [(row["id"], row["v"]) for row in tx.all(f"SELECT id, v FROM {table} ORDER BY id")]


def test_held_writes_are_seen_by_the_next_read_and_applied_in_order(pg: object, pairs: str) -> None:
    """Inserts and updates are held and sent as one statement; what would differ in one is split."""
    table = pg.table  # type: ignore[attr-defined]
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        tx.insert(pairs, {"id": 1, "v": 10})
        tx.insert(pairs, {"id": 2, "v": 20})
        tx.insert(table, {"id": 40})
        tx.update(pairs, {"id": 1}, {"v": 11})  # sees the row inserted just before
        tx.update(pairs, {"id": 1}, {"v": 12})  # the same row again: the later value stays
        tx.update(table, {"id": 40}, {"id": 41})
        assert tx.all(f"SELECT id, v FROM {pairs} ORDER BY id") == [{"id": 1, "v": 12}, {"id": 2, "v": 20}]
        tx.update(pairs, {"id": 2}, {"v": 21})
        tx.insert(pairs, {"id": 3, "v": 30})
    assert values(pg, pairs) == [(1, 12), (2, 21), (3, 30)]
    assert rows(pg, table) == [1, 41]


def test_a_failing_part_of_held_writes_raises_its_own_error_and_nothing_remains(pg: object, pairs: str) -> None:
    table = pg.table  # type: ignore[attr-defined]
    with pytest.raises(errors.UniqueViolation):
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            tx.insert(pairs, {"id": 5, "v": 50})
            tx.insert(table, {"id": 1})  # the duplicate, in the middle of one statement
            tx.insert(pairs, {"id": 6, "v": 60})
    assert values(pg, pairs) == [] and rows(pg, table) == [1]
    with pytest.raises(LookupError):
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            tx.insert(pairs, {"id": 7, "v": 70})
            raise LookupError("refused before anything was sent")
    assert values(pg, pairs) == []


def in_turn(pg: object, holder: Callable[[Any], None], waiter: Callable[[Any], None]) -> list[str]:
    """``holder`` in a transaction that then holds its locks 0.3 s, ``waiter`` in another started
    meanwhile: the order in which they got past their locks."""
    held, order = threading.Event(), []

    def hold() -> None:
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            holder(tx)
            held.set()
            time.sleep(0.3)
            order.append("holder")

    def wait() -> None:
        held.wait(5)
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            waiter(tx)
            order.append("waiter")

    threads = [threading.Thread(target=hold), threading.Thread(target=wait)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return order


def locking(env_id: int, user: str, now_us: int) -> Callable[[Any], None]:
    """A unit of work that locks ``user``. The lock goes to the server with the next read
    (pipeline mode), as in every service: a waiter's read waits for the holder to commit."""
    def run(tx: Any) -> None:
        tx.lock_end_user(env_id, user, now_us)
        tx.live_subscription(env_id, user)
    return run


def test_lock_end_user_creates_the_end_user_once_and_serialises_writers(pg: object) -> None:
    env_id, user = random.randrange(10**12, 10**13), "racer"

    assert in_turn(pg, locking(env_id, user, 1), locking(env_id, user, 2)) == ["holder", "waiter"]
    with pg.reader() as tx:  # type: ignore[attr-defined]
        found = tx.all("SELECT created_at_us FROM end_users WHERE env_id = :e AND end_user_id = :u",
                       {"e": env_id, "u": user})
    assert [row["created_at_us"] for row in found] == [1]


def test_lock_end_user_on_an_existing_end_user_writes_no_row_version_and_still_serialises(pg: object) -> None:
    env_id, user = random.randrange(10**12, 10**13), "existing"
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        tx.lock_end_user(env_id, user, 1)

    def version() -> Any:
        with pg.reader() as tx:  # type: ignore[attr-defined]
            return tx.one("SELECT xmin::text AS v, created_at_us FROM end_users WHERE env_id = :e AND end_user_id = :u",
                          {"e": env_id, "u": user})

    before = version()

    assert in_turn(pg, locking(env_id, user, 2), locking(env_id, user, 3)) == ["holder", "waiter"]
    assert version() == before  # locked twice since, never rewritten


def test_a_broken_connection_is_replaced(pg: object) -> None:
    with pg.reader() as tx:  # type: ignore[attr-defined]
        pid = tx.one("SELECT pg_backend_pid() AS pid")["pid"]  # type: ignore[index]
    with psycopg.connect(pg.url, autocommit=True) as other:  # type: ignore[attr-defined]
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        with pg.reader() as tx:  # type: ignore[attr-defined]
            tx.one("SELECT 1 AS one")
    with pg.reader() as tx:  # type: ignore[attr-defined]
        assert tx.one("SELECT 1 AS one") == {"one": 1}


def test_the_sweep_counts_the_idempotency_records_it_deletes(pg: object) -> None:
    """Inside a pipelined unit of work a cursor's rowcount is -1: the count must come from a read."""
    env_id = random.randrange(10**12, 10**13)
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        for i, created in enumerate((1, 2, 10**15)):
            tx.insert("idempotency_keys", {"env_id": env_id, "key": f"k{i}", "fingerprint": "f", "status": 201,
                                           "body": b"{}", "created_at_us": created})
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        assert tx.delete_idempotency_older_than(3) >= 2
    with pg.reader() as tx:  # type: ignore[attr-defined]
        left = tx.all("SELECT key FROM idempotency_keys WHERE env_id = :e", {"e": env_id})
    assert [row["key"] for row in left] == ["k2"]


def test_lock_end_user_excludes_select_for_update_of_the_same_end_user(pg: object) -> None:
    """Paths that lock several end users at once use SELECT … FOR UPDATE: the two locks conflict."""
    env_id, user = random.randrange(10**12, 10**13), "shared"
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        tx.lock_end_user(env_id, user, 1)

    def upsert(tx: Any) -> None:
        tx.lock_end_user(env_id, user, 2)
        tx.live_subscription(env_id, user)

    def select(tx: Any) -> None:
        tx.all("SELECT end_user_id FROM end_users WHERE env_id = :e AND end_user_id = :u FOR UPDATE",
               {"e": env_id, "u": user})

    assert in_turn(pg, upsert, select) == ["holder", "waiter"]


def _stored(tx: object, env_id: int, key: str) -> None:
    tx.insert("idempotency_keys", {"env_id": env_id, "key": key, "fingerprint": "f",  # type: ignore[attr-defined]
                                   "status": 201, "body": b"{}", "created_at_us": 1})


def test_the_claim_reads_the_stored_outcome_ahead_and_nothing_stale(pg: object) -> None:
    env_id = random.randrange(10**12, 10**13)
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        assert tx.try_lock_key(env_id, "k")
        _stored(tx, env_id, "k")  # written after the read-ahead: get() must not answer from it
        row = tx.get("idempotency_keys", env_id=env_id, key="k")
        assert row is not None and row["status"] == 201
    with pg.transaction() as tx:  # type: ignore[attr-defined]
        assert tx.try_lock_key(env_id, "k")
        row = tx.get("idempotency_keys", env_id=env_id, key="k")
        assert row is not None and row["fingerprint"] == "f"
        assert tx.try_lock_key(env_id, "other")
        assert tx.get("idempotency_keys", env_id=env_id, key="k") is not None  # not the other key's answer


def test_a_claim_granted_after_another_commits_sees_its_stored_outcome(pg: object) -> None:
    env_id, answers = random.randrange(10**12, 10**13), []
    claimed, finished = threading.Event(), threading.Event()

    def first() -> None:
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            assert tx.try_lock_key(env_id, "k")
            _stored(tx, env_id, "k")
            claimed.set()
            time.sleep(0.2)
        finished.set()

    def second() -> None:
        claimed.wait(5)
        while True:
            with pg.transaction() as tx:  # type: ignore[attr-defined]
                if tx.try_lock_key(env_id, "k"):
                    answers.append(tx.get("idempotency_keys", env_id=env_id, key="k"))
                    return
            answers.append("in use")
            finished.wait(5)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert answers[0] == "in use"
    assert isinstance(answers[-1], dict) and answers[-1]["status"] == 201


def test_idempotency_keys_can_be_claimed_in_environments_past_int4(pg: object) -> None:
    """Environment ids are BIGSERIAL; the advisory lock once took them as int4 and failed past 2**31 - 1."""
    for env_id in (1, 2**31 - 1, 2**31, 2**62):
        with pg.transaction() as tx:  # type: ignore[attr-defined]
            assert tx.try_lock_key(env_id, "k")
