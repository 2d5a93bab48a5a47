#!/usr/bin/env python3
"""Paired before/after on PostgreSQL: two versions of the service, alternating, on one cluster.

    .venv/bin/python bench/paired_writes.py --before <git ref> [--after <git ref>] [--rounds 3]
        [--duration 8] [--clients 64] [--scenario usage_many]

Throughput on a shared machine moves by ±25 % between runs, so a comparison of two versions is
only fair when their runs alternate on the same cluster. Each round runs ``--before`` then
``--after`` (each from ``git archive`` of its ref, put first on ``PYTHONPATH``; ``--after``
defaults to the working tree), each on a fresh database of one durable throwaway cluster
(``scripts/with-postgres`` with ``QUOTASTACK_PG_DURABLE=1``), with the server of
``bench_writes.py`` (``quotastack serve --workers 2``) and its load. Besides the throughput, it
reads from ``/proc`` the CPU time (user + system) that the API processes and the cluster's
processes spent during the measurement (and the load generator, this process), divided by the
requests answered: what a request costs each side, which the machine's other load moves much
less than the throughput. ``busy`` is the API's and the cluster's CPU over the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_writes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
STEPS = {"usage_many": bench_writes.usage_step(False), "usage_hot": bench_writes.usage_step(True),
         "batch100": bench_writes.batch_step, "reserve_commit": bench_writes.reserve_commit_step}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (those that have gone count nothing)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def _processes_where(field: int, value: int) -> list[int]:
    """The pids whose ``/proc/PID/stat`` field (counted after the command name) equals ``value``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[field]) == value:
                out.append(int(entry))
    return out


def children(ppid: int) -> list[int]:
    return _processes_where(1, ppid)


def session(sid: int) -> list[int]:
    return _processes_where(3, sid)  # session id


def postmaster(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        data = conn.execute("SHOW data_directory").fetchone()[0]  # type: ignore[index]
    return int(Path(data, "postmaster.pid").read_text().split()[0])


def source(ref: str | None, into: Path) -> str:
    """A ``PYTHONPATH`` entry holding the service at ``ref`` (the working tree's for None)."""
    if ref is None:
        return str(ROOT / "src")
    folder = into / ref.replace("/", "_")
    if not folder.exists():
        folder.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return str(folder / "src")


def one_run(url: str, path: str, scenario: str, clients: int, duration: float, pm: int) -> dict[str, Any]:
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path
    try:
        with bench_writes.Server(url, 2) as server:
            t0 = time.monotonic()
            key = server.setup()
            print(f"  (set-up {time.monotonic() - t0:.1f} s)", flush=True)
            assert server.proc is not None
            asyncio.run(bench_writes.run_load(server.port, key, clients, 1.0, STEPS[scenario]))  # warm up
            # After the warm-up: the API processes open their connections (the cluster's backends) lazily.
            api, pg = session(server.proc.pid), [pm, *children(pm)]
            api0, pg0, t0, c0 = cpu_seconds(api), cpu_seconds(pg), time.monotonic(), time.process_time()
            row = asyncio.run(bench_writes.run_load(server.port, key, clients, duration, STEPS[scenario]))
            elapsed, client_s = time.monotonic() - t0, time.process_time() - c0
            api_s, pg_s = cpu_seconds(api) - api0, cpu_seconds(pg) - pg0
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    requests = row["ops_per_s"] * elapsed
    row |= {"api_cpu_ms": 1000 * api_s / requests, "pg_cpu_ms": 1000 * pg_s / requests,
            "client_cpu_ms": 1000 * client_s / requests,
            "busy": (api_s + pg_s) / elapsed, "load": os.getloadavg()[0]}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--scenario", default="usage_many", choices=sorted(STEPS))
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not os.environ.get("QUOTASTACK_TEST_POSTGRES_URL") and not args.inner:
        env = os.environ | {"QUOTASTACK_PG_DURABLE": "1"}
        return subprocess.call([str(ROOT / "scripts/with-postgres"), sys.executable, __file__, *sys.argv[1:],
                                "--inner"], env=env)
    base = os.environ["QUOTASTACK_TEST_POSTGRES_URL"]
    pm = postmaster(base)
    import psycopg

    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="qs-paired-") as tmp:
        paths = {"before": source(args.before, Path(tmp)), "after": source(args.after, Path(tmp))}
        n = 0
        for round_ in range(args.rounds):
            for side in ("before", "after"):
                n += 1
                name = f"paired_{os.getpid()}_{n}"
                t0 = time.monotonic()
                with psycopg.connect(base, autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {name}")
                print(f"  (CREATE DATABASE {time.monotonic() - t0:.1f} s)", flush=True)
                url = base.rsplit("/", 1)[0] + "/" + name
                row = one_run(url, paths[side], args.scenario, args.clients, args.duration, pm)
                results[side].append(row)
                print(f"  round {round_ + 1} {side:6} {row['ops_per_s']:7.0f}/s  API CPU {row['api_cpu_ms']:.2f} ms"
                      f"  PostgreSQL CPU {row['pg_cpu_ms']:.2f} ms  load generator {row['client_cpu_ms']:.2f} ms a request  busy {row['busy']:.2f} CPUs"
                      f"  server p50 {row['st_p50_ms']:.2f} ms  errors {row['errors']}  load {row['load']:.1f}",
                      flush=True)
    for side in ("before", "after"):
        rows = results[side]
        print(f"{side:6} median {statistics.median(r['ops_per_s'] for r in rows):7.0f}/s"
              f"  API CPU {statistics.median(r['api_cpu_ms'] for r in rows):.2f} ms"
              f"  PostgreSQL CPU {statistics.median(r['pg_cpu_ms'] for r in rows):.2f} ms"
              f"  ({' / '.join(str(round(r['ops_per_s'])) for r in rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
