#!/usr/bin/env python3
"""Where the entitlement check's server time goes: in-process, no HTTP, on a seeded DB.

    .venv/bin/python bench/profile_check.py [--db bench/.cache/seed-100000u-10e-….db] [--n 20000]
                                           [--cprofile] [--py-spy-seconds 20] [--src DIR]

Calls the service's ASGI app (the same ``Edge`` object ``quotastack serve`` runs) directly with
check requests for random seeded end users, which is exactly what ``Server-Timing`` measures, and
times the pieces of the path separately (authentication, the entitlement read, JSON, metrics) so
their sum can be compared with the whole. ``--cprofile`` adds a cProfile table of the whole path.
``--py-spy-seconds N`` instead starts the real server on a copy of the DB, drives it with wrk
(64 connections) and records a py-spy profile of the server process (py-spy must be installed in
the venv: ``.venv/bin/pip install py-spy``; it is not a project dependency).

It never writes to the DB it is given (it works on a copy) and starts no process in the
in-process mode.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))


def latest_db() -> Path:
    dbs = sorted((BENCH / ".cache").glob("seed-*u-*e-*.db"), key=lambda p: p.stat().st_size)
    if not dbs:
        raise SystemExit("no seeded DB in bench/.cache: run bench/bench_core.py first")
    return dbs[-1]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))]


def fmt_us(values: list[float]) -> str:
    return (f"mean {statistics.fmean(values):7.1f} µs  p50 {pct(values, 50):7.1f}  p99 {pct(values, 99):7.1f}")


def in_process(db_path: Path, meta: dict[str, Any], n: int, use_cprofile: bool) -> None:
    from quotastack.api import create_app
    from quotastack.api.app import Settings
    from quotastack.service import entitlements, tenants
    from quotastack.store import open_database
    from quotastack.api.render import dumps

    db = open_database(f"sqlite:///{db_path}")
    edge = create_app(db, Settings())
    key = meta["api_key"]
    feature = meta["feature_key"]
    users = [f"user_{random.randrange(meta['users']):06d}" for _ in range(n)]
    auth_header = f"Bearer {key}".encode()
    sink: list[Any] = []

    async def send(message: dict[str, Any]) -> None:
        sink.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    def scope(user: str) -> dict[str, Any]:
        return {"type": "http", "method": "GET", "path": "/v1/entitlements/check",
                "query_string": f"end_user_id={user}&feature_key={feature}".encode(),
                "headers": [(b"host", b"127.0.0.1"), (b"authorization", auth_header)]}

    async def whole(users: list[str]) -> list[float]:
        out = []
        for u in users:
            sink.clear()
            t0 = time.perf_counter_ns()
            await edge(scope(u), receive, send)
            out.append((time.perf_counter_ns() - t0) / 1000)
            assert sink[0]["status"] == 200, sink
        return out

    loop = asyncio.new_event_loop()
    loop.run_until_complete(whole(users[: min(2000, n)]))  # warm caches
    timings = loop.run_until_complete(whole(users))
    st = [float(dict(m["headers"])[b"server-timing"].split(b"=")[1]) * 1000 for m in sink[:1]]
    print(f"DB: {db_path.name} ({meta['ledger_entries']:,} ledger entries, {meta['users']:,} users), n={n}")
    print(f"whole check through the app (what Server-Timing measures): {fmt_us(timings)}  (last ST {st[0]:.0f} µs)")

    # ---- the pieces, one by one ---------------------------------------------------------------
    # Public entry points of the path, each timed alone; a piece whose API has changed is skipped.
    from urllib.parse import parse_qsl

    def timed(fn: Any, count: int) -> list[float]:
        out = []
        for u in users[:count]:
            a = time.perf_counter_ns()
            fn(u)
            out.append((time.perf_counter_ns() - a) / 1000)
        return out

    pieces: list[tuple[str, Any]] = []
    try:
        from quotastack.api.auth import Authenticator, RateLimiter

        auth = Authenticator(db, None, RateLimiter(0))
        ctx = auth.context(f"Bearer {key}", "req_x", ("entitlements:read", "read"))

        def p_key(u: str) -> None:
            with db.reader() as tx:
                tenants.authenticate(tx, key)

        pieces.append(("auth: tenants.authenticate (sha256 + key SELECT)", p_key))
        pieces.append(("auth: Authenticator.context() in all",
                       lambda u: auth.context(f"Bearer {key}", "req_x", ("entitlements:read", "read"))))

        def p_check(u: str) -> None:
            with db.reader() as tx:
                entitlements.check(tx, ctx, u, feature, "1")

        pieces.append(("db.reader() + entitlements.check()", p_check))
        with db.reader() as tx:
            sample = entitlements.check(tx, ctx, users[0], feature, "1")
        pieces.append(("JSON: render.dumps(result)", lambda u: dumps(sample)))
    except Exception as exc:  # noqa: BLE001 - the service's internals may have moved on
        print(f"  (some pieces skipped: {exc!r})")
    try:
        from quotastack.api.edge import Metrics, request_id

        metrics = Metrics()
        pieces.append(("metrics.observe (prometheus labels + inc + observe)",
                       lambda u: metrics.observe("/v1/entitlements/check", 200, 0.0002)))
        pieces.append(("parse_qsl(query) + request_id()",
                       lambda u: (dict(parse_qsl(f"end_user_id={u}&feature_key={feature}", keep_blank_values=True)),
                                  request_id())))
    except Exception as exc:  # noqa: BLE001
        print(f"  (some pieces skipped: {exc!r})")
    print("\npieces, timed alone:")
    for name, fn in pieces:
        print(f"  {name:56} {fmt_us(timed(fn, n))}")

    # ---- the SQL the check runs, traced, then each statement re-run alone ------------------------
    conn = db._connection() if hasattr(db, "_connection") else None
    if conn is not None:
        traced: list[str] = []
        conn.set_trace_callback(traced.append)
        loop.run_until_complete(whole(users[:1]))
        conn.set_trace_callback(None)
        statements = [t for t in traced if not t.startswith(("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA"))]
        print(f"\nSQL statements per check: {len(statements)} (each re-run alone {min(n, 5000)} times, "
              "execute + fetchall with the service's connection and row factory):")
        for sql in statements:
            values = []
            for _ in range(min(n, 5000)):
                a = time.perf_counter_ns()
                conn.execute(sql).fetchall()
                values.append((time.perf_counter_ns() - a) / 1000)
            plan = "; ".join(str(r["detail"] if isinstance(r, dict) else r[3])
                             for r in conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall())
            short = " ".join(sql.split())
            print(f"  {fmt_us(values)}  {short[:150]}{'…' if len(short) > 150 else ''}")
            print(f"      plan: {plan}")

    if use_cprofile:
        prof = cProfile.Profile()
        prof.enable()
        loop.run_until_complete(whole(users))
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
        stats.print_stats(30)
        print(f"\ncProfile of {n} checks (sorted by own time):")
        print(out.getvalue())
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
        print(out.getvalue())
    loop.close()
    db.close()


def with_py_spy(db_path: Path, meta: dict[str, Any], seconds: int, out_dir: Path) -> None:
    import bench_core as bc

    py_spy = bc.VENV_BIN / "py-spy"
    if not py_spy.exists():
        raise SystemExit(f"{py_spy} not found: .venv/bin/pip install py-spy")
    pin = bc.Pinning(True)
    work = Path(tempfile.mkdtemp(prefix="qs-prof-", dir=bc.CACHE))
    try:
        copy = bc.fresh_copy(db_path, work, "prof")
        server = bc.Server("service", pin, work, copy)
        load = bc.LoadGen("auto", pin)
        load.run(server, "check", 64, 3, meta["users"], meta["api_key"], meta["feature_key"], 2_000_000)
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        outs = {"speedscope": out_dir / f"check-{stamp}.speedscope.json", "raw": out_dir / f"check-{stamp}.folded"}
        spies = [bc.PROCS.start([str(py_spy), "record", "-p", str(server.proc.pid), "-d", str(seconds), "-r", "100",
                                 "-f", fmt, "-o", str(path)], log=work / f"py-spy-{fmt}.log")
                 for fmt, path in outs.items()]
        time.sleep(0.5)
        r = load.run(server, "check", 64, seconds + 1, meta["users"], meta["api_key"], meta["feature_key"], 2_000_000)
        for spy in spies:
            spy.wait(timeout=seconds + 30)
            bc.PROCS.stop(spy)
        server.stop()
        print(f"under load: {r['rps']:,.0f} req/s, Server-Timing p50/p99 {r['server_timing_ms']['p50']}/"
              f"{r['server_timing_ms']['p99']} ms")
        summarize_folded(outs["raw"])
        print(f"\nprofiles: {outs['speedscope']} (open in speedscope.app), {outs['raw']}")
    finally:
        bc.PROCS.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def summarize_folded(path: Path) -> None:
    """Inclusive share of samples by function, from py-spy's folded (raw) output."""
    total = 0
    incl: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0] + " (" + frame.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" \
                if " (" in frame else frame
            if name not in seen:
                seen.add(name)
                incl[name] = incl.get(name, 0) + n
    print(f"\npy-spy: {total} samples; inclusive share of the top functions:")
    for name, n in sorted(incl.items(), key=lambda kv: -kv[1])[:45]:
        print(f"  {100 * n / total:5.1f} %  {name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", type=Path, help="a seeded DB from bench/.cache (default: the largest)")
    p.add_argument("--n", type=int, default=20000, help="checks to time in-process")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--py-spy-seconds", type=int, default=0)
    p.add_argument("--src", type=Path, default=ROOT / "src",
                   help="the service source to profile (default src/; e.g. an exported commit's src/)")
    args = p.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    import bench_core as bc

    bc.SRC = args.src.resolve()
    db = args.db or latest_db()
    meta = json.loads(db.with_suffix(".json").read_text())
    if args.py_spy_seconds:
        with_py_spy(db, meta, args.py_spy_seconds, BENCH / "results" / "profiles")
        return 0
    with tempfile.TemporaryDirectory(prefix="qs-prof-", dir=BENCH / ".cache") as tmp:
        copy = Path(tmp) / "prof.db"
        shutil.copyfile(db, copy)
        in_process(copy, meta, args.n, args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
