"""``quotastack demo``: start a real server, make the seed's three calls, replay a real LLM trace.

What it does, step by step (each step prints what it did):

1. Starts ``quotastack serve`` as a subprocess on a free loopback port, on a fresh SQLite database
   in a temporary directory (or on ``--database``), with a freshly generated operator key.
2. Creates a demo tenant, a metered feature ``tokens`` and a plan whose variant grants every
   end user a monthly ``tokens`` allowance, sized from the trace so that some end users run out.
3. Makes the seed's three calls (subscribe, check, record usage) and prints the responses.
4. Replays the Azure LLM inference trace over HTTP, the way a real integration would: every row is
   one LLM request by one of ``--users`` end users; the integration checks the entitlement first
   and, if allowed, records the tokens used (with an Idempotency-Key per row).
5. Prints what happened, then verifies the ledger: for every end user, the sum of its ledger
   entries equals its balance plus what is reserved. The exit code is 0 only if that holds for all
   (and every balance is what the demo itself expects, and no call failed).

Only the public HTTP API is used, so this file doubles as an example integration.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

TRACES = {"azure": "azure_llm_2023_conv.csv"}
FEATURE = "tokens"
SEED_USER = "user_123"

# How each ledger entry type moves (balance + reserved): API.md §8.
# reserve and release only move credits between balance and reserved, so they count for nothing here.
LEDGER_SIGN = {"grant": 1, "refund": 1, "rollover": 1,
               "use": -1, "expire": -1, "void": -1, "commit": -1,
               "reserve": 0, "release": 0}


class DemoError(Exception):
    """The server or an HTTP call the demo relies on did not behave as expected."""


# ---- the trace ---------------------------------------------------------------------------------

@dataclass
class Row:
    """One request of the trace, assigned to one end user."""

    index: int
    timestamp: str
    end_user_id: str
    context_tokens: int
    generated_tokens: int

    @property
    def tokens(self) -> int:
        return self.context_tokens + self.generated_tokens


def default_data_dir() -> Path:
    """``shared/data`` beside the repository root; else ``../shared/data`` from the current directory."""
    repo_root = Path(__file__).resolve().parents[2]
    candidate = repo_root.parent / "shared" / "data"
    if candidate.is_dir():
        return candidate
    return Path.cwd().parent / "shared" / "data"


def end_user_name(number: int) -> str:
    return f"trace_user_{number:03d}"


def load_trace(path: Path, users: int, limit: int | None) -> list[Row]:
    """Rows in trace order; row i belongs to end user i % users (deterministic, evenly spread)."""
    rows = []
    with path.open(newline="") as f:
        for index, record in enumerate(csv.DictReader(f)):
            if limit is not None and index >= limit:
                break
            rows.append(Row(index=index, timestamp=record["TIMESTAMP"],
                            end_user_id=end_user_name(index % users),
                            context_tokens=int(record["ContextTokens"]),
                            generated_tokens=int(record["GeneratedTokens"])))
    return rows


def demand_per_user(rows: list[Row]) -> dict[str, int]:
    demand: dict[str, int] = defaultdict(int)
    for row in rows:
        demand[row.end_user_id] += row.tokens
    return dict(demand)


def choose_allowance(rows: list[Row]) -> int:
    """The median end user's demand, rounded to 2 significant digits: about half the users run out."""
    median = statistics.median(demand_per_user(rows).values())
    digits = max(len(str(int(median))) - 2, 0)
    return max(int(round(median, -digits)), 1)


# ---- the server --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    database_url: str
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def start_server(workdir: Path, database_url: str | None, operator_key: str) -> Server:
    database_url = database_url or f"sqlite:///{workdir / 'demo.db'}"
    port = free_port()
    env = dict(os.environ, QUOTASTACK_DATABASE_URL=database_url, QUOTASTACK_OPERATOR_KEY=operator_key)
    env.pop("QUOTASTACK_RATE_LIMIT_PER_SECOND", None)  # the replay is a load test; no rate limit
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotastack.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    return Server(process, f"http://127.0.0.1:{port}", database_url, log_path)


def wait_until_ready(server: Server, timeout: float = 60.0) -> float:
    """Poll /readyz; returns the seconds it took. Raises if the server dies or never gets ready."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.process.poll() is not None:
            raise DemoError(f"the server exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=1.0).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise DemoError(f"the server was not ready after {timeout:.0f} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


# ---- HTTP helpers ------------------------------------------------------------------------------

def parse_json(response: httpx.Response) -> Any:
    """The body, with decimals kept exact."""
    return json.loads(response.text, parse_float=Decimal) if response.content else None


def expect(response: httpx.Response, *statuses: int) -> Any:
    if response.status_code not in statuses:
        raise DemoError(f"{response.request.method} {response.request.url.path} answered "
                        f"{response.status_code}: {response.text[:500]}")
    return parse_json(response)


def server_ms(response: httpx.Response) -> float | None:
    """The server's own time for this request, from ``Server-Timing: app;dur=<ms>``."""
    match = re.search(r"dur=([0-9.]+)", response.headers.get("server-timing", ""))
    return float(match.group(1)) if match else None


def without_password(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


def show(value: Any) -> str:
    return json.dumps(value, default=str)


def number(value: int | float | Decimal) -> str:
    return f"{value:,}"


# ---- step 2: tenant and catalog ----------------------------------------------------------------

def create_tenant(base_url: str, operator_key: str) -> str:
    """Creates the demo tenant; returns its sandbox admin key."""
    response = httpx.post(f"{base_url}/v1/tenants", json={"name": "QuotaStack demo"},
                          headers={"Authorization": f"Bearer {operator_key}"})
    tenant = expect(response, 201)
    sandbox_key = next(key["key"] for key in tenant["api_keys"] if key["environment"] == "sandbox")
    print(f"   tenant   {tenant['id']}  ({tenant['name']}; using its sandbox admin key)")
    return str(sandbox_key)


def create_catalog(client: httpx.Client, allowance: int) -> str:
    """The ``tokens`` feature and a Pro plan granting ``allowance`` tokens a month; returns the variant id."""
    expect(client.post("/v1/features", json={"key": FEATURE, "name": "LLM tokens", "type": "metered",
                                              "unit": "token", "precision": 0}), 201)
    print(f"   feature  {FEATURE}  (metered, whole tokens)")
    plan = expect(client.post("/v1/plans", json={"key": "pro", "name": "Pro"}), 201)
    variant = expect(client.post(f"/v1/plans/{plan['id']}/variants", json={
        "key": "pro_monthly",
        "price": {"amount": 20, "currency": "USD"},
        "billing_period": {"every": 1, "unit": "month"},
        "entitlements": [{"feature_key": FEATURE, "amount": allowance}],
    }), 201)
    print(f"   plan     {plan['id']} pro / variant {variant['id']} pro_monthly: "
          f"{number(allowance)} tokens a month, $20")
    return str(variant["id"])


# ---- step 3: the seed's three calls ------------------------------------------------------------

def seed_calls(client: httpx.Client, variant_id: str) -> None:
    calls = [
        ("POST", "/v1/subscriptions", {"end_user_id": SEED_USER, "plan_variant_id": variant_id}),
        ("GET", f"/v1/entitlements/check?end_user_id={SEED_USER}&feature_key={FEATURE}", None),
        ("POST", "/v1/usage", {"end_user_id": SEED_USER, "feature_key": FEATURE, "units": 1}),
    ]
    for method, path, body in calls:
        response = client.request(method, path, json=body)
        print(f"   {method} {path}" + (f" {show(body)}" if body is not None else ""))
        print(f"   → {response.status_code} {show(parse_json(response))}")
        expect(response, 200, 201)
        print()


# ---- step 4: the replay ------------------------------------------------------------------------

@dataclass
class Stats:
    sent: int = 0
    accepted: int = 0
    refused_by_check: int = 0
    refused_by_usage: int = 0
    tokens_used: int = 0
    refused_users: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    used_by_user: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    check_client_ms: list[float] = field(default_factory=list)
    check_server_ms: list[float] = field(default_factory=list)
    usage_client_ms: list[float] = field(default_factory=list)
    usage_server_ms: list[float] = field(default_factory=list)

    @property
    def refused(self) -> int:
        return self.refused_by_check + self.refused_by_usage


async def timed(client: httpx.AsyncClient, method: str, path: str, client_ms: list[float],
                server_times: list[float], **kwargs: Any) -> httpx.Response:
    started = time.perf_counter()
    response = await client.request(method, path, **kwargs)
    client_ms.append((time.perf_counter() - started) * 1000)
    server_time = server_ms(response)
    if server_time is not None:
        server_times.append(server_time)
    return response


async def subscribe(client: httpx.AsyncClient, end_user_id: str, variant_id: str, stats: Stats) -> None:
    response = await client.post("/v1/subscriptions",
                                 json={"end_user_id": end_user_id, "plan_variant_id": variant_id},
                                 headers={"Idempotency-Key": f"demo-subscribe-{end_user_id}"})
    if response.status_code != 201:
        stats.errors.append(f"subscribe {end_user_id}: {response.status_code} {response.text[:300]}")


async def replay_row(client: httpx.AsyncClient, row: Row, stats: Stats) -> None:
    """What an integration does around one LLM request: check, then (if allowed) record the usage."""
    stats.sent += 1
    check = await timed(client, "GET", "/v1/entitlements/check", stats.check_client_ms, stats.check_server_ms,
                        params={"end_user_id": row.end_user_id, "feature_key": FEATURE, "units": row.tokens})
    if check.status_code != 200:
        stats.errors.append(f"check row {row.index}: {check.status_code} {check.text[:300]}")
        return
    if not check.json()["allowed"]:
        stats.refused_by_check += 1
        stats.refused_users.add(row.end_user_id)
        return
    usage = await timed(client, "POST", "/v1/usage", stats.usage_client_ms, stats.usage_server_ms,
                        json={"end_user_id": row.end_user_id, "feature_key": FEATURE, "units": row.tokens},
                        headers={"Idempotency-Key": f"demo-azure-row-{row.index}"})
    if usage.status_code == 201:
        stats.accepted += 1
        stats.tokens_used += row.tokens
        stats.used_by_user[row.end_user_id] += row.tokens
    elif usage.status_code == 402:
        stats.refused_by_usage += 1
        stats.refused_users.add(row.end_user_id)
    else:
        stats.errors.append(f"usage row {row.index}: {usage.status_code} {usage.text[:300]}")


def split_by_user(rows: list[Row], workers: int) -> list[list[Row]]:
    """All rows of one end user go to the same worker, in trace order, so each user's order is kept."""
    worker_of: dict[str, int] = {}
    lanes: list[list[Row]] = [[] for _ in range(workers)]
    for row in rows:
        lane = worker_of.setdefault(row.end_user_id, len(worker_of) % workers)
        lanes[lane].append(row)
    return lanes


async def replay(base_url: str, api_key: str, variant_id: str, rows: list[Row], concurrency: int) -> Stats:
    """Each worker subscribes its end users, then replays their rows; workers run side by side."""
    stats = Stats()
    progress_every = max(len(rows) // 10, 1)
    started = time.monotonic()
    done = 0

    async def worker(client: httpx.AsyncClient, lane: list[Row]) -> None:
        nonlocal done
        for end_user_id in dict.fromkeys(row.end_user_id for row in lane):
            await subscribe(client, end_user_id, variant_id, stats)
        for row in lane:
            await replay_row(client, row, stats)
            done += 1
            if done % progress_every == 0:
                print(f"   {number(done):>7} / {number(len(rows))} events   "
                      f"accepted {number(stats.accepted)}, refused {number(stats.refused)}   "
                      f"({time.monotonic() - started:.0f} s)", flush=True)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                 limits=limits, timeout=30.0) as client:
        lanes = split_by_user(rows, concurrency)
        await asyncio.gather(*(worker(client, lane) for lane in lanes if lane))
    return stats


# ---- step 5: results and the conservation check ------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def print_latency(label: str, values: list[float]) -> None:
    print(f"   {label:<32} p50 {percentile(values, 50):7.3f} ms   p99 {percentile(values, 99):7.3f} ms"
          f"   ({number(len(values))} requests)")


def balance_of(client: httpx.Client, end_user_id: str) -> tuple[Decimal, Decimal]:
    """(balance, reserved) of the ``tokens`` feature."""
    body = expect(client.get(f"/v1/balances/{end_user_id}", params={"feature_key": FEATURE}), 200)
    for entry in body["data"]:
        if entry["feature_key"] == FEATURE:
            return Decimal(entry["balance"]), Decimal(entry["reserved"])
    return Decimal(0), Decimal(0)


def ledger_total(client: httpx.Client, end_user_id: str) -> tuple[Decimal, int]:
    """The signed sum of all the end user's ``tokens`` ledger entries, and how many there are."""
    total, count, cursor = Decimal(0), 0, None
    while True:
        params: dict[str, Any] = {"end_user_id": end_user_id, "feature_key": FEATURE, "limit": 500}
        if cursor:
            params["starting_after"] = cursor
        page = expect(client.get("/v1/ledger", params=params), 200)
        for entry in page["data"]:
            if entry["type"] not in LEDGER_SIGN:
                raise DemoError(f"unknown ledger entry type {entry['type']!r} in {entry['id']}")
            total += LEDGER_SIGN[entry["type"]] * Decimal(entry["amount"])
            count += 1
        if not page["has_more"]:
            return total, count
        cursor = page["next_cursor"]


@dataclass
class Audit:
    users: int = 0
    ledger_entries: int = 0
    broken: list[str] = field(default_factory=list)          # conservation fails
    tally_mismatch: list[str] = field(default_factory=list)  # server balance != allowance - what we used
    balances: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)


def audit(client: httpx.Client, end_users: list[str], allowance: int, used: dict[str, int]) -> Audit:
    result = Audit()
    for end_user_id in end_users:
        total, count = ledger_total(client, end_user_id)
        balance, reserved = balance_of(client, end_user_id)
        result.users += 1
        result.ledger_entries += count
        result.balances[end_user_id] = (balance, reserved)
        if total != balance + reserved:
            result.broken.append(f"{end_user_id}: ledger sums to {total}, balance {balance} + reserved {reserved}")
        expected = allowance - used.get(end_user_id, 0)
        if balance + reserved != expected:
            result.tally_mismatch.append(f"{end_user_id}: server says {balance + reserved}, "
                                         f"the allowance less the usage we recorded is {expected}")
    return result


def print_results(stats: Stats, seconds: float, end_users: list[str], checked: Audit) -> None:
    print(f"   events sent     {number(stats.sent):>10}")
    print(f"   accepted        {number(stats.accepted):>10}   ({number(stats.tokens_used)} tokens recorded)")
    print(f"   refused         {number(stats.refused):>10}   ({number(stats.refused_by_check)} by the check, "
          f"{number(stats.refused_by_usage)} by usage with 402)")
    print(f"   errors          {number(len(stats.errors)):>10}")
    for error in stats.errors[:5]:
        print(f"      {error}")
    rate = stats.sent / seconds if seconds else 0
    print(f"   replay time     {seconds:>9.1f} s   ({rate:,.0f} events/s)")
    print(f"   end users refused at least once: {len(stats.refused_users)} of {len(end_users)}")
    print()
    print("   a few final balances (GET /v1/balances/{end_user_id}):")
    for end_user_id in dict.fromkeys([SEED_USER, *end_users[:3], *end_users[-2:]]):
        balance, reserved = checked.balances[end_user_id]
        print(f"     {end_user_id:<16} balance {number(balance):>9}   reserved {number(reserved)}")
    print()
    print_latency("check, client side", stats.check_client_ms)
    print_latency("check, server (Server-Timing)", stats.check_server_ms)
    print_latency("usage, client side", stats.usage_client_ms)
    print_latency("usage, server (Server-Timing)", stats.usage_server_ms)
    print("   (client side includes queueing: the clients share the machine with a single server process)")


def print_audit(checked: Audit) -> None:
    print("   for every end user: grants + refunds + rollovers - uses - expiries - voids - commits")
    print("                       = balance + reserved")
    print(f"   checked {checked.users} end users, {number(checked.ledger_entries)} ledger entries")
    if checked.tally_mismatch:
        print(f"   client tally: DIFFERS for {len(checked.tally_mismatch)} end users")
        for line in checked.tally_mismatch[:5]:
            print(f"      {line}")
    else:
        print("   client tally: every balance equals the allowance less the usage the demo recorded")
    if checked.broken:
        print(f"   conservation: BROKEN for {len(checked.broken)} of {checked.users} end users")
        for line in checked.broken[:10]:
            print(f"      {line}")
    else:
        print(f"   conservation: holds for all {checked.users} end users")


# ---- the whole demo ----------------------------------------------------------------------------

def trace_path(args: argparse.Namespace) -> Path:
    if args.data:
        path = Path(args.data)
        return path / TRACES[args.trace] if path.is_dir() else path
    return default_data_dir() / TRACES[args.trace]


def heading(number_: int, text: str) -> None:
    print(f"\n{number_}. {text}", flush=True)


def stop_on_sigterm(signum: int, frame: Any) -> None:
    """`kill` stops the demo the way Ctrl-C does (asyncio then cancels the replay cleanly)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # e.g. started with `&` from a script
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)


def run_demo(args: argparse.Namespace) -> int:
    path = trace_path(args)
    if not path.is_file():
        print(f"quotastack demo: trace not found: {path} (use --data)", file=sys.stderr)
        return 2
    if args.users < 1 or args.concurrency < 1:
        print("quotastack demo: --users and --concurrency must be at least 1", file=sys.stderr)
        return 2
    rows = load_trace(path, args.users, args.limit)
    if not rows:
        print(f"quotastack demo: no rows in {path}", file=sys.stderr)
        return 2

    print("QuotaStack demo: an LLM app's billing, replayed from a real trace")
    print(f"trace: {path} ({number(len(rows))} requests, {rows[0].timestamp} .. {rows[-1].timestamp})")

    # `kill` (SIGTERM) must also stop the server we start, like Ctrl-C does.
    previous_sigterm = signal.signal(signal.SIGTERM, stop_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="quotastack-demo-") as workdir:
        operator_key = "qs_operator_" + secrets.token_urlsafe(24)
        server = start_server(Path(workdir), args.database, operator_key)
        try:
            return run_against(server, operator_key, rows, args)
        except DemoError as exc:
            print(f"\nquotastack demo: {exc}", file=sys.stderr)
            return 1
        except httpx.HTTPError as exc:
            print(f"\nquotastack demo: HTTP failure: {exc!r}\nserver log:\n{server.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nquotastack demo: interrupted", file=sys.stderr)
            return 130
        finally:
            stop_server(server)
            signal.signal(signal.SIGTERM, previous_sigterm)


def run_against(server: Server, operator_key: str, rows: list[Row], args: argparse.Namespace) -> int:
    heading(1, "Starting the server")
    ready_after = wait_until_ready(server)
    print(f"   {server.base_url}  (database {without_password(server.database_url)}; "
          f"ready after {ready_after:.1f} s)")

    heading(2, "Setting up a demo tenant")
    demand = demand_per_user(rows)
    allowance = choose_allowance(rows)
    api_key = create_tenant(server.base_url, operator_key)
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {api_key}"},
                      timeout=30.0) as client:
        variant_id = create_catalog(client, allowance)
        print(f"   allowance: the trace asks for {number(sum(demand.values()))} tokens over {len(demand)} end users;")
        print(f"   per end user from {number(min(demand.values()))} to {number(max(demand.values()))}, "
              f"median {number(int(statistics.median(demand.values())))}; so each gets {number(allowance)} tokens")

        heading(3, "The seed's three calls")
        seed_calls(client, variant_id)

        heading(4, f"Replaying {number(len(rows))} LLM requests from {len(demand)} end users "
                   f"({args.concurrency} concurrent clients)")
        print("   per request: GET /v1/entitlements/check (units = context + generated tokens),")
        print("   then, if allowed, POST /v1/usage with an Idempotency-Key")
        started = time.monotonic()
        stats = asyncio.run(replay(server.base_url, api_key, variant_id, rows, args.concurrency))
        seconds = time.monotonic() - started

        heading(5, "Results")
        end_users = sorted(demand)
        used = dict(stats.used_by_user)
        used[SEED_USER] = 1  # the seed's usage call
        checked = audit(client, [SEED_USER, *end_users], allowance, used)
        print_results(stats, seconds, end_users, checked)

        heading(6, "Conservation check (GET /v1/ledger, summed per end user)")
        print_audit(checked)

    ok = not checked.broken and not checked.tally_mismatch and not stats.errors
    print(f"\n{'OK' if ok else 'FAILED'}: the demo {'passed' if ok else 'found problems (see above)'}.")
    return 0 if ok else 1
