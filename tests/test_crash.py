"""kill -9 the server under load, restart it, let clients retry what went unanswered.

Every acknowledged change is present, every retried request took effect exactly once, and the
ledger adds up for every end user.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from .processes import ServerProcess, new_tenant
from .serving import database_url, engines

CLIENTS = 6
OPS_PER_CLIENT = 30
KILLS = 6
GRANT = 100_000
SIGN = {"grant": 1, "refund": 1, "rollover": 1, "use": -1, "expire": -1, "void": -1, "commit": -1,
        "reserve": 0, "release": 0}


def until_answered(client: httpx.Client, path: str, body: dict[str, Any], key: str) -> httpx.Response:
    """Send until the server answers: the same request, the same key, however often it dies."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            response = client.post(path, json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if response.status_code == 409 and response.json()["error"]["code"] == "idempotency_key_in_use":
            time.sleep(0.05)
            continue
        assert response.status_code < 500, response.text
        return response
    raise AssertionError(f"no answer for {path} {key} in 120 s")


def run_client(api: httpx.Client, user: str, seed: int, chaos_over: threading.Event) -> dict[str, Any]:
    """At least OPS_PER_CLIENT operations, and more until the killer is done: always under fire."""
    rng = random.Random(seed)
    spent, usage_ids = 0, []
    with httpx.Client(base_url=api.base_url, headers=api.headers, timeout=5) as client:
        op = -1
        while (op := op + 1) < OPS_PER_CLIENT or not chaos_over.is_set():
            units = rng.randint(1, 50)
            if rng.random() < 0.5:
                reply = until_answered(client, "/v1/usage", {"end_user_id": user, "feature_key": "credits",
                                                             "units": units}, f"{user}-use-{op}")
                assert reply.status_code == 201, reply.text
                spent += units
                usage_ids.append(reply.json()["id"])
                continue
            held = until_answered(client, "/v1/reservations", {"end_user_id": user, "feature_key": "credits",
                                                               "units": units, "ttl_seconds": 3600},
                                  f"{user}-reserve-{op}")
            assert held.status_code == 201, held.text
            cost = rng.randint(0, units)
            done = until_answered(client, f"/v1/reservations/{held.json()['id']}/commit", {"units": cost},
                                  f"{user}-commit-{op}")
            assert done.status_code == 200 and done.json()["status"] == "committed", done.text
            spent += cost
            usage_ids.append(done.json()["usage_id"])
    return {"user": user, "spent": spent, "usage_ids": usage_ids}


def ledger_total(api: httpx.Client, user: str) -> tuple[Decimal, list[dict[str, Any]]]:
    entries, after = [], None
    while True:
        params: dict[str, Any] = {"end_user_id": user, "limit": 500}
        if after:
            params["starting_after"] = after
        page = api.get("/v1/ledger", params=params).json()
        entries += page["data"]
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    return sum((SIGN[e["type"]] * Decimal(str(e["amount"])) for e in entries), Decimal(0)), entries


@pytest.mark.parametrize("engine", engines())
def test_kill_9_under_load_loses_nothing_and_doubles_nothing(engine: str, tmp_path: Path) -> None:
    server = ServerProcess(database_url(engine, tmp_path), workers=2 if engine == "postgresql" else 1)
    server.start()
    try:
        api = new_tenant(server.base_url, "crash")
        assert api.post("/v1/features", json={"key": "credits"}).status_code == 201
        users = [f"crash-{i}" for i in range(CLIENTS)]
        for user in users:
            assert api.post("/v1/grants", json={"end_user_id": user, "feature_key": "credits",
                                                "amount": GRANT}).status_code == 201
        chaos_over = threading.Event()
        kills = 0

        def killer() -> None:
            nonlocal kills
            rng = random.Random(7)
            try:
                while kills < KILLS:
                    time.sleep(rng.uniform(0.2, 0.8))
                    server.kill()
                    kills += 1
                    server.start()
            finally:
                chaos_over.set()

        chaos = threading.Thread(target=killer)
        chaos.start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda i: run_client(api, users[i], 1000 + i, chaos_over), range(CLIENTS)))
        chaos.join()
        assert kills == KILLS, "the server must have died under load every time"

        for result in results:
            user = result["user"]
            data = api.get(f"/v1/balances/{user}", params={"feature_key": "credits"}).json()["data"][0]
            assert (data["balance"], data["reserved"]) == (GRANT - result["spent"], 0)
            total, entries = ledger_total(api, user)
            assert total == data["balance"] + data["reserved"]
            # Exactly once: one usage per acknowledged operation, each charged once.
            assert len(set(result["usage_ids"])) == len(result["usage_ids"]) >= OPS_PER_CLIENT
            charged = {e["usage_id"] for e in entries if e["type"] in ("use", "commit")}
            assert charged <= set(result["usage_ids"])
            assert sum(e["amount"] for e in entries if e["type"] in ("use", "commit")) == result["spent"]
    finally:
        server.stop()
