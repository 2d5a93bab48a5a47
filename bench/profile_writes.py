#!/usr/bin/env python3
"""Where a usage's (and a batch's) server time goes: in-process, no HTTP, on a fresh database.

    .venv/bin/python bench/profile_writes.py [--n 3000] [--batches 30] [--cprofile] [--sql] [--url URL]

Builds the same data as ``bench_writes.py`` (one tenant, the ``tokens`` feature, 1,000 funded end
users) through the service's ASGI app, then calls the app directly (the ``Edge`` object that
``quotastack serve`` runs) with ``POST /v1/usage`` for random end users and ``POST
/v1/usage/batch`` with 100 events: exactly what ``Server-Timing`` measures. ``--sql`` prints the
statements one usage and one batch run (on PostgreSQL also the round trips: each read that waits
for the server, each commit); ``--cprofile`` adds a cProfile table of each. By default it works on
a SQLite file in a temporary directory and starts no process; ``--url postgresql://…`` runs the
same against that (empty, migrated here) PostgreSQL database instead, e.g. under
``scripts/with-postgres`` with ``--url "$QUOTASTACK_TEST_POSTGRES_URL"``. It also reports the CPU
time the process spent per request (on PostgreSQL the server's backends are not included).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import random
import statistics
import tempfile
import time
from typing import Any

USERS = 1_000
SORT = "tottime"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--sql", action="store_true")
    parser.add_argument("--sort", default="tottime", help="cProfile order: tottime or cumulative")
    parser.add_argument("--url", default="", help="a PostgreSQL URL to profile instead of a SQLite file")
    args = parser.parse_args()
    global SORT
    SORT = args.sort

    from quotastack.api import create_app
    from quotastack.api.app import Settings
    from quotastack.store import open_database

    folder = tempfile.mkdtemp(prefix="qs-prof-")
    db = open_database(args.url or f"sqlite:///{folder}/p.db")
    if args.url:
        db.migrate()  # type: ignore[attr-defined]
        if args.cprofile:
            # Store work inline on the event loop's thread, where cProfile sees it (the pool's
            # threads it would not); waiting for the server shows as psycopg's wait.
            async def inline(fn: Any, *fn_args: Any) -> Any:
                return db.retrying(fn, *fn_args)  # type: ignore[attr-defined]

            db.run = inline  # type: ignore[method-assign]
    edge = create_app(db, Settings(operator_key="op", sweep_interval_seconds=0))
    sink: list[Any] = []
    loop = asyncio.new_event_loop()

    def call(method: str, path: str, body: Any, key: str) -> tuple[int, Any]:
        raw = json.dumps(body).encode()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sink.append(message)

        scope = {"type": "http", "method": method, "path": path, "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {key}".encode()),
                             (b"content-type", b"application/json")]}
        sink.clear()
        loop.run_until_complete(edge(scope, receive, send))
        return sink[0]["status"], json.loads(sink[-1]["body"] or b"null")

    status, created = call("POST", "/v1/tenants", {"name": "prof"}, "op")
    assert status == 201, created
    key = created["api_keys"][0]["key"]
    assert call("POST", "/v1/features", {"key": "tokens"}, key)[0] == 201
    for i in range(USERS):
        assert call("POST", "/v1/grants", {"end_user_id": f"u{i}", "feature_key": "tokens",
                                           "amount": 10**12}, key)[0] == 201
    rng = random.Random(1)

    def usage() -> None:
        status, body = call("POST", "/v1/usage", {"end_user_id": f"u{rng.randrange(USERS)}",
                                                  "feature_key": "tokens", "units": 1}, key)
        assert status == 201, body

    def batch() -> None:
        events = [{"end_user_id": f"u{rng.randrange(USERS)}", "feature_key": "tokens", "units": 1}
                  for _ in range(100)]
        status, body = call("POST", "/v1/usage/batch", {"events": events}, key)
        assert status == 200 and all(r["status"] == 201 for r in body["results"]), body

    def timed(fn: Any, n: int) -> list[float]:
        out = []
        cpu0 = time.process_time()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            fn()
            out.append((time.perf_counter_ns() - t0) / 1000)
        cpu_us.append((time.process_time() - cpu0) * 1e6 / n)
        return sorted(out)

    cpu_us: list[float] = []

    def show(name: str, values: list[float], per: int = 1) -> None:
        print(f"{name:28} mean {statistics.fmean(values) / per:8.1f} µs  p50 {values[len(values) // 2] / per:8.1f}"
              f"  p99 {values[int(len(values) * 0.99)] / per:8.1f}  (per {'event' if per > 1 else 'request'})"
              f"  process CPU {cpu_us[-1] / per:8.1f} µs")

    timed(usage, 300)
    show("usage", timed(usage, args.n))
    timed(batch, 3)
    show("batch of 100", timed(batch, args.batches), per=100)

    if args.sql and args.url:
        trace_postgres(usage, batch)
    elif args.sql:
        conn = db._connection()
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        usage()
        print(f"\none usage: {len(statements)} statements")
        for s in statements:
            print("   ", s[:160])
        statements.clear()
        batch()
        print(f"\none batch of 100: {len(statements)} statements")
        for s in statements[:40]:
            print("   ", s[:160])
        conn.set_trace_callback(None)
    if args.cprofile:
        for name, fn, n in (("usage", usage, 2000), ("batch", batch, 20)):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                fn()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(SORT).print_stats(40)
            print(f"\n---- cProfile: {n} × {name}, by own time\n{out.getvalue()[:6000]}")


def trace_postgres(usage: Any, batch: Any) -> None:
    """The statements and round trips of one usage and one batch, on PostgreSQL."""
    import psycopg
    from psycopg._pipeline import BasePipeline

    log: list[str] = []
    cursor_execute, cursor_executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany
    fetch_gen, sync_gen = BasePipeline._fetch_gen, BasePipeline._sync_gen

    def execute(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        log.append(("    " if self.connection._pipeline else "  * ") + str(query)[:150])
        if not self.connection._pipeline:
            log.append("  -- round trip (not pipelined)")
        return cursor_execute(self, query, params, **kw)

    def executemany(self: Any, query: Any, params_seq: Any, **kw: Any) -> Any:
        params_seq = list(params_seq)
        log.append(f"    {str(query)[:130]} × {len(params_seq)}")
        return cursor_executemany(self, query, params_seq, **kw)

    def fetch(self: Any, flush: bool) -> Any:
        if flush and self.result_queue:
            log.append("  -- round trip (a read)")
        return fetch_gen(self, flush=flush)

    def sync(self: Any) -> Any:
        log.append("  -- round trip (sync: the commit, or the end of the pipeline)")
        return sync_gen(self)

    psycopg.Cursor.execute, psycopg.Cursor.executemany = execute, executemany  # type: ignore[method-assign]
    BasePipeline._fetch_gen, BasePipeline._sync_gen = fetch, sync  # type: ignore[method-assign]
    try:
        for name, fn in (("one usage", usage), ("one batch of 100", batch)):
            log.clear()
            fn()
            trips = sum(line.startswith("  --") for line in log)
            print(f"\n{name}: {len(log) - trips} statements, {trips} round trips (* = outside the pipeline)")
            print("\n".join(log[:60]))
    finally:
        psycopg.Cursor.execute, psycopg.Cursor.executemany = cursor_execute, cursor_executemany  # type: ignore[method-assign]
        BasePipeline._fetch_gen, BasePipeline._sync_gen = fetch_gen, sync_gen  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
