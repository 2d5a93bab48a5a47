"""Write throughput: usage, the batch endpoint and reserve+commit, on SQLite and PostgreSQL.

A benchmark, run by hand (not a test):

    .venv/bin/python bench/bench_writes.py                     # SQLite, and PostgreSQL if it can start one
    .venv/bin/python bench/bench_writes.py --engines sqlite --duration 5

For each engine it starts the real server (`quotastack serve`: 1 process on SQLite, 2 on
PostgreSQL) on a fresh database, funds 1,000 end users through the API, and measures over
loopback with a raw keep-alive asyncio client: single usage with 1 and 64 clients across many
end users and on one hot end user, the batch endpoint (100 events a request), and
reserve-then-commit pairs. In the same run it measures the raw floor of the same database on
this machine: a Python loop of one insert-a-row-and-update-a-row transaction after another.
PostgreSQL comes from scripts/with-postgres (a throwaway cluster, removed afterwards). Every
process it starts listens on 127.0.0.1 and is stopped at the end; every measurement is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
USERS = 1_000
OPERATOR = "bench-operator"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- a raw HTTP/1.1 keep-alive client ---------------------------------------------------------------

class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str, port: int) -> None:
        self.reader, self.writer = reader, writer
        self.head = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"

    async def post(self, path: str, body: bytes) -> tuple[int, bytes, float]:
        self.writer.write(f"POST {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status_line = await self.reader.readline()
        length, timing = 0, 0.0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "server-timing":
                timing = float(value.split("dur=")[1])
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload, timing


async def run_load(port: int, key: str, clients: int, duration: float, step: Any) -> dict[str, Any]:
    """``clients`` connections each running ``step(conn, rng)`` until ``duration`` has passed."""
    deadline = time.monotonic() + duration
    done = {"ops": 0, "events": 0, "errors": 0}
    latencies: list[float] = []
    timings: list[float] = []

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn, rng = Conn(reader, writer, key, port), random.Random(i)
        try:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                events, ok, server_ms = await step(conn, rng)
                latencies.append((time.perf_counter() - t0) * 1000)
                timings.append(server_ms)
                done["ops"] += 1
                done["events"] += events
                done["errors"] += not ok
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(clients)))
    elapsed = time.monotonic() - start
    latencies.sort()
    timings.sort()
    return {"clients": clients, "ops_per_s": done["ops"] / elapsed, "events_per_s": done["events"] / elapsed,
            "errors": done["errors"], "lat_p50_ms": statistics.median(latencies),
            "lat_p99_ms": latencies[int(len(latencies) * 0.99)], "st_p50_ms": statistics.median(timings),
            "st_p99_ms": timings[int(len(timings) * 0.99)]}


def usage_step(hot: bool) -> Any:
    async def step(conn: Conn, rng: random.Random) -> tuple[int, bool, float]:
        user = "hot" if hot else f"u{rng.randrange(USERS)}"
        status, _, st = await conn.post("/v1/usage", b'{"end_user_id":"%s","feature_key":"tokens","units":1}'
                                        % user.encode())
        return 1, status == 201, st
    return step


async def batch_step(conn: Conn, rng: random.Random) -> tuple[int, bool, float]:
    events = ",".join('{"end_user_id":"u%d","feature_key":"tokens","units":1}' % rng.randrange(USERS)
                      for _ in range(100))
    status, body, st = await conn.post("/v1/usage/batch", ('{"events":[%s]}' % events).encode())
    ok = status == 200 and body.count(b'"status":201') == 100
    return 100, ok, st


async def reserve_commit_step(conn: Conn, rng: random.Random) -> tuple[int, bool, float]:
    user = f"u{rng.randrange(USERS)}"
    status, body, st1 = await conn.post(
        "/v1/reservations", b'{"end_user_id":"%s","feature_key":"tokens","units":100}' % user.encode())
    if status != 201:
        return 1, False, st1
    rsv = json.loads(body)["id"]
    status, _, st2 = await conn.post(f"/v1/reservations/{rsv}/commit", b'{"units":60}')
    return 1, status == 200, st1 + st2


# ---- the server and its data ------------------------------------------------------------------------

class Server:
    def __init__(self, url: str, workers: int) -> None:
        self.url, self.workers, self.port = url, workers, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "Server":
        env = os.environ | {"QUOTASTACK_DATABASE_URL": self.url, "QUOTASTACK_OPERATOR_KEY": OPERATOR,
                            "QUOTASTACK_SWEEP_INTERVAL_SECONDS": "0"}
        cmd = [str(ROOT / ".venv/bin/quotastack"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", str(self.workers), "--log-level", "warning"]
        if shutil.which("taskset") and os.cpu_count() == 2 and self.workers == 1:
            cmd = ["taskset", "-c", "0", *cmd]
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        import httpx

        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    time.sleep(0.5 * (self.workers > 1))
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc: Any) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)

    def setup(self) -> str:
        import httpx

        base = f"http://127.0.0.1:{self.port}"
        created = httpx.post(f"{base}/v1/tenants", json={"name": "bench"},
                             headers={"Authorization": f"Bearer {OPERATOR}"}).json()
        key = created["api_keys"][0]["key"]
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert api.post("/v1/features", json={"key": "tokens"}).status_code == 201
        for user in [f"u{i}" for i in range(USERS)] + ["hot"]:
            assert api.post("/v1/grants", json={"end_user_id": user, "feature_key": "tokens",
                                                "amount": 10**12}).status_code == 201
        return str(key)


# ---- the raw floor ------------------------------------------------------------------------------------

def floor_sqlite(path: str, seconds: float) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE acc (id INTEGER PRIMARY KEY, balance INTEGER)")
    db.execute("CREATE TABLE ent (id INTEGER PRIMARY KEY, acc INTEGER, amount INTEGER)")
    db.executemany("INSERT INTO acc VALUES (?, ?)", [(i, 10**12) for i in range(USERS)])
    rng, n, end = random.Random(1), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        acc = rng.randrange(USERS)
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO ent (acc, amount) VALUES (?, 1)", (acc,))
        db.execute("UPDATE acc SET balance = balance - 1 WHERE id = ?", (acc,))
        db.execute("COMMIT")
        n += 1
    db.close()
    return n / seconds


def floor_postgres(url: str, seconds: float) -> dict[str, float]:
    """The raw floor, and what it is made of: round trips and the commit's flush to disk.

    ``tx_per_s`` is the classic loop (BEGIN, INSERT, UPDATE, COMMIT: four round trips a
    transaction); ``pipelined_tx_per_s`` sends the same four statements in one round trip
    (psycopg pipeline mode), so what remains is the commit's WAL flush; ``round_trips_per_s`` is
    ``SELECT 1`` in a loop.
    """
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS floor_acc, floor_ent")
        conn.execute("CREATE TABLE floor_acc (id INT PRIMARY KEY, balance BIGINT)")
        conn.execute("CREATE TABLE floor_ent (id BIGSERIAL PRIMARY KEY, acc INT, amount BIGINT)")
        conn.execute("INSERT INTO floor_acc SELECT g, 1000000000000 FROM generate_series(0, %s) g", (USERS,))
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                    for name in ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers",
                                 "wal_buffers", "commit_delay", "commit_siblings", "max_wal_size",
                                 "checkpoint_timeout", "max_connections", "server_version")}
        n, end = 0, time.monotonic() + seconds / 4
        while time.monotonic() < end:
            conn.execute("SELECT 1")
            n += 1
        round_trips = n / (seconds / 4)
    rng = random.Random(1)

    def loop(conn: Any, pipelined: bool, span: float) -> float:
        n, end = 0, time.monotonic() + span
        while time.monotonic() < end:
            acc = rng.randrange(USERS)
            if pipelined:
                with conn.pipeline(), conn.transaction():
                    conn.execute("INSERT INTO floor_ent (acc, amount) VALUES (%s, 1)", (acc,))
                    conn.execute("UPDATE floor_acc SET balance = balance - 1 WHERE id = %s", (acc,))
            else:
                with conn.transaction():
                    conn.execute("INSERT INTO floor_ent (acc, amount) VALUES (%s, 1)", (acc,))
                    conn.execute("UPDATE floor_acc SET balance = balance - 1 WHERE id = %s", (acc,))
            n += 1
        return n / span

    with psycopg.connect(url) as conn:
        classic = loop(conn, False, seconds)
    with psycopg.connect(url, autocommit=True) as conn:
        pipelined = loop(conn, True, seconds / 2)
    return {"tx_per_s": classic, "pipelined_tx_per_s": pipelined, "round_trips_per_s": round_trips,
            "settings": settings}  # type: ignore[dict-item]


# ---- the run ----------------------------------------------------------------------------------------------

def measure(engine: str, url: str, workers: int, duration: float, only: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"engine": engine, "workers": workers}
    with Server(url, workers) as server:
        key = server.setup()
        plan = [("usage_many_c1", 1, usage_step(False)), ("usage_many_c64", 64, usage_step(False)),
                ("usage_hot_c1", 1, usage_step(True)), ("usage_hot_c64", 64, usage_step(True)),
                ("batch100_c1", 1, batch_step), ("batch100_c8", 8, batch_step),
                ("reserve_commit_c1", 1, reserve_commit_step), ("reserve_commit_c64", 64, reserve_commit_step)]
        for name, clients, step in plan:
            if only and name not in only:
                continue
            out[name] = asyncio.run(run_load(server.port, key, clients, duration, step))
            row = out[name]
            print(f"  {engine:10} {name:20} {row['ops_per_s']:9.0f} ops/s {row['events_per_s']:9.0f} events/s"
                  f"  lat p50 {row['lat_p50_ms']:7.2f} p99 {row['lat_p99_ms']:7.2f} ms"
                  f"  server p50 {row['st_p50_ms']:6.2f} p99 {row['st_p99_ms']:6.2f} ms  errors {row['errors']}",
                  flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--scenarios", default="", help="comma-separated subset, e.g. usage_many_c64")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    engines = ["postgresql" if e in ("postgres", "pg") else e for e in args.engines.split(",")]
    if "postgresql" in engines and not os.environ.get("QUOTASTACK_TEST_POSTGRES_URL") and not args.inner:
        # Re-run ourselves beside a throwaway PostgreSQL cluster.
        # A durable cluster (fsync and synchronous_commit on): see bench/README.md for its settings.
        env = os.environ | {"QUOTASTACK_PG_DURABLE": "1"}
        return subprocess.call([str(ROOT / "scripts/with-postgres"), sys.executable, __file__, "--engines",
                                ",".join(engines), "--duration", str(args.duration), "--scenarios", args.scenarios,
                                "--inner"], env=env)
    only = [name for name in args.scenarios.split(",") if name]
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    for engine in engines:
        if engine == "sqlite":
            folder = tempfile.mkdtemp(prefix="qs-bench-")
            floor = floor_sqlite(f"{folder}/floor.db", args.duration)
            print(f"  sqlite     raw floor (insert + update a transaction) {floor:9.0f} tx/s", flush=True)
            run = measure("sqlite", f"sqlite:///{folder}/bench.db", 1, args.duration, only)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            url = os.environ["QUOTASTACK_TEST_POSTGRES_URL"]
            parts = floor_postgres(url, args.duration)
            floor = parts["tx_per_s"]
            print(f"  postgresql raw floor (insert + update a transaction) {floor:9.0f} tx/s; pipelined "
                  f"{parts['pipelined_tx_per_s']:.0f} tx/s; SELECT 1 {parts['round_trips_per_s']:.0f}/s", flush=True)
            print(f"  postgresql cluster: {parts['settings']}", flush=True)
            run = measure("postgresql", url, 2, args.duration, only)
            run["raw_floor"] = parts
        run["raw_floor_tx_per_s"] = floor
        if "usage_many_c64" in run and "usage_hot_c64" in run:
            run["usage_over_floor"] = run["usage_many_c64"]["ops_per_s"] / floor
            run["hot_over_many"] = run["usage_hot_c64"]["ops_per_s"] / run["usage_many_c64"]["ops_per_s"]
            print(f"  {engine:10} usage/floor {run['usage_over_floor']:.3f}   hot/many {run['hot_over_many']:.3f}",
                  flush=True)
        results["runs"].append(run)
    out = ROOT / "bench/results" / f"writes-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"  written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
