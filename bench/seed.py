"""Seed a QuotaStack SQLite database with N end users and 10·N ledger entries, fast.

The catalog (tenant, feature, plan, variant) and one template end user are created through the
real HTTP API of a running server; the template's subscription, block, ledger and usage rows are
then read back and replicated with ``sqlite3.executemany`` in one transaction, so every seeded row
has exactly the shape the service itself writes.

Per seeded end user ``user_NNNNNN``:

* one ``end_users`` row and one live subscription on the ``pro_yearly`` variant (period = the
  template's current period, which contains "now" for months);
* one plan block of ``ALLOWANCE`` credits of ``api_calls`` (status ``active``);
* one ``grant`` ledger entry (balance_after = ALLOWANCE) and ``entries_per_user - 1`` ``use``
  entries, each with its ``usage_events`` row, whose amounts add up to the block's consumed part;
  ``balance_after`` is the running balance, so for every end user
  ``grants − uses = block.remaining = last balance_after`` (the ledger's conservation identity).

Events and audit-log rows are not replicated: the check and usage paths never read them.
"""

from __future__ import annotations

import base64
import json
import os
import random
import sqlite3
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

FEATURE_KEY = "api_calls"
ALLOWANCE = 1_000_000_000  # far more than any benchmark run can draw
USER_FORMAT = "user_{:06d}"
TEMPLATE_USER = "bench_template"

_RFC = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_CROCKFORD = b"0123456789abcdefghjkmnpqrstvwxyz"
_TO_CROCKFORD = bytes.maketrans(_RFC, _CROCKFORD)


def make_ids(prefix: str, millis: list[int]) -> list[str]:
    """IDs in the service's format (``prefix_`` + 10 chars of ms time + 16 random chars), in bulk."""
    n = len(millis)
    # 10 base32 chars of time = the top 50 bits of an 80-bit (10-byte, 16-char) big-endian number.
    times = base64.b32encode(b"".join((m << 30).to_bytes(10, "big") for m in millis)).translate(_TO_CROCKFORD)
    rand = base64.b32encode(os.urandom(10 * n)).translate(_TO_CROCKFORD)
    p = prefix + "_"
    return [p + times[16 * i:16 * i + 10].decode() + rand[16 * i:16 * i + 16].decode() for i in range(n)]


# ---- the HTTP part ----------------------------------------------------------------------------


def http_json(base: str, method: str, path: str, key: str | None, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"seeding: {method} {path} answered {exc.code}: {exc.read()[:500]!r}") from None


@dataclass
class Catalog:
    api_key: str
    variant_id: str
    plan_id: str
    env_id: int


def create_catalog(base: str, operator_key: str) -> Catalog:
    tenant = http_json(base, "POST", "/v1/tenants", operator_key, {"name": "bench"})
    key = next(k["key"] for k in tenant["api_keys"] if k["environment"] == "sandbox")
    http_json(base, "POST", "/v1/features", key,
              {"key": FEATURE_KEY, "name": "API calls", "type": "metered", "unit": "call", "precision": 0})
    plan = http_json(base, "POST", "/v1/plans", key, {"key": "pro", "name": "Pro"})
    variant = http_json(base, "POST", f"/v1/plans/{plan['id']}/variants", key, {
        "key": "pro_yearly", "price": {"amount": 200, "currency": "USD"},
        "billing_period": {"every": 1, "unit": "year"},
        "entitlements": [{"feature_key": FEATURE_KEY, "amount": ALLOWANCE}],
    })
    # The template: a subscription started 10 days ago, and one usage.
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 10 * 86400))
    http_json(base, "POST", "/v1/subscriptions", key,
              {"end_user_id": TEMPLATE_USER, "plan_variant_id": variant["id"], "start_at": start})
    http_json(base, "POST", "/v1/usage", key, {"end_user_id": TEMPLATE_USER, "feature_key": FEATURE_KEY, "units": 3})
    return Catalog(key, variant["id"], plan["id"], 0)


# ---- the bulk part ----------------------------------------------------------------------------


def _template(conn: sqlite3.Connection, table: str, where: str = "end_user_id = ?",
              args: tuple[Any, ...] = (TEMPLATE_USER,)) -> dict[str, Any]:
    conn.row_factory = sqlite3.Row
    row = conn.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY seq LIMIT 1", args).fetchone()
    conn.row_factory = None
    assert row is not None, f"no template row in {table}"
    return dict(row)


def bulk_seed(path: str, users: int, entries_per_user: int, rng_seed: int = 42) -> dict[str, Any]:
    """Replicate the template end user ``users`` times, straight into the SQLite file at ``path``."""
    assert entries_per_user >= 1  # the grant, then entries_per_user - 1 uses
    rng = random.Random(rng_seed)
    conn = sqlite3.connect(path, isolation_level=None)
    sub_t = _template(conn, "subscriptions")
    blk_t = _template(conn, "blocks")
    grant_t = _template(conn, "ledger_entries", "end_user_id = ? AND type = 'grant'")
    use_t = _template(conn, "ledger_entries", "end_user_id = ? AND type = 'use'")
    usage_t = _template(conn, "usage_events")
    env_id = sub_t["env_id"]
    now_us = time.time_ns() // 1000
    period_start = sub_t["current_period_start_us"]
    # Every seeded end user subscribed in the first third of [period start, now - 1 h] and used the
    # feature between then and now - 1 h.
    last_us = now_us - 3_600_000_000
    span = last_us - period_start
    assert span > 0

    uses = entries_per_user - 1
    sub_at = [period_start + rng.randrange(span // 3) for _ in range(users)]
    use_at: list[int] = []
    use_amount: list[int] = []
    for i in range(users):
        t0 = sub_at[i]
        step = (last_us - t0) // (uses + 1)
        use_at.extend(t0 + step * (k + 1) + rng.randrange(step // 2) for k in range(uses))
        use_amount.extend(rng.randint(1, 200) for _ in range(uses))
    sub_ids = make_ids("sub", [t // 1000 for t in sub_at])
    blk_ids = make_ids("blk", [t // 1000 for t in sub_at])
    grant_ids = make_ids("led", [t // 1000 for t in sub_at])
    use_led_ids = make_ids("led", [t // 1000 for t in use_at])
    usage_ids = make_ids("use", [t // 1000 for t in use_at])

    sub_cols = [c for c in sub_t if c != "seq"]
    blk_cols = [c for c in blk_t if c != "seq"]
    led_cols = [c for c in grant_t if c != "seq"]
    use_cols = [c for c in usage_t if c != "seq"]

    end_user_rows = []
    sub_rows = []
    blk_rows = []
    led_rows = []
    usage_rows = []
    for i in range(users):
        uid = USER_FORMAT.format(i)
        t0 = sub_at[i]
        end_user_rows.append((env_id, uid, t0))
        s = dict(sub_t, id=sub_ids[i], end_user_id=uid, created_at_us=t0)
        sub_rows.append(tuple(s[c] for c in sub_cols))
        j0 = i * uses
        consumed = sum(use_amount[j0:j0 + uses])
        b = dict(blk_t, id=blk_ids[i], end_user_id=uid, original_amount=ALLOWANCE,
                 remaining=ALLOWANCE - consumed, subscription_id=sub_ids[i], created_at_us=t0)
        blk_rows.append(tuple(b[c] for c in blk_cols))
        g = dict(grant_t, id=grant_ids[i], end_user_id=uid, block_id=blk_ids[i], amount=ALLOWANCE,
                 balance_after=ALLOWANCE, reserved_after=0, subscription_id=sub_ids[i], created_at_us=t0)
        led_rows.append(tuple(g[c] for c in led_cols))
        balance = ALLOWANCE
        for j in range(j0, j0 + uses):
            amount, at = use_amount[j], use_at[j]
            balance -= amount
            u = dict(use_t, id=use_led_ids[j], end_user_id=uid, block_id=blk_ids[i], amount=amount,
                     balance_after=balance, reserved_after=0, usage_id=usage_ids[j],
                     subscription_id=sub_ids[i], created_at_us=at)
            led_rows.append(tuple(u[c] for c in led_cols))
            e = dict(usage_t, id=usage_ids[j], end_user_id=uid, units=amount, amount=amount, overage=0,
                     timestamp_us=at, created_at_us=at)
            usage_rows.append(tuple(e[c] for c in use_cols))
        assert balance == ALLOWANCE - consumed

    def insert(table: str, cols: list[str], rows: list[tuple[Any, ...]]) -> None:
        marks = ", ".join("?" for _ in cols)
        conn.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", rows)

    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1048576")
    tables = ("end_users", "subscriptions", "blocks", "ledger_entries", "usage_events")
    # Secondary indexes are dropped during the load and rebuilt after it (same DDL): much faster.
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN "
        f"({', '.join('?' for _ in tables)})", tables).fetchall()
    conn.execute("BEGIN")
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    insert("end_users", ["env_id", "end_user_id", "created_at_us"], end_user_rows)
    insert("subscriptions", sub_cols, sub_rows)
    insert("blocks", blk_cols, blk_rows)
    insert("ledger_entries", led_cols, led_rows)
    insert("usage_events", use_cols, usage_rows)
    for _, sql in indexes:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode=WAL")
    stats = verify(conn, env_id)
    conn.close()
    return {"env_id": env_id, "period_end_us": sub_t["current_period_end_us"], "allowance": ALLOWANCE, **stats}


def verify(conn: sqlite3.Connection, env_id: int) -> dict[str, Any]:
    """Conservation, globally and per end user: grants − uses = remaining = last balance_after."""
    ledger = conn.execute("SELECT COUNT(*) FROM ledger_entries").fetchone()[0]
    n_users = conn.execute("SELECT COUNT(*) FROM end_users").fetchone()[0]
    net = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN type IN ('grant','refund','rollover','release') THEN amount "
        "WHEN type IN ('use','expire','void','reserve') THEN -amount ELSE 0 END), 0) FROM ledger_entries "
        "WHERE env_id = ?", (env_id,)).fetchone()[0]
    remaining = conn.execute("SELECT COALESCE(SUM(remaining), 0) FROM blocks WHERE env_id = ? AND status = 'active'",
                             (env_id,)).fetchone()[0]
    if net != remaining:
        raise AssertionError(f"conservation broken: ledger net {net} != blocks remaining {remaining}")
    # Per end user, on a sample: the last entry's balance_after is the block's remaining.
    bad = conn.execute(
        "SELECT b.end_user_id FROM blocks b WHERE b.env_id = ? AND b.rowid % 997 = 1 AND b.remaining != "
        "(SELECT l.balance_after FROM ledger_entries l WHERE l.env_id = b.env_id AND "
        "l.end_user_id = b.end_user_id AND l.feature_key = b.feature_key ORDER BY l.seq DESC LIMIT 1)",
        (env_id,)).fetchall()
    if bad:
        raise AssertionError(f"balance_after does not match remaining for {bad[:5]}")
    return {"ledger_entries": ledger, "end_users": n_users, "ledger_net": net}
