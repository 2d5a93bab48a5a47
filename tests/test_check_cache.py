"""The check's answers kept between checks (SQLite, api/checks.py) never lag the ledger.

Every test runs on both engines (PostgreSQL reads every check from the database, so there the
same timelines prove the uncached path); on SQLite each one also proves that the cache answered
some of its checks, so none of them passes by never caching.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from quotastack.api.app import Settings
from quotastack.service import clock, credits, entitlements
from quotastack.service.context import Ctx
from quotastack.store import open_database

from .conftest import Api, Server, Tenant, assert_error, feature, grant, instant, new_tenant, rfc3339, subscribe, use, variant
from .processes import ServerProcess
from .processes import new_tenant as new_process_tenant
from .serving import OPERATOR_KEY, Running, database_url, serve


def check(api: Api, end_user_id: str, feature_key: str = "api_calls", **params: Any) -> dict[str, Any]:
    return api.ok("GET", "/v1/entitlements/check",  # type: ignore[no-any-return]
                  params={"end_user_id": end_user_id, "feature_key": feature_key, **params})


class Hits:
    """How many checks the server's cache answered since the last call (None without a cache)."""

    def __init__(self, server: Server) -> None:
        self.cache = server.app.app.state.check_cache
        self.seen = self.cache.hits if self.cache is not None else 0

    def new(self) -> int | None:
        if self.cache is None:
            return None
        hits, self.seen = self.cache.hits - self.seen, self.cache.hits
        return hits  # type: ignore[no-any-return]


def cached(hits: Hits) -> None:
    """On SQLite, the checks since the last call were (at least partly) answered from the cache."""
    assert hits.new() in (None, *range(1, 1000))


@pytest.fixture
def hits(server: Server) -> Hits:
    return Hits(server)


@contextmanager
def sqlite_server(url: str, **settings: Any) -> Iterator[tuple[Running, Tenant]]:
    """A server (no sweep) on the SQLite file at ``url``, and a new tenant in it; closed after."""
    with serve(url, Settings(operator_key=OPERATOR_KEY, sweep_interval_seconds=0, **settings)) as running:
        tenant = new_tenant(running.base_url)
        try:
            yield running, tenant
        finally:
            tenant.sandbox.close()
            tenant.live.close()


def plan(api: Api, amount: int = 100) -> str:
    feature(api, "api_calls")
    return str(variant(api, [{"feature_key": "api_calls", "amount": amount}])["id"])


def test_every_write_reaches_the_next_check(api: Api, hits: Hits) -> None:
    subscribe(api, "u1", plan(api))
    assert check(api, "u1")["balance"] == 100
    assert check(api, "u1")["balance"] == 100
    assert check(api, "u1", units=150)["allowed"] is False
    assert check(api, "u1", units=150)["reason"] == "insufficient_balance"
    cached(hits)
    assert use(api, "u1", "api_calls", 30).status == 201
    assert check(api, "u1")["balance"] == 70
    block = grant(api, "u1", "api_calls", 80)
    assert (check(api, "u1", units=150)["allowed"], check(api, "u1")["balance"]) == (True, 150)
    rsv = api.ok("POST", "/v1/reservations", {"end_user_id": "u1", "feature_key": "api_calls", "units": 50}, 201)
    assert check(api, "u1")["balance"] == 100
    api.ok("POST", f"/v1/reservations/{rsv['id']}/release", {})
    assert check(api, "u1")["balance"] == 150
    api.ok("POST", f"/v1/grants/{block['id']}/void", {})
    assert check(api, "u1")["balance"] == 70
    assert check(api, "u1")["balance"] == 70
    cached(hits)
    # A checked end user the service has never seen is created by the check's write path.
    assert check(api, "nobody")["reason"] == "no_entitlement"
    assert check(api, "nobody")["reason"] == "no_entitlement"


def test_a_revoked_key_is_refused_by_the_next_check(server: Server, hits: Hits) -> None:
    tenant = new_tenant(server.base_url)
    api = tenant.sandbox
    subscribe(api, "u1", plan(api))
    minted = api.ok("POST", "/v1/api_keys", {"name": "app", "scopes": ["entitlements:read"]}, 201)
    app = Api(server.base_url, minted["key"])
    try:
        assert check(app, "u1")["balance"] == 100
        assert check(app, "u1")["balance"] == 100
        cached(hits)
        api.ok("DELETE", f"/v1/api_keys/{minted['id']}")
        assert_error(app.get("/v1/entitlements/check", params={"end_user_id": "u1", "feature_key": "api_calls"}),
                     401, "unauthenticated")
        # The same cached answer is not served to a key without the scope either.
        usage_only = Api(server.base_url, api.ok("POST", "/v1/api_keys", {
            "name": "meter", "scopes": ["usage:write"]}, 201)["key"])
        assert_error(usage_only.get("/v1/entitlements/check", params={"end_user_id": "u1", "feature_key": "api_calls"}),
                     403, "forbidden")
        usage_only.close()
    finally:
        app.close()
        tenant.sandbox.close()
        tenant.live.close()


def test_catalog_and_clock_changes_reach_the_next_check(api: Api, hits: Hits) -> None:
    sub = subscribe(api, "u1", plan(api))
    assert check(api, "u1", "tokens")["reason"] == "unknown_feature"
    assert check(api, "u1", "tokens")["reason"] == "unknown_feature"
    cached(hits)
    feature(api, "tokens")
    assert check(api, "u1", "tokens")["reason"] == "no_entitlement"
    # Past the period's end on the sandbox clock: the renewal grants a new 100.
    assert use(api, "u1", "api_calls", 60).status == 201
    assert check(api, "u1")["balance"] == 40
    assert check(api, "u1")["balance"] == 40
    api.ok("POST", "/v1/test_clock/advance", {"to": sub["current_period_end"]})
    renewed = check(api, "u1")
    assert renewed["balance"] == 100 and renewed["resets_at"] != sub["current_period_end"]


def test_expiries_reach_the_check_at_their_instant_without_any_write(api: Api, hits: Hits) -> None:
    """Real time, no request in between: a cached answer knows when it stops being true."""
    feature(api, "api_calls")
    now = instant(api.ok("GET", "/v1/test_clock")["now"])
    soon = rfc3339(now + timedelta(seconds=1.5))
    for user in ("u1", "u2", "u3"):
        grant(api, user, "api_calls", 100)
        grant(api, user, "api_calls", 5, **({"effective_at": soon} if user == "u3" else {"expires_at": soon}))
    # u1's reservation draws the soonest-expiring block first: the 5, then 35 of the 100.
    api.ok("POST", "/v1/reservations",
           {"end_user_id": "u1", "feature_key": "api_calls", "units": 40, "ttl_seconds": 3}, 201)
    for _ in range(2):
        assert [check(api, user)["balance"] for user in ("u1", "u2", "u3")] == [65, 105, 100]
    cached(hits)
    seen: dict[str, list[int]] = {"u1": [], "u2": [], "u3": []}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and [s[-1:] for s in seen.values()] != [[100], [100], [105]]:
        for user in seen:
            balance = check(api, user)["balance"]
            if seen[user][-1:] != [balance]:
                seen[user].append(balance)
        time.sleep(0.02)
    # u2 loses its 5 at 1.5 s and u3 gains its 5 then; u1's 5 are held, so nothing changes for it
    # then, and at 3 s the expired reservation gives back the 35 that are still usable (the 5 go
    # with their block).
    assert seen == {"u1": [65, 100], "u2": [105, 100], "u3": [100, 105]}
    cached(hits)


def test_a_write_by_another_connection_reaches_the_next_check(tmp_path: Path) -> None:
    """Another process (or ``quotastack worker``) writes the same SQLite file: SQLite's
    ``data_version`` tells the server, which tells nothing to its cache otherwise."""
    url = database_url("sqlite", tmp_path)
    with sqlite_server(url) as (running, tenant):
        api = tenant.sandbox
        hits = Hits(running)
        feature(api, "api_calls")
        grant(api, "u1", "api_calls", 10)
        assert check(api, "u1")["balance"] == 10
        assert check(api, "u1")["balance"] == 10
        cached(hits)
        other = open_database(url)  # a second connection, as a second process would have
        try:
            env = other_env(other, tenant.created)
            with other.transaction() as tx:
                ctx = Ctx(tenant.id, env, "sandbox", None, frozenset({"admin"}),
                          time.time_ns() // 1000, "req_other")
                credits.grant(tx, ctx, {"end_user_id": "u1", "feature_key": "api_calls", "amount": 7})
        finally:
            other.close()
        assert check(api, "u1")["balance"] == 17


def grant_directly(db: Any, tenant: Any, end_user_id: str, amount: int) -> None:
    """A grant in the sandbox of ``tenant`` through ``db``, not through the API."""
    env = other_env(db, tenant.created)
    with db.transaction() as tx:
        ctx = Ctx(tenant.id, env, "sandbox", None, frozenset({"admin"}), time.time_ns() // 1000, "req_other")
        credits.grant(tx, ctx, {"end_user_id": end_user_id, "feature_key": "api_calls", "amount": amount})


def other_env(db: Any, created: dict[str, Any]) -> int:
    with db.reader() as tx:
        row = tx.one("SELECT e.id FROM environments e JOIN tenants t ON t.id = e.tenant_id "
                     "WHERE t.id = :t AND e.kind = 'sandbox'", {"t": created["id"]})
    return int(row["id"])


def test_metrics_count_what_the_cache_answered(server: Server, api: Api) -> None:
    feature(api, "api_calls")
    grant(api, "u1", "api_calls", 1)
    check(api, "u1")
    check(api, "u1")
    text = api.get("/metrics").text
    if server.app.app.state.check_cache is None:
        assert "quotastack_check_cache" not in text
        return
    hit = [line for line in text.splitlines() if line.startswith('quotastack_check_cache_lookups_total{result="hit"}')]
    assert hit and float(hit[0].split()[-1]) >= 1
    assert "quotastack_check_cache_entries " in text


@contextmanager
def six_end_users_and_room_for_three(tmp_path: Path) -> Iterator[tuple[Running, Api, Any]]:
    """A server keeping at most 3 answers; end users u0…u5 granted 1…6 ``api_calls``."""
    with sqlite_server(database_url("sqlite", tmp_path), check_cache_entries=3) as (running, tenant):
        api = tenant.sandbox
        feature(api, "api_calls")
        for n in range(6):
            grant(api, f"u{n}", "api_calls", n + 1)
        yield running, api, running.app.app.state.check_cache

def test_the_cache_keeps_at_most_its_size(tmp_path: Path) -> None:
    with six_end_users_and_room_for_three(tmp_path) as (running, api, cache):
        for n in range(6):
            assert check(api, f"u{n}")["balance"] == n + 1
            assert len(cache) <= 3
        assert check(api, "u5")["balance"] == 6  # the newest are kept
        hits = cache.hits
        assert check(api, "u5")["balance"] == 6
        assert cache.hits == hits + 1


def test_without_a_cache_the_check_reads_the_database(tmp_path: Path) -> None:
    with sqlite_server(database_url("sqlite", tmp_path), check_cache_entries=0) as (running, tenant):
        assert running.app.app.state.check_cache is None
        feature(tenant.sandbox, "api_calls")
        grant(tenant.sandbox, "u1", "api_calls", 3)
        assert check(tenant.sandbox, "u1")["balance"] == 3


def test_two_server_processes_on_one_file_never_serve_a_stale_check(tmp_path: Path) -> None:
    """Writes through one process, checks through the other, alternately and from several threads
    at once: every check that starts after a write's answer arrived reflects that write; and the
    checking process does keep answers (once nothing is written, a repeated check is a hit)."""
    url = database_url("sqlite", tmp_path)
    with ServerProcess(url, sweep_interval_seconds=0) as first, ServerProcess(url, sweep_interval_seconds=0) as second:
        writer = new_process_tenant(first.base_url)
        key = writer.headers["authorization"]
        reader = httpx.Client(base_url=second.base_url, timeout=30, headers={"Authorization": key})
        try:
            assert writer.post("/v1/features", json={"key": "api_calls"}).status_code == 201
            users = [f"u{i}" for i in range(4)]
            for user in users:
                assert writer.post("/v1/grants", json={"end_user_id": user, "feature_key": "api_calls",
                                                       "amount": 1000}).status_code == 201

            def timeline(user: str) -> list[int]:
                with httpx.Client(base_url=second.base_url, timeout=30, headers={"Authorization": key}) as mine, \
                        httpx.Client(base_url=first.base_url, timeout=30, headers={"Authorization": key}) as w:
                    seen = []
                    for step in range(25):
                        for _ in range(2):
                            body = mine.get("/v1/entitlements/check",
                                            params={"end_user_id": user, "feature_key": "api_calls"}).json()
                            seen.append(body["balance"])
                        assert w.post("/v1/usage", json={"end_user_id": user, "feature_key": "api_calls",
                                                         "units": step + 1}).status_code == 201
                    return seen

            with ThreadPoolExecutor(len(users)) as pool:
                timelines = list(pool.map(timeline, users))
            expected = [value for step in range(25) for value in [1000 - step * (step + 1) // 2] * 2]
            assert timelines == [expected] * len(users)

            def hits() -> float:
                lines = [line for line in reader.get("/metrics").text.splitlines()
                         if line.startswith('quotastack_check_cache_lookups_total{result="hit"}')]
                return float(lines[0].split()[-1])

            before = hits()
            for _ in range(3):
                assert reader.get("/v1/entitlements/check", params={"end_user_id": "u0", "feature_key": "api_calls"}
                                  ).json()["balance"] == 1000 - 24 * 25 // 2 - 25
            assert hits() - before >= 2
        finally:
            reader.close()
            writer.close()


def test_an_answer_that_names_a_reset_is_kept_no_longer_than_that(tmp_path: Path) -> None:
    """Found by trying to break the cache: a paused subscription (no boundary due) and an
    allowance of 0 with a reset (no window kept) left answers whose ``resets_at`` was kept past
    itself. Each kept answer now ends at the ``resets_at`` it names."""
    with sqlite_server(database_url("sqlite", tmp_path)) as (running, tenant):
        api = tenant.sandbox
        cache = running.app.app.state.check_cache
        feature(api, "msgs")
        feature(api, "zero")
        minute = {"every": 1, "unit": "minute"}
        both = variant(api, [{"feature_key": "msgs", "amount": 5, "reset": minute},
                             {"feature_key": "zero", "amount": 0, "reset": minute}], key="pro_monthly")
        zero = variant(api, [{"feature_key": "zero", "amount": 0, "reset": minute}], key="pro_zero")
        paused = subscribe(api, "p", both["id"])
        api.ok("POST", f"/v1/subscriptions/{paused['id']}/pause", {})
        subscribe(api, "z", zero["id"])
        for user, key in (("p", "msgs"), ("z", "zero")):
            check(api, user, key)
            answer = check(api, user, key)  # kept, unless a minute began in between
            assert answer["resets_at"] is not None
            (_body, since, until), = cache.kept(user)
            assert until == instant_us(answer["resets_at"]), (user, answer)  # no sandbox offset
            assert since < until


def instant_us(timestamp: str) -> int:
    moment = instant(timestamp)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def answers_of(base_url: str, keys: dict[str, str], checks: list[tuple[str, str, str]]) -> list[Any]:
    """The check's answer for each (environment, end user, feature), through that environment's key."""
    out = []
    for env, user, feature_key in checks:
        with httpx.Client(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {keys[env]}"}) as c:
            reply = c.get("/v1/entitlements/check", params={"end_user_id": user, "feature_key": feature_key})
            assert reply.status_code == 200, reply.text
            out.append(reply.json())
    return out


def cache_figure(base_url: str, name: str) -> float:
    lines = [line for line in httpx.get(f"{base_url}/metrics").text.splitlines() if line.startswith(name)]
    return float(lines[0].split()[-1])


def test_a_started_server_answers_first_checks_from_the_answers_it_warmed(tmp_path: Path) -> None:
    """``quotastack serve`` reads ahead, when it starts, the answers of every end user for every
    feature: the first check of each is already a hit, and says exactly what a server that keeps
    nothing says. Each environment keeps its own answers for the same end user id; an end user
    whose check needs a write (here: live has a default plan, and ``newcomer`` no subscription
    yet) is not warmed, and is still answered right."""
    url = database_url("sqlite", tmp_path)
    with serve(url, Settings(operator_key=OPERATOR_KEY, sweep_interval_seconds=0, check_cache_entries=0)) as running:
        tenant = new_tenant(running.base_url)
        sandbox, live = tenant.sandbox, tenant.live
        try:
            for api in (sandbox, live):
                feature(api, "api_calls")
                feature(api, "sso", type="boolean")
                feature(api, "ai_credits", precision=2)
                feature(api, "images", credit_pool="ai_credits", credits_per_unit=10)
            pro = variant(sandbox, [{"feature_key": "api_calls", "amount": 100, "reset": {"every": 1, "unit": "day"}},
                                    {"feature_key": "sso", "enabled": True},
                                    {"feature_key": "ai_credits", "amount": "25.5"}])
            subscribe(sandbox, "sub", pro["id"])
            paused = subscribe(sandbox, "paused", pro["id"])
            sandbox.ok("POST", f"/v1/subscriptions/{paused['id']}/pause", {})
            grant(sandbox, "granted", "api_calls", 30)
            grant(sandbox, "held", "ai_credits", 100)
            sandbox.ok("POST", "/v1/reservations", {"end_user_id": "held", "feature_key": "images", "units": 3}, 201)
            assert use(sandbox, "sub", "api_calls", 7).status == 201
            # Seen before live had a default plan: no subscription, so its first check writes one.
            grant(live, "newcomer2", "api_calls", 2)
            free = variant(live, [{"feature_key": "api_calls", "amount": 5}], plan="free", default=True)
            subscribe(live, "sub", free["id"])
            grant(live, "sub", "api_calls", 1)
            live.ok("GET", "/v1/entitlements/check", params={"end_user_id": "newcomer", "feature_key": "sso"})
        finally:
            sandbox.close()
            live.close()
        keys = {"sandbox": tenant.created["api_keys"][0]["key"], "live": tenant.created["api_keys"][1]["key"]}
        users = {"sandbox": ["granted", "held", "paused", "sub"], "live": ["newcomer", "sub"]}
        features = ["ai_credits", "api_calls", "images", "sso"]
        checks = [(env, user, f) for env in users for user in users[env] for f in features]
        expected = answers_of(running.base_url, keys, checks)
    assert {a["balance"] for a in expected if a["end_user_id"] == "sub" and a["feature_key"] == "api_calls"} == {93, 6}

    warmable = len(checks)  # all but newcomer2's, which needs a write (its first check subscribes it)
    with ServerProcess(url, sweep_interval_seconds=0) as started:
        deadline = time.monotonic() + 20
        while cache_figure(started.base_url, "quotastack_check_cache_entries ") < warmable:
            assert time.monotonic() < deadline, "the server did not warm its answers"
            time.sleep(0.05)
        assert cache_figure(started.base_url, "quotastack_check_cache_entries ") == warmable
        assert answers_of(started.base_url, keys, checks) == expected
        assert cache_figure(started.base_url, 'quotastack_check_cache_lookups_total{result="hit"}') == warmable
        assert answers_of(started.base_url, keys, [("live", "newcomer2", "api_calls")])[0]["balance"] == 2 + 5
        assert cache_figure(started.base_url, 'quotastack_check_cache_lookups_total{result="miss"}') == 1


def test_a_run_warmed_while_a_write_lands_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that commits between warming's read and its keeping: the run is dropped, and the
    next check reads the ledger (the grant of 5 is there)."""
    with sqlite_server(database_url("sqlite", tmp_path)) as (running, tenant):
        api = tenant.sandbox
        cache = running.app.app.state.check_cache
        feature(api, "api_calls")
        grant(api, "u1", "api_calls", 10)
        grant(api, "u2", "api_calls", 20)
        read = entitlements.answers

        def then_a_grant(*args: Any) -> Any:
            found = read(*args)
            # A unit of work of another thread of the process commits meanwhile.
            writer = threading.Thread(target=grant_directly, args=(running.db, tenant, "u1", 5))
            writer.start()
            writer.join()
            return found

        monkeypatch.setattr(entitlements, "answers", then_a_grant)
        assert running.on_loop(cache.warm()) == 0
        assert len(cache) == 0
        monkeypatch.setattr(entitlements, "answers", read)
        assert check(api, "u1")["balance"] == 15
        assert running.on_loop(cache.warm()) == 2
        hits = cache.hits
        assert (check(api, "u1")["balance"], check(api, "u2")["balance"]) == (15, 20)
        assert cache.hits == hits + 2


def test_warming_fills_the_cache_without_evicting(tmp_path: Path) -> None:
    with six_end_users_and_room_for_three(tmp_path) as (running, api, cache):
        assert check(api, "u5")["balance"] == 6
        assert running.on_loop(cache.warm()) == 2
        assert sorted(cache._users) == ["u0", "u1", "u5"]  # the first two in id order; u5 stays
        hits = cache.hits
        assert [check(api, u)["balance"] for u in ("u0", "u1", "u5")] == [1, 2, 6]
        assert cache.hits == hits + 3


def test_no_kept_answer_is_walked_by_the_garbage_collector(tmp_path: Path) -> None:
    """Every full collection walks the objects the collector tracks: the warmed cache's per-end-user
    dicts once halved the check's throughput. They hold only strings and bytes, so it tracks none."""
    with sqlite_server(database_url("sqlite", tmp_path)) as (running, tenant):
        api = tenant.sandbox
        cache = running.app.app.state.check_cache
        feature(api, "api_calls")
        for n in range(3):
            grant(api, f"u{n}", "api_calls", n + 1)
        running.on_loop(cache.warm())
        check(api, "u0", units=2)
        assert len(cache) == 4
        assert not any(gc.is_tracked(entries) for entries in cache._users.values())


def test_a_sandbox_clock_moved_while_warming_is_the_clock_the_rest_is_warmed_at(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by trying to break warming: it read each environment's clock once, before its first
    run, so a sandbox clock advanced meanwhile left the later runs' answers at the old time (an
    hourly allowance still spent, ``resets_at`` in the sandbox's past) and kept them."""
    with sqlite_server(database_url("sqlite", tmp_path)) as (running, tenant):
        api = tenant.sandbox
        cache = running.app.app.state.check_cache
        feature(api, "msgs")
        hourly = variant(api, [{"feature_key": "msgs", "amount": 5, "reset": {"every": 1, "unit": "hour"}}])
        for user in ("u1", "u2"):
            subscribe(api, user, hourly["id"])
            assert use(api, user, "msgs", 5).status == 201
        read = entitlements.answers
        runs = []

        def then_the_clock_moves(*args: Any) -> Any:
            found = read(*args)
            runs.append(found)
            if len(runs) == 1:
                writer = threading.Thread(target=advance_directly, args=(running.db, tenant, 7200))
                writer.start()
                writer.join()
            return found

        monkeypatch.setattr(entitlements, "answers", then_the_clock_moves)
        assert running.on_loop(cache.warm(run=1)) == 1  # u1's run was read before the move: dropped
        assert cache.kept("u1") == []
        (body, _since, _until), = cache.kept("u2")
        warmed = json.loads(body)
        assert warmed["balance"] == 5 and warmed["allowed"] is True
        assert instant(warmed["resets_at"]) > instant(api.ok("GET", "/v1/test_clock")["now"])
        assert check(api, "u2", "msgs") == warmed
        assert check(api, "u1", "msgs")["balance"] == 5


def advance_directly(db: Any, tenant: Any, seconds: int) -> None:
    """The sandbox clock of ``tenant`` moved through ``db``, not through the API."""
    env = other_env(db, tenant.created)
    with db.transaction() as tx:
        offset = tx.get("environments", id=env)["clock_offset_us"]
        ctx = Ctx(tenant.id, env, "sandbox", None, frozenset({"admin"}), time.time_ns() // 1000 + offset, "req_other",
                  offset)
        clock.advance(tx, ctx, {"seconds": seconds})


def test_every_new_answer_counts_against_the_size_not_only_a_new_end_users(tmp_path: Path) -> None:
    """Found by trying to break the cache: room was made only for a new end user, so the same end
    user's answers for other features or ``units`` grew the cache past its size without bound."""
    with sqlite_server(database_url("sqlite", tmp_path), check_cache_entries=3) as (running, tenant):
        api = tenant.sandbox
        cache = running.app.app.state.check_cache
        feature(api, "api_calls")
        feature(api, "tokens")
        grant(api, "u1", "api_calls", 10)
        grant(api, "u2", "tokens", 20)
        assert check(api, "u2", "tokens")["balance"] == 20
        for units in ("1", "2", "3", "1.0", "01", "4"):
            assert check(api, "u1", units=units)["allowed"] is True
            assert check(api, "u1", "tokens", units=units)["allowed"] is False
            assert len(cache) <= 3
        assert "u2" not in cache._users  # the oldest end user made room first
        hits = cache.hits
        assert check(api, "u1", "tokens", units="4")["reason"] == "no_entitlement"
        assert cache.hits == hits + 1
