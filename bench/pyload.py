"""Fallback load generator (used when ``wrk`` is not installed): asyncio, raw keep-alive sockets.

Same modes, same request shapes and the same ``QSBENCH {json}`` output line as ``load.lua``.
It is slower than wrk: on a 2-core machine it may become the bottleneck for the bare ceiling,
which is why bench_core.py prefers wrk.

    python bench/pyload.py --host 127.0.0.1 --port P --mode check --connections 64 --duration 10 \
        --users 100000 --max-requests 2000000 --key qs_test_… --feature api_calls
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time

_DUR = re.compile(rb"server-timing:[^\r\n]*dur=([0-9.]+)", re.IGNORECASE)
_LEN = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


async def client(args: argparse.Namespace, deadline: float, state: dict, rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection(args.host, args.port)
    host = f"{args.host}:{args.port}"
    auth = f"Authorization: Bearer {args.key}\r\n"
    try:
        while time.monotonic() < deadline and state["completed"] < args.max_requests:
            user = f"user_{rng.randrange(args.users):06d}"
            if args.mode == "check":
                req = (f"GET /v1/entitlements/check?end_user_id={user}&feature_key={args.feature} HTTP/1.1\r\n"
                       f"Host: {host}\r\n{auth}\r\n").encode()
            elif args.mode == "usage":
                body = f'{{"end_user_id":"{user}","feature_key":"{args.feature}","units":1}}'
                req = (f"POST /v1/usage HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
            else:
                req = f"GET / HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode()
            t0 = time.perf_counter_ns()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            m = _LEN.search(head)
            if m:
                await reader.readexactly(int(m.group(1)))
            t1 = time.perf_counter_ns()
            if state["t_first"] == 0:
                state["t_first"] = t0
            state["t_last"] = t1
            state["completed"] += 1
            lat = (t1 - t0) // 1000
            state["lat"][lat] = state["lat"].get(lat, 0) + 1
            status = head[9:12].decode()
            state["statuses"][status] = state["statuses"].get(status, 0) + 1
            d = _DUR.search(head)
            if d:
                us = int(float(d.group(1)) * 1000 + 0.5)
                state["st"][us] = state["st"].get(us, 0) + 1
            else:
                state["no_timing"] += 1
    except (ConnectionError, asyncio.IncompleteReadError):
        state["errors"] += 1
    finally:
        writer.close()


async def main_async(args: argparse.Namespace) -> None:
    state = {"completed": 0, "lat": {}, "st": {}, "statuses": {}, "no_timing": 0, "errors": 0,
             "t_first": 0, "t_last": 0}
    deadline = time.monotonic() + args.duration
    rng = random.Random(args.seed)
    await asyncio.gather(*(client(args, deadline, state, random.Random(rng.random()))
                           for _ in range(args.connections)))
    out = {
        "completed": state["completed"],
        "window_s": (state["t_last"] - state["t_first"]) / 1e9,
        "errors": {"connect": 0, "read": state["errors"], "write": 0, "status": 0, "timeout": 0},
        "no_server_timing": state["no_timing"], "unpaired": 0, "statuses": state["statuses"],
        "st_hist_us": sorted(state["st"].items()), "lat_hist_us": sorted(state["lat"].items()),
    }
    print("QSBENCH " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["check", "usage", "ceiling"], required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--users", type=int, default=1)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--key", default="")
    p.add_argument("--feature", default="api_calls")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(args))
    else:
        uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
