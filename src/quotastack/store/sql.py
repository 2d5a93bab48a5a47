"""The unit of work, in SQL that SQLite and PostgreSQL both speak.

Statements use ``:name`` parameters; an adapter whose driver wants another style rewrites them
once (see ``database.py``). Table and column names come from this package only, never from a
request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from operator import itemgetter
from typing import Any

from ..service.ports import Row

_LIVE_STATUSES = ("trialing", "active", "paused")
# Tables that hold one end user's state: every change to them happens after ``lock_end_user``
# for that end user (PostgreSQL's row lock depends on it), which is how a unit of work knows
# whose cached checks its writes outdate. Writes to these others outdate nobody's check;
# writes to any other table (the catalog, keys, environments) may outdate everyone's.
_END_USER_TABLES = frozenset({"end_users", "subscriptions", "blocks", "ledger_entries", "reservations",
                              "reservation_holds", "allowance_windows", "usage_events", "refunds"})
_NO_CHECK_TABLES = frozenset({"events", "audit_log", "idempotency_keys"})


class SqlTx:
    """Implements ``service.ports.Tx`` over a DB-API cursor."""

    def __init__(self, cursor: Any, paramstyle: str = "named") -> None:
        self._cur = cursor
        self._pyformat = paramstyle == "pyformat"
        self._savepoints = 0
        # Whose entitlement checks this unit of work's writes may have changed (see
        # ``_END_USER_TABLES``): the end users it locked or wrote rows of, or everyone.
        self.touched_users: set[str] = set()
        self.wrote_end_user_state = False
        self.changed_everyone = False

    # ---- plumbing -------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return _to_pyformat(sql) if self._pyformat else sql

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._cur.execute(self._sql(sql), params or {})

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return list(self.execute(sql, params).fetchall())

    def one(self, sql: str, params: Mapping[str, Any] | None = None) -> Row | None:
        return self.execute(sql, params).fetchone()  # type: ignore[no-any-return]

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        row = self.execute(sql, params).fetchone()
        return None if row is None else next(iter(row.values())) if isinstance(row, dict) else row[0]

    def _wrote(self, table: str, rows: Sequence[Mapping[str, Any]] = ()) -> None:
        if table in _END_USER_TABLES:
            self.wrote_end_user_state = True
            # Rows that name their end user (every ledger entry does) count even without a lock.
            for row in rows:
                end_user_id = row.get("end_user_id")
                if end_user_id is not None:
                    self.touched_users.add(end_user_id)
        elif table not in _NO_CHECK_TABLES:
            self.changed_everyone = True

    def changed_users(self) -> set[str] | None:
        """The end users whose checks this unit of work may have changed; None for everyone."""
        if self.changed_everyone or (self.wrote_end_user_state and not self.touched_users):
            return None
        return self.touched_users if self.wrote_end_user_state else set()

    # ---- generic --------------------------------------------------------------------------

    def insert(self, table: str, row: Mapping[str, Any]) -> None:
        self._wrote(table, (row,))
        cols = ", ".join(row)
        vals = ", ".join(f":{c}" for c in row)
        self.execute(f"INSERT INTO {table} ({cols}) VALUES ({vals})", row)

    def insert_many(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        self._wrote(table, rows)
        # Positional parameters: binding fifteen names from a dict per row was a sizeable part of
        # a batch's inserts. Every row has the first row's columns.
        cols = list(rows[0])
        marks = ", ".join(["%s" if self._pyformat else "?"] * len(cols))
        values = itemgetter(*cols) if len(cols) > 1 else (lambda row: (row[cols[0]],))
        self._cur.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", list(map(values, rows)))

    def get(self, table: str, **where: Any) -> Row | None:
        cond = " AND ".join(f"{c} = :{c}" for c in where)
        return self.one(f"SELECT * FROM {table} WHERE {cond}", where)

    def update(self, table: str, where: Mapping[str, Any], values: Mapping[str, Any]) -> None:
        self._wrote(table)
        sets = ", ".join(f"{c} = :v_{c}" for c in values)
        cond = " AND ".join(f"{c} = :w_{c}" for c in where)
        params = {f"v_{c}": v for c, v in values.items()} | {f"w_{c}": v for c, v in where.items()}
        self.execute(f"UPDATE {table} SET {sets} WHERE {cond}", params)

    def page(self, table: str, env_id: int, filters: Mapping[str, Any], limit: int,
             starting_after: str | None,
             ranges: Mapping[str, tuple[int | None, int | None]] | None = None) -> list[Row]:
        """Newest first, ``limit + 1`` rows so the caller can tell whether there are more."""
        conds = ["env_id = :env_id"]
        params: dict[str, Any] = {"env_id": env_id, "limit": limit + 1}
        for col, value in filters.items():
            if value is not None:
                conds.append(f"{col} = :f_{col}")
                params[f"f_{col}"] = value
        for col, (low, high) in (ranges or {}).items():
            if low is not None:
                conds.append(f"{col} >= :lo_{col}")
                params[f"lo_{col}"] = low
            if high is not None:
                conds.append(f"{col} < :hi_{col}")
                params[f"hi_{col}"] = high
        if starting_after is not None:
            conds.append(f"seq < COALESCE((SELECT seq FROM {table} WHERE id = :after AND env_id = :env_id), 0)")
            params["after"] = starting_after
        sql = f"SELECT * FROM {table} WHERE {' AND '.join(conds)} ORDER BY seq DESC LIMIT :limit"
        return self.all(sql, params)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        self._savepoints += 1
        name = f"sp{self._savepoints}"
        self.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.execute(f"RELEASE SAVEPOINT {name}")
            raise
        else:
            self.execute(f"RELEASE SAVEPOINT {name}")

    # ---- balances ---------------------------------------------------------------------------

    # What ``lock_end_user``'s upsert does to an end user who exists: on SQLite nothing (the write
    # transaction already excludes every other writer).
    _ON_EXISTING_END_USER = "DO NOTHING"
    _FOR_UPDATE = ""  # a transaction holds SQLite's write lock from its BEGIN IMMEDIATE

    def lock_end_user(self, env_id: int, end_user_id: str, now_us: int) -> None:
        """Create the end user on first mention and serialise balance changes per end user."""
        self.touched_users.add(end_user_id)
        self._wrote("end_users")
        self.execute(
            "INSERT INTO end_users (env_id, end_user_id, created_at_us) VALUES (:e, :u, :n) "
            "ON CONFLICT (env_id, end_user_id) " + self._ON_EXISTING_END_USER,
            {"e": env_id, "u": end_user_id, "n": now_us},
        )

    # How ``existing_end_users`` locks the rows it finds (SQLite's write lock already has).
    _LOCK_IN_ORDER = ""

    def existing_end_users(self, env_id: int, end_user_ids: Sequence[str]) -> set[str]:
        """Which of these end users exist, each locked as ``lock_end_user`` would, in id order."""
        found: set[str] = set()
        for chunk in _chunks(sorted(set(end_user_ids))):
            params: dict[str, Any] = {"e": env_id}
            users = _in_list("u", chunk, params)
            rows = self.all(f"SELECT end_user_id FROM end_users WHERE env_id = :e AND end_user_id IN ({users})"
                            + self._LOCK_IN_ORDER, params)
            found.update(row["end_user_id"] for row in rows)
        self.touched_users.update(found)
        return found

    def set_remaining(self, pairs: Sequence[tuple[str, int]]) -> None:
        """Set blocks' ``remaining``: (block id, amount) pairs, one statement for all."""
        if pairs:
            self._wrote("blocks")
            mark = "%s" if self._pyformat else "?"
            self._cur.executemany(f"UPDATE blocks SET remaining = {mark} WHERE id = {mark}",
                                  [(amount, block_id) for block_id, amount in pairs])

    def try_lock_key(self, env_id: int, key: str) -> bool:
        """Claim an idempotency key for this transaction; SQLite's write lock already has."""
        return True

    def account_states(self, env_id: int, end_user_ids: Sequence[str], feature_keys: Sequence[str],
                       ) -> tuple[list[Row], list[Row]]:
        """What ``Account`` starts from, for every pair of these end users and features.

        The live blocks (creation order), and per (end user, feature) with held reservations what
        they hold and the earliest of their expiries (``first_expiry_us``).
        """
        blocks: list[Row] = []
        held: list[Row] = []
        for chunk in _chunks(list(end_user_ids)):
            params: dict[str, Any] = {"e": env_id}
            users = _in_list("u", chunk, params)
            features = _in_list("f", feature_keys, params)
            blocks += self.all(
                f"SELECT * FROM blocks WHERE env_id = :e AND end_user_id IN ({users}) "
                f"AND feature_key IN ({features}) AND status IN ('active', 'scheduled', 'frozen') ORDER BY seq",
                params)
            held += self.all(
                "SELECT r.end_user_id, r.charged_feature_key AS feature_key, COALESCE(SUM(h.amount), 0) AS reserved, "
                "MIN(r.expires_at_us) AS first_expiry_us FROM reservations r "
                "LEFT JOIN reservation_holds h ON h.reservation_id = r.id WHERE r.env_id = :e "
                f"AND r.end_user_id IN ({users}) AND r.charged_feature_key IN ({features}) AND r.status = 'held' "
                "GROUP BY r.end_user_id, r.charged_feature_key", params)
        return blocks, held

    def usage_state(self, env_id: int, end_user_id: str, feature_key: str) -> tuple[Row | None, list[Row]]:
        """What a usage of ``feature_key`` reads, in one statement; run after ``lock_end_user``.

        The head (None when the feature does not exist): the feature (``f_*`` columns) and its
        credit pool (``p_*``), the end user's live subscription (``s_id``, ``s_variant_id``,
        ``s_next_due_us``), whether a default plan would start for an end user without one
        (``default_plan``), the plan's entitlement rows for the feature and for its pool
        (``eo_*``, ``ep_*``: every column, NULL when absent) and what the end user's held
        reservations of the charged feature hold (``held_reserved``, ``held_first_expiry_us``,
        NULL when none). Then the charged feature's live blocks in creation order, each the
        row ``account_states`` reads.
        """
        rows = self.all(_USAGE_STATE, {"e": env_id, "u": end_user_id, "k": feature_key, "yes": True})
        if not rows:
            return None, []
        head = {c: rows[0][c] for c in _USAGE_HEAD}
        blocks = [{c: row[c] for c in row if c not in _USAGE_HEAD} for row in rows if row["id"] is not None]
        return head, blocks

    def entitlement_snapshot(self, env_id: int, end_user_id: str, feature_key: str, at_us: int) -> Row | None:
        """Everything the entitlement check needs, in one statement (the hot path).

        The feature and the pool it draws on, the end user's live subscription, the plan's terms
        for the feature and for its pool, and the spendable balance of the charged feature at
        ``at_us`` (usable blocks, plus what expired reservations hand back to usable blocks).
        None when the feature does not exist.
        """
        return self.one(
            _ENTITLEMENT_SNAPSHOT,
            {"e": env_id, "u": end_user_id, "k": feature_key, "t": at_us, "yes": True},
        )

    def check_snapshot(self, key_hash: str, end_user_id: str, feature_key: str, real_now_us: int,
                       horizon: bool = False) -> Row | None:
        """The API key's principal and ``entitlement_snapshot``, together: a check is one statement.

        The instant is the key's environment's (real time plus the sandbox clock's advance). The
        feature's columns are NULL when it does not exist; None when the key does not. With
        ``horizon``, the row also says when time alone next changes the answer (``h_*`` columns,
        in the environment's time; see ``entitlements.evaluate_until``): the snapshot stays true until then, or
        until a write.
        """
        return self.one(
            _CHECK_SNAPSHOT_HORIZON if horizon else _CHECK_SNAPSHOT,
            {"h": key_hash, "u": end_user_id, "k": feature_key, "now": real_now_us, "yes": True},
        )

    def check_snapshots(self, env_id: int, feature_key: str, at_us: int, after: str, limit: int) -> list[Row]:
        """``check_snapshot(horizon=True)``'s feature, subscription, balance and horizon columns at
        ``at_us`` (the environment's time) for up to ``limit`` of the environment's end users whose
        ids sort after ``after``, in id order, each row with its ``end_user_id``. No principal
        columns: no key is involved."""
        return self.all(_CHECK_SNAPSHOTS, {"e": env_id, "k": feature_key, "t": at_us, "after": after,
                                           "n": limit, "yes": True})

    def reserved_at(self, env_id: int, end_user_id: str, feature_key: str, at_us: int) -> int:
        """The reserved total at a past instant, from the ledger."""
        return int(self.scalar(
            "SELECT COALESCE(SUM(CASE WHEN type = 'reserve' THEN amount ELSE -amount END), 0) "
            "FROM ledger_entries WHERE env_id = :e AND end_user_id = :u AND feature_key = :f "
            "AND type IN ('reserve', 'commit', 'release') AND created_at_us <= :t",
            {"e": env_id, "u": end_user_id, "f": feature_key, "t": at_us}))

    def due_reservations(self, env_id: int, end_user_id: str, feature_key: str, now_us: int) -> list[Row]:
        return self.all(
            "SELECT * FROM reservations WHERE env_id = :e AND end_user_id = :u "
            "AND charged_feature_key = :f AND status = 'held' AND expires_at_us <= :n ORDER BY seq",
            {"e": env_id, "u": end_user_id, "f": feature_key, "n": now_us})

    def holds_of(self, reservation_id: str) -> list[Row]:
        return self.all("SELECT * FROM reservation_holds WHERE reservation_id = :r ORDER BY seq",
                        {"r": reservation_id})

    def due_accounts(self, env_id: int, now_us: int, limit: int, end_user_id: str | None = None) -> list[Row]:
        """(end user, feature) pairs with a grant, expiry or reservation expiry not yet written."""
        user = "" if end_user_id is None else " AND end_user_id = :u"
        return self.all(
            "SELECT end_user_id, feature_key FROM blocks WHERE env_id = :e AND ("
            "(status = 'scheduled' AND effective_at_us <= :n) OR "
            f"(status IN ('active', 'scheduled') AND expires_at_us <= :n)){user} "
            "UNION SELECT end_user_id, charged_feature_key FROM reservations WHERE env_id = :e "
            f"AND status = 'held' AND expires_at_us <= :n{user} LIMIT :l",
            {"e": env_id, "n": now_us, "l": limit, "u": end_user_id})

    def charges(self, env_id: int, column: str, object_id: str) -> list[Row]:
        """The use and commit entries of one usage or reservation, in order."""
        assert column in ("usage_id", "reservation_id")
        return self.all(
            f"SELECT * FROM ledger_entries WHERE env_id = :e AND {column} = :i "
            "AND type IN ('use', 'commit') ORDER BY seq", {"e": env_id, "i": object_id})

    def refunded(self, env_id: int, column: str, object_id: str) -> int:
        """What earlier refunds of one usage or reservation took (given back or lost)."""
        assert column in ("usage_id", "reservation_id")
        return int(self.scalar(f"SELECT COALESCE(SUM(requested), 0) FROM refunds WHERE env_id = :e "
                               f"AND {column} = :i", {"e": env_id, "i": object_id}))

    def environments(self) -> list[Row]:
        return self.all("SELECT * FROM environments ORDER BY id")

    def balances_at(self, env_id: int, end_user_id: str, at_us: int) -> list[Row]:
        """Per block usable at ``at_us``: what the ledger says it held at that instant."""
        return self.all(
            "SELECT b.id, b.feature_key, b.priority, b.effective_at_us, b.expires_at_us, b.source, "
            "b.original_amount, b.seq, b.subscription_id, b.created_at_us, "
            "COALESCE(SUM(CASE WHEN l.type IN ('grant', 'refund', 'rollover', 'release') THEN l.amount "
            "WHEN l.type IN ('use', 'expire', 'void', 'reserve') THEN -l.amount ELSE 0 END), 0) AS remaining "
            "FROM blocks b LEFT JOIN ledger_entries l ON l.block_id = b.id AND l.created_at_us <= :t "
            "WHERE b.env_id = :e AND b.end_user_id = :u AND b.effective_at_us <= :t "
            "AND (b.expires_at_us IS NULL OR b.expires_at_us > :t) "
            "GROUP BY b.id, b.feature_key, b.priority, b.effective_at_us, b.expires_at_us, b.source, "
            "b.original_amount, b.seq, b.subscription_id, b.created_at_us ORDER BY b.seq",
            {"e": env_id, "u": end_user_id, "t": at_us},
        )

    def feature_has_entries(self, env_id: int, feature_key: str) -> bool:
        return self.one(
            "SELECT 1 FROM blocks WHERE env_id = :e AND feature_key = :f LIMIT 1",
            {"e": env_id, "f": feature_key},
        ) is not None

    def subscription_blocks(self, subscription_id: str) -> list[Row]:
        return self.all(
            "SELECT * FROM blocks WHERE subscription_id = :s AND status IN ('active', 'scheduled', 'frozen') "
            "ORDER BY seq", {"s": subscription_id},
        )

    def usage_totals(self, env_id: int, end_user_id: str, feature_key: str, from_us: int | None,
                     to_us: int | None, charged_to: bool = False) -> dict[str, int]:
        """Usage of ``feature_key`` (or, ``charged_to``, all usage charged to its balance)."""
        column = "charged_feature_key" if charged_to else "feature_key"
        row = self.one(
            "SELECT COUNT(*) AS events, COALESCE(SUM(units), 0) AS units, COALESCE(SUM(amount), 0) AS amount, "
            "COALESCE(SUM(overage), 0) AS overage FROM usage_events WHERE env_id = :e "
            f"AND end_user_id = :u AND {column} = :f AND timestamp_us >= :lo AND timestamp_us < :hi",
            {"e": env_id, "u": end_user_id, "f": feature_key, "lo": -(2**62) if from_us is None else from_us,
             "hi": 2**62 if to_us is None else to_us},
        )
        assert row is not None
        return {"events": int(row["events"]), "units": int(row["units"]), "amount": int(row["amount"]),
                "overage": int(row["overage"])}

    # ---- subscription windows ---------------------------------------------------------------------

    def windows_of(self, subscription_id: str) -> list[Row]:
        return self.all("SELECT * FROM allowance_windows WHERE subscription_id = :s ORDER BY feature_key",
                        {"s": subscription_id})

    def upsert_window(self, subscription_id: str, feature_key: str, start_us: int, end_us: int,
                      used: int = 0) -> None:
        self._wrote("allowance_windows")
        self.execute(
            "INSERT INTO allowance_windows (subscription_id, feature_key, window_start_us, window_end_us, used) "
            "VALUES (:s, :f, :a, :b, :u) ON CONFLICT (subscription_id, feature_key) "
            "DO UPDATE SET window_start_us = :a, window_end_us = :b, used = :u",
            {"s": subscription_id, "f": feature_key, "a": start_us, "b": end_us, "u": used})

    def delete_windows(self, subscription_id: str, feature_key: str | None = None) -> None:
        self._wrote("allowance_windows")
        if feature_key is None:
            self.execute("DELETE FROM allowance_windows WHERE subscription_id = :s", {"s": subscription_id})
        else:
            self.execute("DELETE FROM allowance_windows WHERE subscription_id = :s AND feature_key = :f",
                         {"s": subscription_id, "f": feature_key})

    def shift_windows(self, subscription_id: str, by_us: int) -> None:
        self._wrote("allowance_windows")
        self.execute("UPDATE allowance_windows SET window_start_us = window_start_us + :d, "
                     "window_end_us = window_end_us + :d WHERE subscription_id = :s",
                     {"s": subscription_id, "d": by_us})

    def end_windows(self, subscription_id: str, at_us: int) -> None:
        self._wrote("allowance_windows")
        self.execute("UPDATE allowance_windows SET window_end_us = :t WHERE subscription_id = :s",
                     {"s": subscription_id, "t": at_us})

    def due_subscriptions(self, env_id: int, now_us: int, limit: int) -> list[Row]:
        return self.all(
            "SELECT * FROM subscriptions WHERE env_id = :e AND next_due_us <= :n ORDER BY next_due_us LIMIT :l",
            {"e": env_id, "n": now_us, "l": limit})

    # ---- plans and subscriptions -------------------------------------------------------------

    def live_subscription(self, env_id: int, end_user_id: str) -> Row | None:
        return self.one(
            "SELECT * FROM subscriptions WHERE env_id = :e AND end_user_id = :u AND live = :t",
            {"e": env_id, "u": end_user_id, "t": True},
        )

    def live_subscriptions(self, env_id: int, end_user_ids: Sequence[str]) -> list[Row]:
        rows: list[Row] = []
        for chunk in _chunks(list(end_user_ids)):
            params: dict[str, Any] = {"e": env_id, "t": True}
            users = _in_list("u", chunk, params)
            rows += self.all(
                f"SELECT * FROM subscriptions WHERE env_id = :e AND end_user_id IN ({users}) AND live = :t", params)
        return rows

    def default_variant(self, env_id: int) -> Row | None:
        return self.one(
            "SELECT v.* FROM plans p JOIN plan_variants v ON v.plan_id = p.id "
            "WHERE p.env_id = :e AND p.is_default = :t ORDER BY v.seq LIMIT 1",
            {"e": env_id, "t": True},
        )

    def entitlements_of(self, variant_id: str) -> list[Row]:
        return self.all("SELECT * FROM variant_entitlements WHERE variant_id = :v ORDER BY position",
                        {"v": variant_id})

    def entitlement(self, variant_id: str, feature_key: str) -> Row | None:
        return self.one(
            "SELECT * FROM variant_entitlements WHERE variant_id = :v AND feature_key = :f",
            {"v": variant_id, "f": feature_key},
        )

    # ---- keys -----------------------------------------------------------------------------------

    def next_key_seq(self, env_id: int) -> int:
        return int(self.scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM api_keys WHERE env_id = :e", {"e": env_id}))

    def lock_environment(self, env_id: int) -> Row | None:
        """The environment's row, locked until the unit of work ends (SQLite's write lock already
        is; PostgreSQL: ``FOR UPDATE``)."""
        return self.one("SELECT * FROM environments WHERE id = :e" + self._FOR_UPDATE, {"e": env_id})

    def key_principal(self, key_hash: str) -> Row | None:
        return self.one(_KEY_PRINCIPAL, {"h": key_hash})

    def key_principal_later(self, key_hash: str) -> Callable[[], Row | None]:
        """``key_principal``, whose answer is collected later: here it is read at once."""
        row = self.key_principal(key_hash)
        return lambda: row

    def key_principals(self) -> list[Row]:
        """``key_principal`` of every key (revoked ones too), each with its ``key_hash``."""
        return self.all("SELECT k.key_hash, " + _PRINCIPAL + _PRINCIPAL_FROM + "ORDER BY k.env_id, k.seq")

    # ---- housekeeping -------------------------------------------------------------------------

    def delete_idempotency_older_than(self, cutoff_us: int) -> int:
        return int(self.execute("DELETE FROM idempotency_keys WHERE created_at_us < :c",
                                {"c": cutoff_us}).rowcount)


# An API key's principal: its columns, and where they come from.
_PRINCIPAL = "k.id AS key_id, k.env_id, k.scopes, k.revoked_at_us, e.tenant_id, e.kind, e.clock_offset_us "
_PRINCIPAL_FROM = "FROM api_keys k JOIN environments e ON e.id = k.env_id "
# The entitlement check's columns; ``{env}``, ``{t}`` and ``{u}`` are the environment, the instant
# and the end user.
_SNAPSHOT = (
    "f.key AS f_key, f.type AS f_type, f.precision AS f_precision, f.credit_pool AS f_pool, "
    "f.credits_per_unit AS f_rate, pf.precision AS pool_precision, "
    "s.id AS sub_id, s.status AS sub_status, s.anchor_us, s.current_period_start_us, "
    "s.current_period_end_us, s.trial_end_us, s.timezone, "
    "CASE WHEN s.next_due_us <= {t} OR (s.id IS NULL AND EXISTS (SELECT 1 FROM plans p "
    "JOIN plan_variants v ON v.plan_id = p.id WHERE p.env_id = {env} AND p.is_default = :yes)) "
    "THEN 1 ELSE 0 END AS needs_write, "
    "eo.enabled AS own_enabled, eo.unlimited AS own_unlimited, eo.amount AS own_amount, "
    "eo.overage AS own_overage, eo.reset AS own_reset, "
    "ep.enabled AS pool_enabled, ep.unlimited AS pool_unlimited, ep.amount AS pool_amount, "
    "ep.overage AS pool_overage, ep.reset AS pool_reset, "
    "(SELECT COALESCE(SUM(b.remaining), 0) FROM blocks b WHERE b.env_id = {env} AND b.end_user_id = {u} "
    "AND b.feature_key = COALESCE(f.credit_pool, f.key) AND b.status IN ('active', 'scheduled') "
    "AND b.effective_at_us <= {t} AND (b.expires_at_us IS NULL OR b.expires_at_us > {t})) AS free, "
    "(SELECT COALESCE(SUM(h.amount), 0) FROM reservations r "
    "JOIN reservation_holds h ON h.reservation_id = r.id JOIN blocks b ON b.id = h.block_id "
    "WHERE r.env_id = {env} AND r.end_user_id = {u} AND r.charged_feature_key = COALESCE(f.credit_pool, f.key) "
    # The unary + keeps the planner on the end user's index, not every due reservation's.
    "AND r.status = 'held' AND +r.expires_at_us <= {t} AND b.status IN ('active', 'scheduled') "
    "AND b.effective_at_us <= {t} AND (b.expires_at_us IS NULL OR b.expires_at_us > {t})) AS returned "
)
_SNAPSHOT_JOINS = (
    "LEFT JOIN features pf ON pf.env_id = f.env_id AND pf.key = f.credit_pool "
    "LEFT JOIN subscriptions s ON s.env_id = f.env_id AND s.end_user_id = {u} AND s.live = :yes "
    "LEFT JOIN variant_entitlements eo ON eo.variant_id = s.variant_id AND eo.feature_key = f.key "
    "LEFT JOIN variant_entitlements ep ON ep.variant_id = s.variant_id AND ep.feature_key = f.credit_pool "
)
# When time alone next changes a check's answer: the subscription's next boundary, the next block
# of the charged feature to take effect or to expire (a block yet to take effect changes the
# answer first then), the next held reservation to expire. The unary + and the "+ 0" keep the
# planner on the end user's indexes, not on the sweep's "due" ones (which it would otherwise walk
# in expiry order for the minimum).
_HORIZON = (
    ", s.next_due_us AS h_due, "
    "(SELECT MIN(CASE WHEN b.effective_at_us > {t} THEN b.effective_at_us "
    "WHEN +b.expires_at_us > {t} THEN b.expires_at_us END) FROM blocks b "
    "WHERE b.env_id = {env} AND b.end_user_id = {u} AND b.feature_key = COALESCE(f.credit_pool, f.key) "
    "AND b.status IN ('active', 'scheduled')) AS h_blocks, "
    "(SELECT MIN(r.expires_at_us + 0) FROM reservations r WHERE r.env_id = {env} AND r.end_user_id = {u} "
    "AND r.charged_feature_key = COALESCE(f.credit_pool, f.key) AND r.status = 'held' "
    "AND +r.expires_at_us > {t}) AS h_reservation "
)
# The statements are built once: formatting them per check cost more than a tenth of a check.
_ENTITLEMENT_SNAPSHOT = ("SELECT " + _SNAPSHOT.format(env=":e", t=":t", u=":u") + "FROM features f "
                         + _SNAPSHOT_JOINS.format(u=":u") + "WHERE f.env_id = :e AND f.key = :k")
_CHECK_FROM = (", " + _PRINCIPAL + _PRINCIPAL_FROM + "LEFT JOIN features f ON f.env_id = k.env_id AND f.key = :k "
               + _SNAPSHOT_JOINS.format(u=":u") + "WHERE k.key_hash = :h")
_CHECK_AT = {"env": "k.env_id", "t": "(:now + e.clock_offset_us)", "u": ":u"}
_CHECK_SNAPSHOT = "SELECT " + _SNAPSHOT.format(**_CHECK_AT) + _CHECK_FROM
_CHECK_SNAPSHOT_HORIZON = "SELECT " + _SNAPSHOT.format(**_CHECK_AT) + _HORIZON.format(**_CHECK_AT) + _CHECK_FROM
# The same snapshot and horizon for a run of an environment's end users, in id order (what the
# check's answers kept on SQLite are warmed from; see ``SqlTx.check_snapshots``).
_EACH_USER = {"env": ":e", "t": ":t", "u": "eu.end_user_id"}
_CHECK_SNAPSHOTS = (
    "SELECT eu.end_user_id AS end_user_id, " + _SNAPSHOT.format(**_EACH_USER) + _HORIZON.format(**_EACH_USER)
    + "FROM end_users eu JOIN features f ON f.env_id = eu.env_id AND f.key = :k "
    + _SNAPSHOT_JOINS.format(u="eu.end_user_id")
    + "WHERE eu.env_id = :e AND eu.end_user_id > :after ORDER BY eu.end_user_id LIMIT :n"
)

# ``usage_state``: one row per live block of the charged feature (one with NULL block columns when
# there is none), each with the same head. What held reservations hold is two scalar subqueries
# (evaluated per row, and an end user has a handful of live blocks): a grouped derived table
# joined instead cost SQLite a temporary index on every call.
_FEATURE_COLUMNS = ("key", "type", "precision", "unit", "credit_pool", "credits_per_unit")
_ENTITLEMENT_COLUMNS = ("variant_id", "feature_key", "position", "amount", "enabled", "unlimited", "priority",
                        "max_balance", "overage", "reset", "rollover", "pricing")
_USAGE_HEAD = (tuple(f"f_{c}" for c in _FEATURE_COLUMNS) + tuple(f"p_{c}" for c in _FEATURE_COLUMNS)
               + ("s_id", "s_variant_id", "s_next_due_us", "default_plan")
               + tuple(f"eo_{c}" for c in _ENTITLEMENT_COLUMNS) + tuple(f"ep_{c}" for c in _ENTITLEMENT_COLUMNS)
               + ("held_reserved", "held_first_expiry_us"))
_USAGE_STATE = (
    "SELECT " + ", ".join(f"f.{c} AS f_{c}" for c in _FEATURE_COLUMNS) + ", "
    + ", ".join(f"pf.{c} AS p_{c}" for c in _FEATURE_COLUMNS) + ", "
    "s.id AS s_id, s.variant_id AS s_variant_id, s.next_due_us AS s_next_due_us, "
    "CASE WHEN s.id IS NULL AND EXISTS (SELECT 1 FROM plans p JOIN plan_variants v ON v.plan_id = p.id "
    "WHERE p.env_id = :e AND p.is_default = :yes) THEN 1 ELSE 0 END AS default_plan, "
    + ", ".join(f"eo.{c} AS eo_{c}" for c in _ENTITLEMENT_COLUMNS) + ", "
    + ", ".join(f"ep.{c} AS ep_{c}" for c in _ENTITLEMENT_COLUMNS) + ", "
    "(SELECT COALESCE(SUM(h.amount), 0) FROM reservations r JOIN reservation_holds h ON h.reservation_id = r.id "
    "WHERE r.env_id = :e AND r.end_user_id = :u AND r.charged_feature_key = COALESCE(f.credit_pool, f.key) "
    "AND r.status = 'held') AS held_reserved, "
    "(SELECT MIN(r.expires_at_us + 0) FROM reservations r WHERE r.env_id = :e AND r.end_user_id = :u "
    "AND r.charged_feature_key = COALESCE(f.credit_pool, f.key) AND r.status = 'held') AS held_first_expiry_us, b.* "
    "FROM features f " + _SNAPSHOT_JOINS.format(u=":u")
    + "LEFT JOIN blocks b ON b.env_id = f.env_id AND b.end_user_id = :u "
    "AND b.feature_key = COALESCE(f.credit_pool, f.key) AND b.status IN ('active', 'scheduled', 'frozen') "
    "WHERE f.env_id = :e AND f.key = :k ORDER BY b.seq"
)

_KEY_PRINCIPAL = "SELECT " + _PRINCIPAL + _PRINCIPAL_FROM + "WHERE k.key_hash = :h"

_PARAM = re.compile(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)")


def _chunks(values: list[Any], size: int = 400) -> list[list[Any]]:
    """``values`` in runs of at most ``size``: an IN list stays under any SQLite's 999 parameters."""
    return [values[i:i + size] for i in range(0, len(values), size)]


def _in_list(prefix: str, values: Sequence[Any], params: dict[str, Any]) -> str:
    """``:prefix0, :prefix1, …`` for an ``IN (…)`` list, adding the values to ``params``.

    The list is padded to a multiple of 16 (beyond 8 values) by repeating its last value, which
    changes nothing an ``IN`` matches: a batch's statements then come in a few lengths, each
    prepared once and kept by the driver, instead of a new statement text (parsed and planned
    again, ~100 µs for a hundred values) for every count of end users.
    """
    assert values, "an IN list needs at least one value"
    count = len(values)
    padded = count if count <= 8 else -(-count // 16) * 16
    for i, value in enumerate(values):
        params[f"{prefix}{i}"] = value
    for i in range(count, padded):
        params[f"{prefix}{i}"] = values[-1]
    return _in_marks(prefix, padded)


@lru_cache(maxsize=256)
def _in_marks(prefix: str, count: int) -> str:
    return ", ".join(f":{prefix}{i}" for i in range(count))


@lru_cache(maxsize=2048)
def _to_pyformat(sql: str) -> str:
    """``:name`` to ``%(name)s``, once per distinct statement (the hot path repeats a few dozen)."""
    return _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))
