"""``quotastack demo``: start a real server, make the seed's three calls, replay a real LLM trace.

What it does, step by step (each step prints what it did):

1. Starts ``quotastack serve`` as a subprocess on a free loopback port, on a fresh SQLite database
   in a temporary directory (or on ``--database``), with a freshly generated operator key.
2. Creates a demo tenant, a metered feature ``tokens`` and a plan whose variant grants every
   end user a monthly ``tokens`` allowance, sized from the trace so that some end users run out.
3. Makes the seed's three calls (subscribe, check, record usage) and prints the responses.
4. Subscribes every end user, then replays an LLM trace over HTTP, the way a real integration
   would. Every row is one LLM request by one of ``--users`` end users (row i belongs to user
   i mod ``--users``). Two traces, two integration styles:

   ``--trace azure`` (Azure LLM inference trace 2023, conversation): check the entitlement first
   and, if allowed, record the tokens used with ``POST /v1/usage``. ``--concurrency`` clients run
   side by side, each replaying its own end users' rows in trace order.

   ``--trace mooncake`` (Mooncake conversation trace): reserve the most the request can cost
   (input + 2,000 tokens, the maximum output) before generating; then commit what it did cost
   (input + actual output) or, for a deterministic 2% of requests treated as failed generations,
   release the reservation. Rows that share a timestamp arrive together, so each such burst is
   sent at once (at most ``--concurrency`` requests in flight), bursts one after the other; with
   ``--speed`` they are also spaced out in time as in the trace.

   Every write carries an Idempotency-Key, so a request lost on the wire is retried safely.
5. Prints what happened (counts, a few balances, client-side and server-side latencies).
6. Verifies the ledger: for every end user, the sum of its ledger entries equals its balance plus
   what is reserved (API.md §8), nothing is left reserved, and every balance is what the demo
   itself expects. The exit code is 0 only if all of that holds and no call failed.

Only the public HTTP API is used, so this file doubles as an example integration.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import itertools
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
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

FEATURE = "tokens"
SEED_USER = "user_123"

# How each ledger entry type moves (balance + reserved): API.md §8.
# reserve and release only move credits between balance and reserved, so they count for nothing here.
LEDGER_SIGN = {"grant": 1, "refund": 1, "rollover": 1,
               "use": -1, "expire": -1, "void": -1, "commit": -1,
               "reserve": 0, "release": 0}


class DemoError(Exception):
    """The server or an HTTP call the demo relies on did not behave as expected."""


# ---- the traces --------------------------------------------------------------------------------

@dataclass
class Row:
    """One request of the trace, assigned to one end user."""

    index: int
    timestamp: str
    end_user_id: str
    input_tokens: int
    output_tokens: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def end_user_name(number: int) -> str:
    return f"trace_user_{number:03d}"


def read_rows(records: Iterator[tuple[str, int, int]], users: int, limit: int | None) -> list[Row]:
    """(timestamp, input, output) records → rows; row i belongs to end user i % users (evenly spread)."""
    return [Row(index=index, timestamp=timestamp, end_user_id=end_user_name(index % users),
                input_tokens=input_tokens, output_tokens=output_tokens)
            for index, (timestamp, input_tokens, output_tokens) in enumerate(itertools.islice(records, limit))]


def azure_records(path: Path) -> Iterator[tuple[str, int, int]]:
    """CSV: TIMESTAMP, ContextTokens, GeneratedTokens."""
    with path.open(newline="") as f:
        for record in csv.DictReader(f):
            yield record["TIMESTAMP"], int(record["ContextTokens"]), int(record["GeneratedTokens"])


def mooncake_records(path: Path) -> Iterator[tuple[str, int, int]]:
    """JSON lines: timestamp (ms from the start), input_length, output_length, hash_ids (unused here)."""
    with path.open() as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                yield str(record["timestamp"]), int(record["input_length"]), int(record["output_length"])


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


def default_data_dir() -> Path:
    """``shared/data`` beside the repository root; else ``../shared/data`` from the current directory."""
    repo_root = Path(__file__).resolve().parents[2]
    candidate = repo_root.parent / "shared" / "data"
    if candidate.is_dir():
        return candidate
    return Path.cwd().parent / "shared" / "data"


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
    workers: int
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def start_server(workdir: Path, database_url: str | None, operator_key: str, workers: int) -> Server:
    database_url = database_url or f"sqlite:///{workdir / 'demo.db'}"
    port = free_port()
    env = dict(os.environ, QUOTASTACK_DATABASE_URL=database_url, QUOTASTACK_OPERATOR_KEY=operator_key)
    env.pop("QUOTASTACK_RATE_LIMIT_PER_SECOND", None)  # the replay is a load test; no rate limit
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotastack.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(workers), "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    return Server(process, f"http://127.0.0.1:{port}", database_url, workers, log_path)


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


# ---- step 4: what both replays share -----------------------------------------------------------

@dataclass
class Stats:
    """What a replay did.

    ``calls`` names the timed API calls and ``refusals`` the ways a request can be refused, both in
    the order they are reported.
    """

    calls: tuple[str, ...]
    refusals: tuple[str, ...]
    sent: int = 0
    accepted: int = 0
    released: int = 0
    refused_by: Counter[str] = field(default_factory=Counter)  # how → count, e.g. "by the check" → 16
    retries: int = 0
    tokens_used: int = 0
    refused_users: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    used_by_user: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    client_ms: dict[str, list[float]] = field(default_factory=dict)  # call → latencies seen by the client
    server_ms: dict[str, list[float]] = field(default_factory=dict)  # call → Server-Timing

    def __post_init__(self) -> None:
        for call in self.calls:
            self.client_ms[call], self.server_ms[call] = [], []
        for how in self.refusals:
            self.refused_by[how] = 0

    @property
    def refused(self) -> int:
        return sum(self.refused_by.values())

    def accept(self, row: Row) -> None:
        self.accepted += 1
        self.tokens_used += row.tokens
        self.used_by_user[row.end_user_id] += row.tokens

    def refuse(self, row: Row, how: str) -> None:
        self.refused_by[how] += 1
        self.refused_users.add(row.end_user_id)

    def error(self, what: str, response: httpx.Response) -> None:
        self.errors.append(f"{what}: {response.status_code} {response.text[:300]}")


RETRIES = 3


async def timed(client: httpx.AsyncClient, stats: Stats, call: str, method: str, path: str,
                **kwargs: Any) -> httpx.Response:
    """One API call, its latency recorded under ``call``.

    A request lost on the wire (or whose twin is still running: 409 idempotency_key_in_use) is sent
    again: every write carries an Idempotency-Key, so it takes effect at most once. The client-side
    time is from the first attempt to the answer.
    """
    started = time.perf_counter()
    for attempt in range(1, RETRIES + 1):
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TransportError:
            if attempt == RETRIES:
                raise
        else:
            in_use = response.status_code == 409 and "idempotency_key_in_use" in response.text
            if not in_use or attempt == RETRIES:
                break
        stats.retries += 1
        await asyncio.sleep(0.05 * attempt)
    stats.client_ms[call].append((time.perf_counter() - started) * 1000)
    server_time = server_ms(response)
    if server_time is not None:
        stats.server_ms[call].append(server_time)
    return response


def api_client(base_url: str, api_key: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                             limits=limits, timeout=30.0)


async def subscribe_all(client: httpx.AsyncClient, end_users: list[str], variant_id: str, stats: Stats,
                        concurrency: int) -> None:
    """Puts every end user on the demo plan (at most ``concurrency`` calls at once)."""
    gate = asyncio.Semaphore(concurrency)

    async def subscribe(end_user_id: str) -> None:
        async with gate:
            response = await client.post("/v1/subscriptions",
                                         json={"end_user_id": end_user_id, "plan_variant_id": variant_id},
                                         headers={"Idempotency-Key": f"demo-subscribe-{end_user_id}"})
        if response.status_code != 201:
            stats.error(f"subscribe {end_user_id}", response)

    await asyncio.gather(*(subscribe(end_user_id) for end_user_id in end_users))


class Progress:
    """Prints a line every tenth of the rows."""

    def __init__(self, total: int, stats: Stats) -> None:
        self.total, self.stats, self.done = total, stats, 0
        self.checkpoints = {math.ceil(total * tenth / 10) for tenth in range(1, 11)}
        self.started = time.monotonic()

    def row_done(self) -> None:
        self.done += 1
        if self.done in self.checkpoints:
            stats = self.stats
            released = f", released {number(stats.released)}" if "release" in stats.calls else ""
            print(f"   {number(self.done):>7} / {number(self.total)} requests   "
                  f"accepted {number(stats.accepted)}, refused {number(stats.refused)}{released}   "
                  f"({time.monotonic() - self.started:.0f} s)", flush=True)


@dataclass
class Replay:
    """Where and how to replay: the server, the tenant's key and plan, the client's options."""

    base_url: str
    api_key: str
    variant_id: str
    concurrency: int
    speed: float | None


# ---- step 4, azure: check, then record usage ---------------------------------------------------

async def check_then_use(client: httpx.AsyncClient, row: Row, stats: Stats) -> None:
    """What an integration does around one LLM request: check, then (if allowed) record the usage."""
    stats.sent += 1
    check = await timed(client, stats, "check", "GET", "/v1/entitlements/check",
                        params={"end_user_id": row.end_user_id, "feature_key": FEATURE, "units": row.tokens})
    if check.status_code != 200:
        stats.error(f"check row {row.index}", check)
        return
    if not check.json()["allowed"]:
        stats.refuse(row, "by the check")
        return
    usage = await timed(client, stats, "usage", "POST", "/v1/usage",
                        json={"end_user_id": row.end_user_id, "feature_key": FEATURE, "units": row.tokens},
                        headers={"Idempotency-Key": f"demo-azure-row-{row.index}"})
    if usage.status_code == 201:
        stats.accept(row)
    elif usage.status_code == 402:
        stats.refuse(row, "by usage with 402")
    else:
        stats.error(f"usage row {row.index}", usage)


def split_by_user(rows: list[Row], workers: int) -> list[list[Row]]:
    """All rows of one end user go to the same worker, in trace order, so each user's order is kept."""
    worker_of: dict[str, int] = {}
    lanes: list[list[Row]] = [[] for _ in range(workers)]
    for row in rows:
        lane = worker_of.setdefault(row.end_user_id, len(worker_of) % workers)
        lanes[lane].append(row)
    return lanes


async def replay_azure(replay: Replay, rows: list[Row], end_users: list[str]) -> Stats:
    """``concurrency`` workers side by side, each replaying its own end users' rows in order."""
    stats = Stats(calls=("check", "usage"), refusals=("by the check", "by usage with 402"))
    async with api_client(replay.base_url, replay.api_key, replay.concurrency) as client:
        await subscribe_all(client, end_users, replay.variant_id, stats, replay.concurrency)
        progress = Progress(len(rows), stats)

        async def worker(lane: list[Row]) -> None:
            for row in lane:
                await check_then_use(client, row, stats)
                progress.row_done()

        await asyncio.gather(*(worker(lane) for lane in split_by_user(rows, replay.concurrency) if lane))
    return stats


# ---- step 4, mooncake: reserve, then commit or release, in bursts ------------------------------

MAX_OUTPUT_TOKENS = 2000  # the most a request may generate: what a reservation must cover
FAILED_PERCENT = 2        # this share of requests fail to generate: their reservation is released


def generation_fails(row: Row) -> bool:
    """A deterministic ~2% of rows, chosen by a hash of the row index (the same on every run)."""
    digest = hashlib.sha256(f"mooncake-row-{row.index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < FAILED_PERCENT


def bursts(rows: list[Row]) -> list[list[Row]]:
    """Rows that share a timestamp arrived together: one burst each, in trace order."""
    ordered = sorted(rows, key=lambda row: (int(row.timestamp), row.index))
    return [list(burst) for _, burst in itertools.groupby(ordered, key=lambda row: row.timestamp)]


async def reserve_then_settle(client: httpx.AsyncClient, row: Row, stats: Stats) -> None:
    """Around one LLM request: hold the most it can cost, generate, then charge what it cost."""
    stats.sent += 1
    reserve = await timed(client, stats, "reserve", "POST", "/v1/reservations",
                          json={"end_user_id": row.end_user_id, "feature_key": FEATURE,
                                "units": row.input_tokens + MAX_OUTPUT_TOKENS},
                          headers={"Idempotency-Key": f"demo-mooncake-reserve-{row.index}"})
    if reserve.status_code == 402:
        stats.refuse(row, "by reserve with 402")
        return
    if reserve.status_code != 201:
        stats.error(f"reserve row {row.index}", reserve)
        return
    path = f"/v1/reservations/{reserve.json()['id']}"

    # (here the app would run the model)

    if generation_fails(row):  # no outcome, no charge
        release = await timed(client, stats, "release", "POST", f"{path}/release",
                              headers={"Idempotency-Key": f"demo-mooncake-release-{row.index}"})
        if release.status_code == 200:
            stats.released += 1
        else:
            stats.error(f"release row {row.index}", release)
        return
    commit = await timed(client, stats, "commit", "POST", f"{path}/commit",
                         json={"units": row.tokens, "final": True},
                         headers={"Idempotency-Key": f"demo-mooncake-commit-{row.index}"})
    if commit.status_code == 200:
        stats.accept(row)
    else:  # even a 402 is an error: the commit is never more than the reservation holds
        stats.error(f"commit row {row.index}", commit)


async def replay_mooncake(replay: Replay, rows: list[Row], end_users: list[str]) -> Stats:
    """Each burst's rows all at once (at most ``concurrency`` in flight).

    Without ``speed``, a burst starts when the one before it has finished; with it, each burst
    starts at its trace time divided by ``speed``, whether or not earlier bursts are done.
    """
    stats = Stats(calls=("reserve", "commit", "release"), refusals=("by reserve with 402",))
    gate = asyncio.Semaphore(replay.concurrency)
    async with api_client(replay.base_url, replay.api_key, replay.concurrency) as client:
        await subscribe_all(client, end_users, replay.variant_id, stats, replay.concurrency)
        progress = Progress(len(rows), stats)

        async def request(row: Row) -> None:
            async with gate:
                await reserve_then_settle(client, row, stats)
            progress.row_done()

        started = time.monotonic()
        first_ms = int(rows[0].timestamp)
        running: list[Awaitable[Any]] = []
        for burst in bursts(rows):
            if replay.speed is None:
                await asyncio.gather(*(request(row) for row in burst))
                continue
            due = (int(burst[0].timestamp) - first_ms) / 1000 / replay.speed
            await asyncio.sleep(max(0.0, due - (time.monotonic() - started)))
            running.append(asyncio.gather(*(request(row) for row in burst)))  # starts them now
        await asyncio.gather(*running)
    return stats


# ---- the traces the demo knows -----------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    file: str
    records: Callable[[Path], Iterator[tuple[str, int, int]]]
    replay: Callable[[Replay, list[Row], list[str]], Awaitable[Stats]]
    concurrency: int          # the default --concurrency
    how: tuple[str, ...]      # what the replay does for each request, for step 4's heading
    allowance_note: tuple[str, ...] = ()
    timestamp_unit: str = ""  # e.g. " ms" after the trace's first and last timestamps


TRACES = {
    "azure": Trace(
        file="azure_llm_2023_conv.csv", records=azure_records, replay=replay_azure, concurrency=8,
        how=("per request: GET /v1/entitlements/check (units = context + generated tokens),",
             "then, if allowed, POST /v1/usage with an Idempotency-Key")),
    "mooncake": Trace(
        file="mooncake_conversation_trace.jsonl", records=mooncake_records, replay=replay_mooncake,
        concurrency=64,
        how=(f"per request: POST /v1/reservations (units = input + {number(MAX_OUTPUT_TOKENS)}, "
             "the maximum output),",
             "then POST /v1/reservations/{id}/commit (units = input + actual output, final),",
             f"or, for a fixed {FAILED_PERCENT}% of requests (failed generations), "
             "POST /v1/reservations/{id}/release;",
             "each with an Idempotency-Key; rows sharing a timestamp are sent together, as one burst"),
        allowance_note=(f"a reservation holds input + {number(MAX_OUTPUT_TOKENS)} tokens up front, so an end user is "
                        "refused as soon as", "its balance is below that, even when the request would have fit"),
        timestamp_unit=" ms"),
}


# ---- steps 5 and 6: results and the conservation check -----------------------------------------

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
    still_reserved: list[str] = field(default_factory=list)  # credits held after the replay ended
    tally_mismatch: list[str] = field(default_factory=list)  # server balance != allowance - what we used
    balances: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.broken or self.still_reserved or self.tally_mismatch)


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
        if reserved != 0:
            result.still_reserved.append(f"{end_user_id}: {reserved} still reserved")
        expected = allowance - used.get(end_user_id, 0)
        if balance + reserved != expected:
            result.tally_mismatch.append(f"{end_user_id}: server says {balance + reserved}, "
                                         f"the allowance less the usage we recorded is {expected}")
    return result


def print_results(stats: Stats, seconds: float, end_users: list[str], checked: Audit, workers: int) -> None:
    refused_how = ", ".join(f"{number(count)} {how}" for how, count in stats.refused_by.items())
    print(f"   requests        {number(stats.sent):>10}")
    print(f"   accepted        {number(stats.accepted):>10}   ({number(stats.tokens_used)} tokens charged)")
    print(f"   refused         {number(stats.refused):>10}   ({refused_how})")
    if "release" in stats.calls:
        print(f"   released        {number(stats.released):>10}   (failed generations: held, then released, "
              f"nothing charged)")
    print(f"   errors          {number(len(stats.errors)):>10}")
    for error in stats.errors[:5]:
        print(f"      {error}")
    print(f"   retries         {number(stats.retries):>10}")
    rate = stats.sent / seconds if seconds else 0
    print(f"   replay time     {seconds:>9.1f} s   ({rate:,.0f} requests/s)")
    print(f"   end users refused at least once: {len(stats.refused_users)} of {len(end_users)}")
    print()
    print("   a few final balances (GET /v1/balances/{end_user_id}):")
    for end_user_id in dict.fromkeys([SEED_USER, *end_users[:3], *end_users[-2:]]):
        balance, reserved = checked.balances[end_user_id]
        print(f"     {end_user_id:<16} balance {number(balance):>9}   reserved {number(reserved)}")
    print()
    for call in stats.calls:
        print_latency(f"{call}, client side", stats.client_ms[call])
        print_latency(f"{call}, server (Server-Timing)", stats.server_ms[call])
    processes = "a single server process" if workers == 1 else f"{workers} server processes"
    print(f"   (client side includes queueing: the clients share the machine with {processes})")


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
    if checked.still_reserved:
        print(f"   reserved: NOT ZERO for {len(checked.still_reserved)} end users")
        for line in checked.still_reserved[:5]:
            print(f"      {line}")
    else:
        print("   reserved: 0 for every end user (no reservation left holding credits)")
    if checked.broken:
        print(f"   conservation: BROKEN for {len(checked.broken)} of {checked.users} end users")
        for line in checked.broken[:10]:
            print(f"      {line}")
    else:
        print(f"   conservation: holds for all {checked.users} end users")


# ---- the whole demo ----------------------------------------------------------------------------

def trace_path(args: argparse.Namespace) -> Path:
    file = TRACES[args.trace].file
    if args.data:
        path = Path(args.data)
        return path / file if path.is_dir() else path
    return default_data_dir() / file


def heading(number_: int, text: str) -> None:
    print(f"\n{number_}. {text}", flush=True)


def stop_on_sigterm(signum: int, frame: Any) -> None:
    """`kill` stops the demo the way Ctrl-C does (asyncio then cancels the replay cleanly)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # e.g. started with `&` from a script
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)


def usage_error(message: str) -> int:
    print(f"quotastack demo: {message}", file=sys.stderr)
    return 2


def run_demo(args: argparse.Namespace) -> int:
    trace = TRACES[args.trace]
    if args.concurrency is None:
        args.concurrency = trace.concurrency
    if args.users < 1 or args.concurrency < 1 or args.workers < 1:
        return usage_error("--users, --concurrency and --workers must be at least 1")
    if args.speed is not None and (args.trace != "mooncake" or args.speed <= 0):
        return usage_error("--speed must be positive, and only applies to --trace mooncake")
    path = trace_path(args)
    if not path.is_file():
        return usage_error(f"trace not found: {path} (use --data)")
    rows = read_rows(trace.records(path), args.users, args.limit)
    if not rows:
        return usage_error(f"no rows in {path}")

    print("QuotaStack demo: an LLM app's billing, replayed from a real trace")
    print(f"trace: {path} ({number(len(rows))} requests, "
          f"{rows[0].timestamp} .. {rows[-1].timestamp}{trace.timestamp_unit})")

    # `kill` (SIGTERM) must also stop the server we start, like Ctrl-C does.
    previous_sigterm = signal.signal(signal.SIGTERM, stop_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="quotastack-demo-") as workdir:
        operator_key = "qs_operator_" + secrets.token_urlsafe(24)
        server = start_server(Path(workdir), args.database, operator_key, args.workers)
        try:
            return run_against(server, operator_key, trace, rows, args)
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


def run_against(server: Server, operator_key: str, trace: Trace, rows: list[Row], args: argparse.Namespace) -> int:
    heading(1, "Starting the server")
    ready_after = wait_until_ready(server)
    print(f"   {server.base_url}  (database {without_password(server.database_url)}; "
          f"{server.workers} worker process{'es' if server.workers > 1 else ''}; ready after {ready_after:.1f} s)")

    heading(2, "Setting up a demo tenant")
    demand = demand_per_user(rows)
    allowance = choose_allowance(rows)
    api_key = create_tenant(server.base_url, operator_key)
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {api_key}"},
                      timeout=30.0) as client:
        variant_id = create_catalog(client, allowance)
        print(f"   allowance: the trace asks for {number(sum(demand.values()))} tokens (input + output) "
              f"over {len(demand)} end users;")
        print(f"   per end user from {number(min(demand.values()))} to {number(max(demand.values()))}, "
              f"median {number(int(statistics.median(demand.values())))}; so each gets {number(allowance)} tokens "
              f"(the median, rounded),")
        print("   and about half of the end users run out before their last request")
        for line in trace.allowance_note:
            print(f"   {line}")

        heading(3, "The seed's three calls")
        seed_calls(client, variant_id)

        pacing = f", bursts spaced {args.speed:g}x faster than the trace" if args.speed else ""
        heading(4, f"Replaying {number(len(rows))} LLM requests from {len(demand)} end users "
                   f"(at most {args.concurrency} at once{pacing})")
        for line in trace.how:
            print(f"   {line}")
        end_users = sorted(demand)
        replay = Replay(server.base_url, api_key, variant_id, args.concurrency, args.speed)
        started = time.monotonic()
        stats = asyncio.run(trace.replay(replay, rows, end_users))
        seconds = time.monotonic() - started

        heading(5, "Results")
        used = dict(stats.used_by_user)
        used[SEED_USER] = 1  # the seed's usage call
        checked = audit(client, [SEED_USER, *end_users], allowance, used)
        print_results(stats, seconds, end_users, checked, server.workers)

        heading(6, "Conservation check (GET /v1/ledger, summed per end user)")
        print_audit(checked)

    ok = checked.ok and not stats.errors
    print(f"\n{'OK' if ok else 'FAILED'}: the demo {'passed' if ok else 'found problems (see above)'}.")
    return 0 if ok else 1
